"""int4 in blocks of 32 through our kernel (qwen2/quant.py, qwen2/csrc/int4_blocks.cpp): the rounding
and packing of the weights, the rounding of x to int8 per block, the kernel against the float64 sum
it stands for, the layer, whole models against a reference that does the same math in plain torch,
and a compiled step."""

from __future__ import annotations

import pytest
import torch

import qwen2
from qwen2.quant import (BLOCK, INT4_BLOCKS_LAYOUT, Int4BlockLinear, Int4Linear, Int8BlockLinear, dequantize_int4_blocks,
                         quantize_int4_blocks, quantize_model)
from tests.helpers import make_checkpoint, needs_kernel, rand_ids, round_x_in_blocks


def by_channel(t: torch.Tensor) -> torch.Tensor:
    """Scales or minimums from the kernel's panel order to [output channel, block]."""
    n, blocks = t.shape
    return t.view(n // 8, blocks, 8).transpose(1, 2).reshape(n, blocks)


def reference_product(x: torch.Tensor, packed, scales, mins) -> torch.Tensor:
    """float64 sum_b scale * dx * (levels . qx) + min * sum x: what int4_block_mm computes in float32."""
    qx, dx, xsum = round_x_in_blocks(x, 127)
    levels = dequantize_int4_blocks(packed, torch.ones_like(scales), torch.zeros_like(mins))  # the levels as floats
    levels = levels.double().view(packed.shape[0], -1, BLOCK)
    dots = torch.einsum("ngk,mgk->mng", levels, qx.double())  # (M, N, blocks), exact integers
    scales, mins = by_channel(scales).double(), by_channel(mins).double()
    return (dots * scales[None] * dx.double()[:, None]).sum(-1) + xsum.double() @ mins.t()


class ReferenceInt4BlockLinear(torch.nn.Module):
    """Int4BlockLinear's math in plain torch (float64, then x's dtype)."""

    def __init__(self, layer: Int4BlockLinear):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        layer = self.layer
        y = reference_product(x.reshape(-1, layer.in_features), layer.weight, layer.scales, layer.mins)
        y = y.to(x.dtype).view(*x.shape[:-1], layer.out_features)
        return y + layer.bias if layer.bias is not None else y


def min_max_blocks(w: torch.Tensor):
    """Plain min..max in 15 steps per block (float16 scale and minimum): what the search starts from."""
    blocks = w.float().view(w.shape[0], -1, BLOCK)
    low = blocks.amin(-1).half().float()
    scales = ((blocks.amax(-1) - low) / 15).half().float().clamp(min=2 ** -24)
    levels = torch.round((blocks - low[..., None]) / scales[..., None]).clamp(0, 15)
    return levels * scales[..., None] + low[..., None]


@needs_kernel
def test_quantize_int4_blocks_beats_min_max_in_every_block():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 128, generator=gen) * torch.rand(24, 4, generator=gen).repeat_interleave(BLOCK, 1) * 3 + 0.5
    w[3, 64:96] = 0.25  # a constant block
    packed, scales, mins = quantize_int4_blocks(w)
    assert packed.dtype == torch.uint8 and packed.shape == (24, 64)
    assert scales.dtype == mins.dtype == torch.float16 and scales.shape == mins.shape == (24, 4)
    assert by_channel(scales)[3, 2] == 1 and by_channel(mins)[3, 2] == 0.25
    rebuilt = dequantize_int4_blocks(packed, scales, mins).view(24, 4, BLOCK)
    assert rebuilt[3, 2].eq(0.25).all()
    error = (rebuilt - w.view(24, 4, BLOCK)).pow(2).sum(-1)
    plain = (min_max_blocks(w) - w.view(24, 4, BLOCK)).pow(2).sum(-1)
    # no worse than min..max in any block but for the float16 rounding of the chosen pair (each
    # element moves by up to half a float16 step of the minimum and of 15 scales; in blocks of tiny
    # spread that is all the error, and a fixed slack failed 20 seeds of 300), better overall
    rounding = BLOCK * ((by_channel(mins).float().abs() + 15 * by_channel(scales).float()) * 2 ** -11) ** 2
    assert (error.sqrt() <= plain.sqrt() * 1.005 + rounding.sqrt()).all() and error.sum() < 0.9 * plain.sum()


@needs_kernel
def test_importance_weighs_each_inputs_error_and_all_ones_is_the_plain_search():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=gen) * 0.05
    assert all(torch.equal(a, b) for a, b in zip(quantize_int4_blocks(w), quantize_int4_blocks(w, torch.ones(256))))
    # inputs 1000x apart in importance: the weighed search trades the quiet inputs' error for the loud ones'
    importance = torch.where(torch.rand(256, generator=gen) < 0.25, 1000.0, 1.0)

    def weighed_error(quantized):
        return ((dequantize_int4_blocks(*quantized) - w).square() * importance).view(64, -1, BLOCK).sum(-1)

    weighed, plain = weighed_error(quantize_int4_blocks(w, importance)), weighed_error(quantize_int4_blocks(w))
    baseline = ((min_max_blocks(w) - w.view(64, -1, BLOCK)).square() * importance.view(-1, BLOCK)).sum(-1)
    assert (weighed <= baseline * 1.01).all()  # the search starts from min..max (float16 rounding aside)
    assert weighed.sum() < 0.8 * plain.sum()


@needs_kernel
@pytest.mark.parametrize("importance, expected", [(torch.ones(128), "(256,)"), (-torch.ones(256), ">= 0"),
                                                  (torch.full((256,), float("nan")), "finite")])
def test_importance_must_be_one_finite_non_negative_value_per_input(importance, expected):
    with pytest.raises(RuntimeError, match="importance") as caught:
        quantize_int4_blocks(torch.randn(8, 256), importance)
    assert expected in str(caught.value)


@needs_kernel
def test_packed_layout_is_the_documented_panel_order():
    # channel c, input k holds level (k + c) % 16: every block spans 0..15, so scale 1 and minimum 0 exactly
    levels = (torch.arange(64)[None, :] + torch.arange(16)[:, None]) % 16
    packed, scales, mins = quantize_int4_blocks(levels.float())
    assert scales.eq(1).all() and mins.eq(0).all()
    runs = packed.view(2, 2, 4, 8, 4)  # [panel, block, run, channel in panel, j]
    for panel, block, run, c, j in [(0, 0, 0, 0, 0), (0, 1, 3, 7, 3), (1, 0, 2, 5, 1), (1, 1, 1, 2, 2)]:
        k = block * BLOCK + 8 * run + j
        expected = levels[8 * panel + c, k] | (levels[8 * panel + c, k + 4] << 4)
        assert runs[panel, block, run, c, j] == expected
    assert torch.equal(dequantize_int4_blocks(packed, scales, mins), levels.float())


@needs_kernel
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 7, 13, 32])  # tiles of 4, 3, 2 and 1
@pytest.mark.parametrize("shape", [(40, 96), (24, 2080)], ids=["narrow", "wide"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_the_float64_sum_over_int8_rounded_x(rows, shape, dtype):
    packed, scales, mins = quantize_int4_blocks(torch.randn(*shape))  # 40 or 24 channels: 5 and 3 panels
    x = torch.randn(rows, shape[1]).to(dtype)
    if rows > 1:
        x[1, :BLOCK] = 0  # an all-zero block of x
    y = torch.ops.qwen2.int4_block_mm(x, packed, scales, mins)
    assert y.dtype == dtype and y.shape == (rows, shape[0])
    expected = reference_product(x, packed, scales, mins)
    # float32 sums in the kernel's own order: within float32 rounding of the terms' sizes (a block
    # missed, counted twice or rounded differently is far outside), then one rounding to x's dtype
    qx, dx, xsum = round_x_in_blocks(x, 127)
    w = dequantize_int4_blocks(packed, scales, mins).double()
    size = (qx.abs().view(rows, shape[1]).double() * dx.double().repeat_interleave(BLOCK, 1)) @ w.abs().t()
    bound = 1e-6 * size + (2 ** -8 if dtype == torch.bfloat16 else 0) * expected.abs()
    assert ((y.double() - expected).abs() <= bound).all()


@needs_kernel
def test_rounding_of_x_matches_torch_at_exact_ties():
    # 127 / 2 * x lands on .5 for these x: half to even in both
    x = torch.zeros(1, 64)
    x[0, 0] = 2.0  # the block's max: scale 63.5
    x[0, 1:8] = torch.tensor([1 / 127, 3 / 127, 5 / 127, 7 / 127, -1 / 127, -3 / 127, 0.5])
    packed, scales, mins = quantize_int4_blocks(torch.randn(16, 64))
    expected = reference_product(x, packed, scales, mins)
    torch.testing.assert_close(torch.ops.qwen2.int4_block_mm(x, packed, scales, mins).double(), expected,
                               atol=1e-5, rtol=0)


@needs_kernel
def test_kernel_refuses_wrong_shapes_and_dtypes_with_what_it_expected():
    packed, scales, mins = quantize_int4_blocks(torch.randn(8, 64))
    with pytest.raises(RuntimeError, match=r"q must be \(N, 48\)"):
        torch.ops.qwen2.int4_block_mm(torch.randn(1, 96), packed, scales, mins)
    with pytest.raises(RuntimeError, match=r"scales and mins must be \(8, 2\)"):
        torch.ops.qwen2.int4_block_mm(torch.randn(1, 64), packed, scales, mins[:, :1])
    with pytest.raises(RuntimeError, match="q must be uint8, scales and mins float16"):
        torch.ops.qwen2.int4_block_mm(torch.randn(1, 64), packed, scales.float(), mins)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 9, 70], ids=["decode", "draft", "prompt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_linear_equals_its_reference(rows, dtype):
    linear = torch.nn.Linear(96, 40, bias=True).to(dtype)
    layer = Int4BlockLinear.from_weight(linear.weight.data, linear.bias)
    x = torch.randn(2, rows, 96).to(dtype)
    got = layer(x)
    assert got.dtype == dtype and got.shape == (2, rows, 40)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(got.float(), ReferenceInt4BlockLinear(layer)(x).float(), atol=tol, rtol=tol)


@needs_kernel
@pytest.mark.parametrize("tied, head", [(True, "int8"), (False, "int8"), (True, "int4")])
def test_every_int4_layer_of_a_model_equals_its_reference_on_the_inputs_it_gets(tmp_path, tied, head):
    # Rounding x to int8 per block is not smooth: a block's scale follows its largest value, and
    # values move to the next level, so a last-bit difference upstream (another kernel's summation
    # order) grows layer by layer (on the tiny model, 1e-7 at the embedding was 1e-2 of the logits'
    # spread two layers on). A whole model is therefore not comparable to 1e-4 with a reference that
    # computes in another order; each layer is, on its own inputs: prompt and cached decode rows
    # alike, biases and the head included.
    directory = make_checkpoint(tmp_path, with_tokenizer=False, tie_word_embeddings=tied)
    q4 = quantize_model(qwen2.load_model(directory, dtype="float32"), "int4", head=head)
    assert q4.info.quant_layout == INT4_BLOCKS_LAYOUT
    assert isinstance(q4.model.layers[0].mlp.down_proj, Int4BlockLinear)
    assert isinstance(q4.lm_head, Int4BlockLinear if head == "int4" else Int8BlockLinear)
    seen = []

    def check(layer, inputs, output):
        seen.append(inputs[0].shape[-2])
        torch.testing.assert_close(output, ReferenceInt4BlockLinear(layer)(inputs[0]), atol=1e-5, rtol=1e-5)

    layers = [m for m in q4.modules() if isinstance(m, Int4BlockLinear)]
    handles = [layer.register_forward_hook(check) for layer in layers]
    try:
        with torch.inference_mode():
            list(qwen2.generate(q4, rand_ids(1, (1, 12)), max_new_tokens=4, stop_token_ids=[]))
    finally:
        for handle in handles:
            handle.remove()
    assert len(layers) == 2 * q4.config.num_hidden_layers + (head == "int4") or len(layers) >= 4
    assert 12 in seen and 1 in seen  # the prompt and decode steps


@needs_kernel
def test_block_int4_model_stays_near_the_float_model_of_its_weights(tiny_model_dir):
    # The cost of rounding x: next to the float32 model holding the same int4 weights, logits move by
    # a small fraction of their spread (a block counted wrongly would move them by their whole size).
    q4 = qwen2.load_model(tiny_model_dir, dtype="float32", quantize="int4")
    ref = qwen2.load_model(tiny_model_dir, dtype="float32", quantize="int4")
    for module in list(ref.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Int4BlockLinear):
                linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                linear.weight.data, linear.bias = child.dequantize(), child.bias
                setattr(module, name, linear)
    ids = rand_ids(4, (2, 16))
    with torch.inference_mode():
        got, expected = q4(ids), ref(ids)
    print(f"rms {(got - expected).pow(2).mean().sqrt() / expected.std():.4f} of the logits' spread, top-1 "
          f"{(got.argmax(-1) == expected.argmax(-1)).float().mean():.2%}")
    assert (got - expected).pow(2).mean().sqrt() < 0.02 * expected.std()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_torchs_layout_when_asked_or_for_other_group_sizes(tiny_model_dir):
    for kwargs, layout in [({"blocks": False}, "groups of 32"), ({"group_size": 64}, "groups of 64")]:
        q4 = quantize_model(qwen2.load_model(tiny_model_dir, dtype="float32"), "int4", **kwargs)
        assert q4.info.quant_layout == layout and isinstance(q4.model.layers[0].mlp.down_proj, Int4Linear)


@needs_kernel
def test_compiled_layer_and_model_call_the_kernel(tiny_model_dir):
    layer = Int4BlockLinear.from_weight(torch.randn(48, 96), torch.randn(48))
    x = torch.randn(3, 96)
    with torch.inference_mode():  # the same x: the same levels, so the same bits
        assert torch.equal(torch.compile(layer, fullgraph=True)(x), layer(x))
    model = qwen2.load_model(tiny_model_dir, dtype="float32", quantize="int4")
    ids = rand_ids(3, (1, 9))
    step = torch.compile(model, fullgraph=True, dynamic=False)
    with torch.inference_mode():  # Inductor's fused norms round differently, and x amplifies it (above)
        got, expected = step(ids), model(ids)
    print(f"rms {(got - expected).pow(2).mean().sqrt() / expected.std():.5f} of the logits' spread")
    assert (got - expected).pow(2).mean().sqrt() < 0.02 * expected.std()  # no more than rounding x costs (above)
