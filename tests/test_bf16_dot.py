"""bf16 products on CPUs with bf16 math (qwen2/csrc/bf16_dot.cpp, qwen2/bf16_dot.py): the kernel
against the float64 product of the same bf16 values, the hand-over of larger row counts to oneDNN,
the layer and a compiled call, and the loader's choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qwen2
from qwen2 import cpu_kernels
from qwen2.bf16_dot import Bf16DotLinear, dot_products, wants_bf16_dot
from qwen2.options import cpu_has_bfloat16_math
from qwen2.quant import quantize_model
from qwen2.steps import VERIFY_WIDTH, WIDE_VERIFY_WIDTH, verify_widths
from tests.helpers import make_checkpoint, needs_kernel

needs_dot = pytest.mark.skipif(
    cpu_kernels.kernel_error() is not None or not torch.ops.qwen2.bf16_dot_available(),
    reason="our kernels are not built with AVX-512 BF16 on this CPU (qwen2/csrc/bf16_dot.cpp)")


def within_rounding(y: torch.Tensor, x, w, bias=None) -> bool:
    """float32 sums of exact bf16 products, then one rounding to bf16: within float32 rounding of
    the terms' sizes plus half a bf16 step of the result (an input or a channel mixed up is far outside)."""
    expected = x.double() @ w.double().t() + (0 if bias is None else bias.double())
    bound = 1e-6 * (x.double().abs() @ w.double().abs().t()) + 2 ** -8 * expected.abs() + 1e-30
    return bool(((y.double() - expected).abs() <= bound).all())


@needs_dot
# ours up to nine rows at once, up to 24 in tiles of nine (10 = 9 + 1, 17, 24 = 9 + 9 + 6), oneDNN above
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 8, 9, 10, 17, 24, 25, 40])
# 36 and 132 channels: not a multiple of the eight that three or four rows take at once, and 132 splits
# between two threads at a channel that is not either
@pytest.mark.parametrize("shape", [(40, 96), (1152, 896), (36, 4864), (132, 128)], ids=["small", "qkv", "down", "odd"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_equals_the_float64_product_of_the_bf16_values(rows, shape, with_bias):
    gen = torch.Generator().manual_seed(rows)
    w = (torch.randn(*shape, generator=gen) * 0.05).bfloat16()
    x = torch.randn(rows, shape[1], generator=gen).bfloat16()
    bias = torch.randn(shape[0], generator=gen).bfloat16() if with_bias else None
    y = torch.ops.qwen2.bf16_linear(x, w, bias)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, shape[0])
    assert within_rounding(y, x, w, bias)


@needs_dot
@pytest.mark.parametrize("x_dtype, shape", [(torch.float32, (16, 64)), (torch.bfloat16, (16, 40)),
                                            (torch.bfloat16, (18, 64))], ids=["float32 x", "K not 32k", "N not 4k"])
def test_what_the_dot_products_do_not_take_goes_to_torchs_product(x_dtype, shape):
    w = torch.randn(*shape).to(x_dtype)
    x = torch.randn(2, shape[1]).to(x_dtype)
    assert torch.equal(torch.ops.qwen2.bf16_linear(x, w), F.linear(x, w))


@needs_kernel
def test_the_operator_refuses_mismatched_shapes_with_what_it_expected():
    with pytest.raises(RuntimeError, match=r"x must be \(M, K\) and w \(N, K\)"):
        torch.ops.qwen2.bf16_linear(torch.randn(2, 64).bfloat16(), torch.randn(8, 32).bfloat16())


@needs_dot
@pytest.mark.parametrize("rows", [1, 4, 9, 20, 70],
                         ids=["decode", "verification", "wide verification", "short prompt", "prompt"])
def test_layer_equals_torchs_product_and_compiles_to_the_same_bits(rows):
    linear = torch.nn.Linear(96, 40, bias=True).bfloat16()
    layer = Bf16DotLinear.from_linear(linear)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    x = torch.randn(1, rows, 96).bfloat16()
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (1, rows, 40)
    torch.testing.assert_close(got, linear(x), atol=2 ** -6, rtol=2 ** -7)
    with torch.inference_mode():
        assert torch.equal(torch.compile(layer, fullgraph=True)(x), layer(x))


@needs_dot
@pytest.mark.skipif(not cpu_has_bfloat16_math(), reason="this CPU has no bf16 math: bf16 models use qwen2/upcast.py")
def test_the_loader_gives_a_bf16_model_the_dot_products_and_the_model_stays_the_same(tmp_path):
    directory = make_checkpoint(tmp_path, with_tokenizer=False, dtype=torch.bfloat16)
    model = qwen2.load_model(directory, dtype="bfloat16")
    assert wants_bf16_dot(model)
    assert isinstance(model.lm_head, Bf16DotLinear) and model.lm_head.weight is model.model.embed_tokens.weight
    assert all(isinstance(m, Bf16DotLinear) for layer in model.model.layers
               for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj))
    plain = qwen2.load_model(directory, dtype="bfloat16")
    for module in plain.modules():  # the same weights through torch's product
        for name, child in list(module.named_children()):
            if isinstance(child, Bf16DotLinear):
                linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                linear.weight, linear.bias = child.weight, child.bias
                setattr(module, name, linear)
    # nine rows in one pass over the weights: the engine compiles the wide verification for ours only
    assert verify_widths(model) == (VERIFY_WIDTH, WIDE_VERIFY_WIDTH) and verify_widths(plain) == (VERIFY_WIDTH,)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours, torchs = model(ids), plain(ids)
    # bf16 activations: both round each product once; the rows' argmax agree and the logits are close
    torch.testing.assert_close(ours, torchs, atol=0.05, rtol=0.02)
    assert dot_products(model) is model  # idempotent: nothing left to swap
    q8 = quantize_model(model, "int8")  # a dot model quantizes like a plain one
    assert q8.info.quantization == "int8"
