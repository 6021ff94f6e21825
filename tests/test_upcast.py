"""qwen2.upcast: a bf16 model on a CPU without bf16 math multiplies in float32: through our bf16
kernel where it builds (Bf16PanelLinear, tests/test_bf16_panels.py), else prompts through a float32
copy of the weights (UpcastLinear: the output rounded back to bf16; bf16 products for decode and
compiled steps)."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import qwen2
from qwen2.bf16_dot import Bf16DotLinear, wants_bf16_dot
from qwen2 import upcast
from qwen2.quant import Int8BlockLinear, Int8Linear
from qwen2.upcast import UPCAST_ABOVE_ROWS, UpcastLinear
from tests.helpers import rand_ids


@pytest.mark.parametrize("rows", [1, UPCAST_ABOVE_ROWS, UPCAST_ABOVE_ROWS + 1, 60])
def test_upcast_linear_multiplies_in_float32_above_the_threshold_only(rows):
    linear = torch.nn.Linear(96, 40, bias=True).to(torch.bfloat16)
    up = UpcastLinear.from_linear(linear)
    assert up.weight is linear.weight and up.bias is linear.bias  # shared, not copied
    x = torch.randn(rows, 1, 96).to(torch.bfloat16)
    if rows > UPCAST_ABOVE_ROWS:
        expected = F.linear(x.float(), linear.weight.float(), linear.bias.float()).to(torch.bfloat16)
    else:
        expected = F.linear(x, linear.weight, linear.bias)
    assert torch.equal(up(x), expected)
    bigger = UpcastLinear.from_linear(torch.nn.Linear(96, 200).to(torch.bfloat16))
    bigger(x), up(x)  # the scratch buffer grows and is reused by smaller layers
    assert torch.equal(up(x), expected)


def test_prompts_on_several_threads_take_turns_with_the_one_buffer():
    layers = [UpcastLinear.from_linear(torch.nn.Linear(64, 48 + 16 * i).to(torch.bfloat16)) for i in range(4)]
    x = torch.randn(40, 64).to(torch.bfloat16)
    expected = [F.linear(x.float(), layer.weight.float(), layer.bias.float()).to(torch.bfloat16) for layer in layers]
    results, errors = {}, []

    def run(i):
        try:
            results[i] = all(torch.equal(layers[i](x), expected[i]) for _ in range(50))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == {i: True for i in range(4)}


def test_large_layers_go_in_slices_of_output_channels(monkeypatch):
    monkeypatch.setattr(upcast, "COPY_WEIGHTS", 96 * 7)  # 7 channels per slice: 40 = 5 x 7 + 5
    linear = torch.nn.Linear(96, 40, bias=True).to(torch.bfloat16)
    x = torch.randn(2, 30, 96).to(torch.bfloat16)
    expected = F.linear(x.float(), linear.weight.float(), linear.bias.float())
    got = UpcastLinear.from_linear(linear)(x)
    assert got.dtype == torch.bfloat16
    # a GEMM over a slice may sum in another order than over the whole: one bf16 rounding apart at most
    torch.testing.assert_close(got.float(), expected, rtol=2 ** -8, atol=1e-6)


def test_the_buffer_serves_inside_and_outside_inference_mode():
    up = UpcastLinear.from_linear(torch.nn.Linear(64, 32).to(torch.bfloat16))
    x = torch.randn(40, 64).to(torch.bfloat16)
    with torch.inference_mode():
        inside = up(x)
        assert not upcast._Scratch().buffer.is_inference()
    assert torch.equal(up(x), inside)


def test_compiled_code_keeps_the_bf16_product_and_eager_code_beside_a_compile_does_not():
    linear = torch.nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    up = UpcastLinear.from_linear(linear)
    x = torch.randn(40, 64).to(torch.bfloat16)
    compiled = torch.compile(up, fullgraph=True, backend="eager", dynamic=True)  # rows symbolic
    few = x[:8].clone()
    assert torch.equal(compiled(few), F.linear(few, linear.weight))
    with torch._dynamo.config.patch(error_on_recompile=True):  # the row test put no guard on the rows
        assert torch.equal(compiled(x), F.linear(x, linear.weight))
    # torch.compiler.is_compiling() is one flag for the process, true while any thread compiles (the
    # engine's background compile): an eager prompt meanwhile must still take the float32 product
    with torch.compiler._compile_session_context():
        assert torch.compiler.is_compiling()
        assert torch.equal(up(x), F.linear(x.float(), linear.weight.float()).to(torch.bfloat16))


@pytest.mark.parametrize("bf16_math, kernels", [(False, True), (False, False), (True, True)])
def test_a_bf16_model_multiplies_in_float32_where_the_cpu_has_no_bf16_math(tiny_model_dir, monkeypatch, bf16_math,
                                                                           kernels):
    monkeypatch.setattr(upcast, "cpu_has_bfloat16_math", lambda: bf16_math)
    if not kernels:
        monkeypatch.setattr(upcast.cpu_kernels, "blocks_available", lambda device: False)
    elif not upcast.cpu_kernels.blocks_available(torch.device("cpu")):
        pytest.skip(f"our CPU kernels are not built here: {upcast.cpu_kernels.kernel_error()}")
    model = qwen2.load_model(tiny_model_dir, dtype="bfloat16")
    kinds = {type(m).__name__ for layer in model.model.layers for m in (*layer.self_attn.children(), *layer.mlp.children())}
    # with bf16 math: torch's product, or our dot products where the kernels have them (qwen2/bf16_dot.py)
    dot = bf16_math and wants_bf16_dot(model)
    expected = ("Bf16DotLinear" if dot else "Linear") if bf16_math else "Bf16PanelLinear" if kernels else "UpcastLinear"
    assert kinds == {expected}
    # the head in panels too where the kernels build, a tied embedding reading its rows from them
    panels = kernels and not bf16_math
    assert type(model.lm_head) is (upcast.Bf16PanelLinear if panels else Bf16DotLinear if dot else torch.nn.Linear)
    assert type(model.model.embed_tokens) is (upcast.Bf16PanelEmbedding if panels else torch.nn.Embedding)
    assert model.model.embed_tokens.weight is model.lm_head.weight  # one table, tied as in the checkpoint
    assert all(type(m) is torch.nn.Linear for m in qwen2.load_model(tiny_model_dir, dtype="float32").modules()
               if isinstance(m, torch.nn.Linear))
    # a prompt through the upcast products is close to the float32 model, its greedy reply the same
    reference = qwen2.load_model(tiny_model_dir, dtype="float32")
    ids = rand_ids(3, (1, 40))
    torch.testing.assert_close(model(ids).float(), reference(ids), atol=0.1, rtol=0.05)
    assert list(qwen2.generate(model, ids, max_new_tokens=8, stop_token_ids=[])) == \
        list(qwen2.generate(reference, ids, max_new_tokens=8, stop_token_ids=[]))


def test_quantizing_an_upcast_model_replaces_every_layer(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(upcast, "cpu_has_bfloat16_math", lambda: False)
    model = qwen2.load_model(tiny_model_dir, dtype="bfloat16")
    qwen2.quant.quantize_model(model, "int8")
    products = [m for layer in model.model.layers for m in (*layer.self_attn.children(), *layer.mlp.children())
                if not isinstance(m, torch.nn.modules.activation.SiLU)]
    kinds = {type(m).__name__ for m in products}
    assert products and all(isinstance(m, (Int8Linear, Int8BlockLinear)) for m in products), kinds
    # the same int8 model as quantizing the plain bf16 one: the panels (head and embedding too) were
    # taken back to plain weights first
    monkeypatch.setattr(upcast, "cpu_has_bfloat16_math", lambda: True)
    plain = qwen2.quant.quantize_model(qwen2.load_model(tiny_model_dir, dtype="bfloat16"), "int8")
    ids = rand_ids(4, (1, 12))
    assert torch.equal(model(ids), plain(ids))
