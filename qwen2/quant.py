"""Weight-only int8: each linear weight row stored as int8 with one scale per output channel.

Decode reads every weight once per token, so its speed is bytes / bandwidth: halving the bytes of
bf16 nearly halves the time, as long as the kernel dequantises on the fly. On CPU that kernel is
`torch._weight_int8pack_mm` (int8 weights, bf16/fp32 activations, per-channel scales). The
activations stay in the model's dtype; only storage changes:

    W[o, i] ~= scale[o] * q[o, i],   q in [-127, 127],   scale[o] = max_i |W[o, i]| / 127

The tied embedding / LM head (27 % of Qwen2-0.5B) is quantized too: an embedding row and an LM-head
output channel are the same row, so both share one int8 tensor and one set of scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

SCHEMES = ("int8",)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> int8 (out, in) and per-row scales (out,) in the weight's dtype."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales.to(weight.dtype)


def _int8_parameter(t):
    return nn.Parameter(t, requires_grad=False)


def _has_int8_kernel(device: torch.device) -> bool:
    """Whether torch has the fused int8-weight matmul on this device (CPU always; CUDA in recent builds)."""
    try:
        x = torch.zeros(1, 32, device=device, dtype=torch.bfloat16)
        torch._weight_int8pack_mm(x, torch.zeros(8, 32, device=device, dtype=torch.int8),
                                  torch.ones(8, device=device, dtype=torch.bfloat16))
        return True
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


class Int8Linear(nn.Module):
    """y = (x @ q^T) * scale + bias, with q int8 (out, in) and scale (out,)."""

    def __init__(self, weight: nn.Parameter, scales: nn.Parameter, bias: nn.Parameter | None, fused_kernel: bool):
        super().__init__()
        self.weight, self.scales, self.bias = weight, scales, bias
        self.fused_kernel = fused_kernel
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, fused_kernel: bool) -> "Int8Linear":
        q, scales = quantize_rows(linear.weight.data)
        bias = linear.bias
        return cls(_int8_parameter(q), _int8_parameter(scales), bias, fused_kernel)

    # The fused kernel streams int8 weights once per row of x: unbeatable for decode (1 row), but
    # for a long prompt one dequantised copy and a float product is faster (measured crossover ~32).
    FUSED_MAX_ROWS = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_kernel and x.numel() <= self.FUSED_MAX_ROWS * x.shape[-1]:
            y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scales.to(x.dtype))
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight.to(x.dtype) * self.scales.to(x.dtype)[:, None])
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """Row lookup of an int8 table, scaled back by the row's scale."""

    def __init__(self, weight: nn.Parameter, scales: nn.Parameter, dtype: torch.dtype):
        super().__init__()
        self.weight, self.scales, self.dtype = weight, scales, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].to(self.dtype) * self.scales[ids, None].to(self.dtype)


@torch.no_grad()
def quantize_model(model, scheme: str = "int8"):
    """Replace every linear layer (and the embedding / LM head) of `model` by its int8 version, in place."""
    if scheme not in SCHEMES:
        raise ConfigError(f"quantize={scheme!r} is not supported; expected one of {SCHEMES} or None")
    fused = _has_int8_kernel(model.device)
    dtype = model.dtype
    for layer in model.model.layers:
        for block, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                             (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                setattr(block, name, Int8Linear.from_linear(getattr(block, name), fused))  # frees the float weight

    embed_q, embed_scales = quantize_rows(model.model.embed_tokens.weight.data)
    embed_q, embed_scales = _int8_parameter(embed_q), _int8_parameter(embed_scales)
    if model.config.tie_word_embeddings:
        model.lm_head = Int8Linear(embed_q, embed_scales, None, fused)  # the same int8 rows serve both
    else:
        model.lm_head = Int8Linear.from_linear(model.lm_head, fused)
    model.model.embed_tokens = Int8Embedding(embed_q, embed_scales, dtype)
    model.quantization = scheme
    return model
