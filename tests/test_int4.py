"""Weight-only int4 in torch's layout (qwen2/quant.py, `blocks=False`, and wherever our kernels are
not built): each layer against the float math of its own dequantized weights, the whole model against
a float model carrying those weights; top-1 agreement with bf16 in the default layout. Our block
kernel (x rounded to int8) has its own tests in test_int4_blocks.py."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import qwen2
from qwen2.cpu_kernels import blocks_available
from qwen2.quant import (Int4BlockLinear, Int4Linear, Int8BlockLinear, Int8Linear, dequantize, quantize_groups, quantize_model,
                         unpack_int4)
from tests.helpers import quantized_agreement, rand_ids


@pytest.mark.parametrize("out_features", [16, 48, 64, 96, 320])
def test_unpack_inverts_the_kernel_layout(out_features):
    q = torch.randint(0, 16, (out_features, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_int4(torch._convert_weight_to_int4pack_for_cpu(q, 1)).int(), q)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantize_groups_error_is_within_half_a_step(group_size):
    w = torch.randn(32, 256)
    q, scale, low = quantize_groups(w, group_size)
    assert q.min() >= 0 and q.max() <= 15 and scale.shape == (32, 256 // group_size)
    rebuilt = (q.float().view(32, -1, group_size) * scale[..., None] + low[..., None]).view(32, 256)
    step = scale.repeat_interleave(group_size, dim=1)
    assert ((rebuilt - w).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("rows", [1, 7, 64], ids=["decode", "short", "prefill"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_linear_equals_dequantized_float_linear(dtype, rows, group_size):
    lin = torch.nn.Linear(256, 96, bias=True).to(dtype)
    q4 = Int4Linear.from_linear(lin, group_size)
    assert q4.group_size == group_size and q4.weight.dtype == torch.uint8 and q4.weight.shape == (96, 128)
    x = torch.randn(rows, 1, 256).to(dtype)
    expected = F.linear(x.float(), q4.dequantize().float(), lin.bias.float())
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(q4(x).float(), expected, atol=tol, rtol=tol)
    # and the dequantized weight is the float weight to within half a level (plus the rounding of a
    # bf16 scale and zero point: up to 8 levels of 2^-9 relative error)
    step = q4.scales_and_zeros[..., 0].t().float().repeat_interleave(group_size, dim=1)
    slack = 1e-5 if dtype == torch.float32 else 0.1 * step
    assert ((q4.dequantize().float() - lin.weight.float()).abs() <= step / 2 + slack).all()


def test_group_size_falls_back_to_one_that_divides_the_input():
    q4 = Int4Linear.from_linear(torch.nn.Linear(160, 64), 128)  # 160 = 5 x 32
    assert q4.group_size == 32


def _float_copy_with_dequantized_weights(directory, q4, head):
    """A float32 model carrying q4's rounded weights: the same math, so it must give the same logits."""
    ref = qwen2.load_model(directory, dtype="float32")
    with torch.no_grad():
        for (name, module), (_, qmod) in zip(ref.named_modules(), q4.named_modules()):
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                assert isinstance(qmod, Int4Linear), name
                module.weight.copy_(qmod.dequantize())
        emb = q4.model.embed_tokens
        ref.model.embed_tokens.weight.copy_(dequantize(emb.weight, emb.scales, torch.float32))
        if head == "int4":
            ref.lm_head = torch.nn.Linear(64, ref.config.vocab_size, bias=False)
            ref.lm_head.weight.copy_(q4.lm_head.dequantize())
    return ref


@pytest.mark.parametrize("head", ["int8", "int4"])
def test_int4_model_matches_its_dequantized_weights(tiny_model_dir, head):
    q4 = qwen2.load_model(tiny_model_dir, dtype="float32")
    quantize_model(q4, "int4", group_size=32, head=head, blocks=False)
    assert q4.info.quantization == "int4" and q4.info.quant_layout == "groups of 32"
    assert isinstance(q4.lm_head, Int4Linear if head == "int4" else (Int8Linear, Int8BlockLinear))
    ref = _float_copy_with_dequantized_weights(tiny_model_dir, q4, head)
    ids = rand_ids(1, (2, 12))
    torch.testing.assert_close(q4(ids), ref(ids), atol=1e-4, rtol=0)


def test_int4_through_load_model_and_memory(tiny_model_dir):
    def nbytes(model):
        return sum(p.numel() * p.element_size() for p in model.parameters())

    bf16 = qwen2.load_model(tiny_model_dir, dtype="bfloat16")
    q4 = qwen2.load_model(tiny_model_dir, dtype="bfloat16", quantize="int4")
    int4 = Int4BlockLinear if blocks_available(torch.device("cpu")) else Int4Linear
    assert isinstance(q4.model.layers[0].mlp.down_proj, int4)
    layer_bytes = sum(p.numel() * p.element_size() for p in q4.model.layers.parameters())
    float_layer_bytes = sum(p.numel() * p.element_size() for p in bf16.model.layers.parameters())
    assert layer_bytes / float_layer_bytes < 0.45  # 4 bits + a 16-bit scale and minimum per 32 weights + norms
    assert nbytes(q4) < nbytes(bf16)


@pytest.mark.parametrize("head", ["int8", "int4"])
def test_int4_top1_agreement_on_a_trained_model(trained_model, head):
    assert trained_model.final_loss < 1.5, f"the model did not learn (loss {trained_model.final_loss:.2f})"
    agreement, kl = quantized_agreement(trained_model, "int4", head=head)
    print(f"[int4, head {head}] trained model: top-1 agreement {agreement:.2%}, KL {kl:.2e} nats/token")
    assert agreement >= 0.95
    # An int4 LM head costs ~30x the KL of an int8 one (measured 7.8e-2 against 2.6e-3): why int8
    # is the head's default.
    assert kl < (1e-2 if head == "int8" else 0.2)


def test_int4_rejects_bad_group_size_and_head(tiny_model_dir):
    model = qwen2.load_model(tiny_model_dir, dtype="float32")
    with pytest.raises(qwen2.ConfigError, match="group_size"):
        quantize_model(model, "int4", group_size=48)
    with pytest.raises(qwen2.ConfigError, match="head"):
        quantize_model(model, "int4", head="int2")
