"""Our bf16 kernel for CPUs without bf16 math (qwen2/csrc/bf16_panels.cpp, qwen2/upcast.py): the
panel order, the kernel against the float64 product of the same bf16 weights, the layer, and a
compiled call. The whole model's parity is in tests/test_upcast.py and the transformers tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qwen2
from profiling.memory import weight_bytes
from qwen2 import upcast
from qwen2.upcast import Bf16PanelEmbedding, Bf16PanelLinear, panel_rows, to_panels
from tests.helpers import make_checkpoint, needs_kernel, rand_ids


def test_panel_order_is_the_documented_one_and_round_trips():
    w = torch.randn(16, 24).bfloat16()
    runs = to_panels(w).view(2, 24, 8)  # [panel, input, channel in panel]
    for panel, k, c in [(0, 0, 0), (1, 23, 7), (0, 5, 3), (1, 11, 0)]:
        assert runs[panel, k, c] == w[8 * panel + c, k]
    linear = torch.nn.Linear(24, 16).bfloat16()
    layer = Bf16PanelLinear.from_linear(linear)
    assert torch.equal(layer.plain_weight(), linear.weight) and torch.equal(layer.as_linear().weight, linear.weight)


@needs_kernel
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 7, 13])  # tiles of 4, 3, 2 and 1
@pytest.mark.parametrize("shape", [(40, 96), (24, 904)], ids=["narrow", "wide"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_the_float64_product_of_the_bf16_weight(rows, shape, dtype):
    w = torch.randn(*shape).bfloat16()
    x = torch.randn(rows, shape[1]).to(dtype)
    y = torch.ops.qwen2.bf16_panel_mm(x, to_panels(w))
    assert y.dtype == dtype and y.shape == (rows, shape[0])
    expected = x.double() @ w.double().t()
    # float32 sums in the kernel's order: within float32 rounding of the terms' sizes (an input
    # missed or a channel mixed up is far outside), then one rounding to x's dtype
    bound = 1e-6 * (x.double().abs() @ w.double().abs().t()) + (2 ** -8 if dtype == torch.bfloat16 else 0) * expected.abs()
    assert ((y.double() - expected).abs() <= bound).all()


@needs_kernel
def test_kernel_refuses_wrong_shapes_and_dtypes_with_what_it_expected():
    w = to_panels(torch.randn(8, 64).bfloat16())
    with pytest.raises(RuntimeError, match=r"w must be \(N, 96\)"):
        torch.ops.qwen2.bf16_panel_mm(torch.randn(1, 96), w)
    with pytest.raises(RuntimeError, match="w must be bfloat16"):
        torch.ops.qwen2.bf16_panel_mm(torch.randn(1, 64), w.float())
    with pytest.raises(RuntimeError, match=r"and N by 8"):
        torch.ops.qwen2.bf16_panel_mm(torch.randn(1, 64), torch.randn(12, 64).bfloat16())


@needs_kernel
@pytest.mark.parametrize("rows", [1, 9, 70], ids=["decode", "draft", "prompt"])
def test_layer_equals_the_float32_product_rounded_to_bf16(rows):
    linear = torch.nn.Linear(96, 40, bias=True).bfloat16()
    layer = Bf16PanelLinear.from_linear(linear)
    x = torch.randn(2, rows, 96).bfloat16()
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (2, rows, 40)
    expected = F.linear(x.float(), linear.weight.float()).bfloat16() + linear.bias  # the same two roundings
    torch.testing.assert_close(got, expected, atol=2 ** -7, rtol=2 ** -7)
    with torch.inference_mode():  # compiled: Inductor calls the same kernel, so the same bits
        assert torch.equal(torch.compile(layer, fullgraph=True)(x), layer(x))


def test_rows_read_out_of_panels_are_the_plain_rows():
    w = torch.randn(24, 16).bfloat16()
    ids = torch.tensor([[0, 23, 7], [8, 8, 15]])
    assert torch.equal(panel_rows(to_panels(w), ids), w[ids])
    assert torch.equal(Bf16PanelEmbedding(to_panels(w))(ids), F.embedding(ids, w))


@needs_kernel
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_bf16_model_reads_its_head_from_panels_and_keeps_one_table(tmp_path, monkeypatch, tied):
    monkeypatch.setattr(upcast, "cpu_has_bfloat16_math", lambda: False)
    directory = make_checkpoint(tmp_path, with_tokenizer=False, tie_word_embeddings=tied)
    model = qwen2.load_model(directory, dtype="bfloat16")
    reference = qwen2.load_model(directory, dtype="float32")
    assert isinstance(model.lm_head, Bf16PanelLinear)
    assert isinstance(model.model.embed_tokens, Bf16PanelEmbedding if tied else torch.nn.Embedding)
    assert (model.model.embed_tokens.weight is model.lm_head.weight) == tied
    assert weight_bytes(model)["weights_bytes"] * 2 == weight_bytes(reference)["weights_bytes"]  # no second copy
    # the embedding's rows and the head's product are those of the checkpoint's table
    ids = rand_ids(5, (2, 11))
    torch.testing.assert_close(model.model.embed_tokens(ids).float(), reference.model.embed_tokens(ids),
                               atol=0, rtol=2 ** -8)
    h = torch.randn(3, model.config.hidden_size).bfloat16()
    torch.testing.assert_close(model.lm_head(h).double(), h.double() @ reference.lm_head.weight.bfloat16().double().t(),
                               atol=1e-3, rtol=2 ** -7)
    with torch.inference_mode():
        assert list(qwen2.generate(model, ids[:1], max_new_tokens=8, stop_token_ids=[])) == \
            list(qwen2.generate(reference, ids[:1], max_new_tokens=8, stop_token_ids=[]))
