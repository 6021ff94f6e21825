"""Weight-only int8 and int4: linear weights stored in fewer bits, activations in the model's dtype.

Decode reads every weight once per token, so its speed is bytes / bandwidth: halving the bytes of
bf16 nearly halves the time, as long as the kernel dequantises on the fly.

int8 on CPU, in blocks: each run of 32 weights along the input of a row shares one float16 scale
(llama.cpp's Q8_0 layout: 8.5 bits a weight). Our kernel (qwen2/cpu_kernels.py,
`torch.ops.qwen2.int8_block_mm`) rounds each block of 32 values of x to int16 against its own
scale (1 part in 65534 of the block's largest value) and sums each block's products as integers,
8 output channels at a time, for decode and prompts alike; the weights are stored in its panel
order (`to_panels`). Converting the weights to float32 instead was half as fast at decode
(docs/benchmarks.md).

    W[o, i] ~= scale[o, g] * q[o, i],   q in [-127, 127],   scale[o, g] = max_{i in g} |W[o, i]| / 127

int8 per channel, where that kernel is not built (no compiler, QWEN2_NO_KERNELS, a GPU): one scale
per output channel, `torch._weight_int8pack_mm` (int8 weights, bf16/fp32 activations):

    W[o, i] ~= scale[o] * q[o, i],   scale[o] = max_i |W[o, i]| / 127

Blocks cost 1/16 more bytes than per-channel int8 and bring int8 level with bf16 (on the real 0.5B
model KL from the float32 reference: blocks in a float32 model 6e-5 nats/token, llama.cpp's Q8_0
2.8e-4, per channel 7e-4; docs/benchmarks.md).

The tied embedding / LM head (27 % of Qwen2-0.5B) is quantized too: an embedding row and an LM-head
output channel are the same row, so both share one int8 tensor and one set of scales.

int4 (blocks, asymmetric): each run of 32 weights along the input of a row gets its own scale and
minimum, and every weight is one of 16 levels between them:

    W[o, i] ~= q[o, i] * scale[o, g] + min[o, g],   q in [0, 15],   g = i // 32

On CPU, in blocks with float16 scale and minimum (llama.cpp's Q4_1 layout: 5 bits a weight), our
kernel `torch.ops.qwen2.int4_block_mm` does the products, and like llama.cpp it rounds x too: each
block of 32 values of a row of x to int8 against its own scale, so that a block's products are summed
as integers, 8 output channels at a time (qwen2/csrc/int4_blocks.cpp). Converting nibbles to float
was the bottleneck; on the real 0.5B model this is 1.6x torch's int4 kernel for decode and 2.1x for
prompts (docs/benchmarks.md). Each block's scale and minimum are searched for the least squared error,
as llama.cpp does for Q4_K: on that model, 0.56x the KL of plain min..max; load_model weighs each
input's error by its size on a calibration chat (qwen2/calibration.py): another 0.96x. Where the
kernel is not built (or `blocks=False`, or group sizes 64 / 128), int4 is torch's
`_weight_int4pack_mm_for_cpu` in groups of `group_size` with the model's dtype for scale and zero
point, and x stays in that dtype.

With int4 the layers are int4 and the tied embedding / LM head stays int8 by default (`head="int8"`):
the head decides every token, and int4 there costs agreement for a fifth of the bytes; `head="int4"`
stores the LM head in int4 too (the embedding lookup keeps reading int8 rows, a few KB per token).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .cpu_kernels import BLOCK, PANEL
from .errors import ConfigError
from .options import QUANT_SCHEMES as SCHEMES  # the one list of schemes
from .options import cpu_has_bfloat16_math
from .products import swap_products
from .upcast import plain_layers

# Group size of int4 (weights per scale/min pair along the input dimension): 32, 64 or 128.
INT4_GROUP_SIZE = 32
INT4_BLOCKS_LAYOUT = f"blocks of {BLOCK}, x in int8"  # model.info.quant_layout of int4 through our kernel


def _round_to_int8(groups: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 groups (..., n) -> int8 (..., n) and one scale per group (...) in `scale_dtype`.

    The scale is rounded to its dtype before the weights are rounded against it, so q * scale is
    within half a step of every weight. (Rounding a bf16 scale afterwards would scale a whole row by
    up to 1 +- 2^-9: 8-19 % of int8's KL on two real replies of the 0.5B model, docs/benchmarks.md.)
    An all-zero group gets scale 1 (any scale will do)."""
    scales = (groups.abs().amax(-1) / 127.0).to(scale_dtype)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(groups / scales.float()[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> int8 (out, in) and per-row scales (out,) in the weight's dtype."""
    return _round_to_int8(weight.float(), weight.dtype)


def quantize_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> int8 (out, in) and float16 scales (out, in / BLOCK), one per block of
    BLOCK weights along the input."""
    out_features, in_features = weight.shape
    q, scales = _round_to_int8(weight.float().view(out_features, in_features // BLOCK, BLOCK), torch.float16)
    return q.view(out_features, in_features), scales


def to_panels(q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of int8 blocks (out, in) and their scales (out, in / BLOCK), out a multiple of 8 -> the
    int8 kernel's panel order (qwen2/csrc/int8_blocks.cpp): panel p, block b holds 16 runs of the
    8 channels' weights for two inputs each, and the 8 channels' scales side by side."""
    out_features, in_features = q.shape
    panels, blocks = out_features // 8, in_features // BLOCK
    q = q.view(panels, 8, blocks, BLOCK // 2, 2).permute(0, 2, 3, 1, 4)  # [panel, block, run, channel, 2]
    scales = scales.view(panels, 8, blocks).transpose(1, 2)  # [panel, block, channel]
    return q.reshape(out_features, in_features), scales.reshape(out_features, blocks)


def panel_rows(q: torch.Tensor, scales: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `rows` (any shape of indices) of a table in panel order, as plain int8 rows (..., in) and
    their scales (..., in / BLOCK): the embedding lookup of a tied table."""
    out_features, in_features = q.shape
    panels, blocks = out_features // 8, in_features // BLOCK
    flat = rows.reshape(-1)
    panel, channel = flat // 8, flat % 8
    picked = q.view(panels, blocks, BLOCK // 2, 8, 2)[panel, :, :, channel, :]  # (n, block, run, 2)
    picked_scales = scales.view(panels, blocks, 8)[panel, :, channel]  # (n, block)
    return picked.reshape(*rows.shape, in_features), picked_scales.reshape(*rows.shape, blocks)


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 rows (..., in) and their scales, per row (...) or per block (..., in / BLOCK), in `dtype`."""
    if scales.dim() == q.dim():  # blocks: float16 scales, multiplied in float32 and rounded once
        blocks = q.view(*q.shape[:-1], -1, BLOCK).float() * scales.float()[..., None]
        return blocks.view(q.shape).to(dtype)
    return q.to(dtype) * scales.to(dtype)[..., None]


def _fits_blocks(out_features: int, in_features: int) -> bool:
    """Whether our block kernels take an (out, in) weight: whole blocks along the input, whole panels
    of output channels."""
    return in_features % BLOCK == 0 and out_features % PANEL == 0


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


# Above this many rows of x, a CPU with bf16 math runs a dequantised copy and a bf16 GEMM faster
# than the fused int8 kernel (docs/benchmarks.md).
DEQUANTIZE_ABOVE_ROWS = 32


def fused_max_rows(device: torch.device) -> int | None:
    """Rows of x up to which the fused int8 kernel beats one dequantised copy and a float product
    (None: at any count). Where the CPU has bf16 math (AVX-512 BF16, AMX) a bf16 GEMM wins above
    ~32 rows; without it torch converts bf16 to fp32 inside the product, and the fused kernel was
    the faster one at every count from 1 to 512 rows (docs/benchmarks.md)."""
    if device.type == "cpu" and not cpu_has_bfloat16_math():
        return None
    return DEQUANTIZE_ABOVE_ROWS


class Int8Linear(nn.Module):
    """y = (x @ q^T) * scale + bias, with q int8 (out, in) and scale (out,)."""

    def __init__(self, weight: nn.Parameter, scales: nn.Parameter, bias: nn.Parameter | None, fused_kernel: bool,
                 max_fused_rows: int | None = DEQUANTIZE_ABOVE_ROWS):
        super().__init__()
        self.weight, self.scales, self.bias = weight, scales, bias
        self.fused_kernel, self.max_fused_rows = fused_kernel, max_fused_rows
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, fused_kernel: bool, max_fused_rows: int | None = DEQUANTIZE_ABOVE_ROWS) -> "Int8Linear":
        q, scales = quantize_rows(linear.weight.data)
        bias = linear.bias
        return cls(_int8_parameter(q), _int8_parameter(scales), bias, fused_kernel, max_fused_rows)

    def _fused(self, x: torch.Tensor) -> bool:
        # The fused kernel streams the int8 weights per block of rows of x: unbeatable for decode; for
        # a long prompt, where the CPU has bf16 math, one dequantised copy and a bf16 GEMM is faster.
        rows = x.numel() // x.shape[-1]
        return self.fused_kernel and (self.max_fused_rows is None or rows <= self.max_fused_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused(x):
            y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scales.to(x.dtype))
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight.to(x.dtype) * self.scales.to(x.dtype)[:, None])
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8, bias={self.bias is not None}"


class Int8BlockLinear(nn.Module):
    """y = x @ W^T + bias, W int8 with a float16 scale per block of BLOCK inputs, in the kernel's
    panel order (`to_panels`); x rounded to int16 per block, sums exact per block, then float32."""

    def __init__(self, weight: nn.Parameter, scales: nn.Parameter, bias: nn.Parameter | None):
        super().__init__()
        self.weight, self.scales, self.bias = weight, scales, bias
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8BlockLinear":
        q, scales = to_panels(*quantize_blocks(linear.weight.data))
        return cls(_int8_parameter(q), _int8_parameter(scales), linear.bias)

    def dequantize(self) -> torch.Tensor:
        """The float32 (out, in) weight this layer computes with."""
        return dequantize(*panel_rows(self.weight, self.scales, torch.arange(self.out_features)), torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.qwen2.int8_block_mm(x.reshape(-1, self.in_features), self.weight, self.scales)
        y = y.view(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 blocks of {BLOCK}, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """Row lookup of an int8 table, scaled back by the row's scales (one per row, or per block; a
    table in blocks is in the kernel's panel order, shared with a tied LM head)."""

    def __init__(self, weight: nn.Parameter, scales: nn.Parameter, dtype: torch.dtype):
        super().__init__()
        self.weight, self.scales, self.dtype = weight, scales, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.scales.dim() == 2:  # blocks, in panels
            return dequantize(*panel_rows(self.weight, self.scales, ids), self.dtype)
        return dequantize(self.weight[ids], self.scales[ids], self.dtype)


# ----------------------------------------------------------------------------- int4


def quantize_int4_blocks(weight: torch.Tensor, importance: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float weight, out a multiple of 8 -> packed levels (out, in / 2) uint8, float16 scales
    and minimums (out, in / BLOCK), by our kernel library: per block the scale and minimum of least
    squared error among 22 candidates, each input's error weighted by `importance` (in,) where given,
    rounded to float16 before the levels are set. All three are in the kernel's panel order (8 output
    channels interleaved; qwen2/csrc/int4_blocks.cpp), not [o, i]: dequantize_int4_blocks reads them back."""
    return torch.ops.qwen2.quantize_int4_blocks(weight, importance)


def dequantize_int4_blocks(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """The float32 (out, in) weight that quantize_int4_blocks' output stands for."""
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    panels, blocks = out_features // 8, in_features // BLOCK
    runs = packed.view(panels, blocks, 4, 8, 4)  # [panel, block, run, channel, j]
    levels = torch.stack([runs & 15, runs >> 4], 3)  # [panel, block, run, half, channel, j]: input 8 run + 4 half + j
    levels = levels.permute(0, 4, 1, 2, 3, 5).reshape(out_features, blocks, BLOCK).float()

    def by_channel(t):  # [panel, block, channel] -> [o, block]
        return t.view(panels, blocks, 8).transpose(1, 2).reshape(out_features, blocks).float()

    return (levels * by_channel(scales)[..., None] + by_channel(mins)[..., None]).view(out_features, in_features)


class Int4BlockLinear(nn.Module):
    """y = x @ W^T + bias, W int4 in blocks of BLOCK inputs with float16 scale and minimum; x is
    rounded to int8 per block inside the kernel and the sums are float32 (see the module docstring)."""

    def __init__(self, weight: nn.Parameter, scales: nn.Parameter, mins: nn.Parameter, bias: nn.Parameter | None):
        super().__init__()
        self.weight, self.scales, self.mins, self.bias = weight, scales, mins, bias
        self.in_features, self.out_features = weight.shape[1] * 2, weight.shape[0]

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias, importance: torch.Tensor | None = None) -> "Int4BlockLinear":
        return cls(*(_int8_parameter(t) for t in quantize_int4_blocks(weight, importance)), bias)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4_blocks(self.weight, self.scales, self.mins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.qwen2.int4_block_mm(x.reshape(-1, self.in_features), self.weight, self.scales, self.mins)
        y = y.view(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, int4 blocks of {BLOCK} (x in int8), "
                f"bias={self.bias is not None}")


def quantize_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> levels q (out, in) int32 in [0, 15], scale and min (out, in / group_size)."""
    out_features, in_features = weight.shape
    w = weight.float().view(out_features, in_features // group_size, group_size)
    low, high = w.amin(-1), w.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.view(out_features, in_features), scale, low


@functools.cache
def _pack_block() -> int:
    """Rows per block of this CPU's int4 layout: 64 with AVX-512, 32 with AVX2 (torch packs for the
    vector width it runs on), 2 where rows simply pair up. Read off a probe: the row that shares
    row 0's byte is half a block away."""
    probe = torch.zeros(64, 2, dtype=torch.int32)
    probe[1], probe[16], probe[32] = 1, 2, 3
    partner = int(torch._convert_weight_to_int4pack_for_cpu(probe, 1)[0, 0]) >> 4
    return {1: 2, 2: 32, 3: 64}[partner]


def _pack_block_rows(n: int) -> list[int]:
    """Rows per block of the int4 CPU layout: full blocks while they last, then the rest as one block."""
    block = _pack_block()
    return [block] * (n // block) + ([n % block] if n % block else [])


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of torch._convert_weight_to_int4pack_for_cpu: (out, in / 2) uint8 -> (out, in) levels.

    That layout stores each block of rows (64 or 32, _pack_block; then the remaining rows as one
    block) k-major, two rows per byte: in a full block of B, rows j and j + B/2 share a byte (low,
    high nibble); in the remainder, rows 2j and 2j + 1.
    """
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    rows, start, full = [], 0, _pack_block()
    for n in _pack_block_rows(out_features):
        block = packed[start:start + n].reshape(in_features, n // 2)  # (in, n / 2)
        low, high = block & 15, block >> 4
        if n == full:
            levels = torch.cat([low, high], -1)
        else:
            levels = torch.stack([low, high], -1).view(in_features, n)
        rows.append(levels.t())
        start += n
    return torch.cat(rows).to(torch.uint8)


def _choose_group_size(in_features: int, group_size: int) -> int:
    while group_size >= 16 and in_features % group_size:
        group_size //= 2
    if group_size < 16:
        raise ConfigError(f"int4 needs an input size divisible by 16 or more; got {in_features}")
    return group_size


class Int4Linear(nn.Module):
    """y = x @ W^T + bias with W stored as group-wise int4 (see the module docstring).

    `weight` is the kernel's packed (out, in / 2) uint8 tensor; `scales_and_zeros` (in / group, out, 2)
    holds each group's scale and the kernel's zero point, min + 8 * scale (the kernel reads a level
    q as (q - 8) * scale + zero).
    """

    def __init__(self, weight: nn.Parameter, scales_and_zeros: nn.Parameter, bias: nn.Parameter | None,
                 group_size: int, in_features: int):
        super().__init__()
        self.weight, self.scales_and_zeros, self.bias = weight, scales_and_zeros, bias
        self.group_size, self.in_features, self.out_features = group_size, in_features, weight.shape[0]

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias, group_size: int = INT4_GROUP_SIZE) -> "Int4Linear":
        out_features, in_features = weight.shape
        if out_features % 16:
            raise ConfigError(f"int4 needs an output size divisible by 16; got {out_features}")
        group_size = _choose_group_size(in_features, group_size)
        q, scale, low = quantize_groups(weight, group_size)
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        scales_and_zeros = torch.stack([scale.t(), (low + 8 * scale).t()], -1).contiguous().to(weight.dtype)
        return cls(_int8_parameter(packed), _int8_parameter(scales_and_zeros), bias, group_size, in_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> "Int4Linear":
        return cls.from_weight(linear.weight.data, linear.bias, group_size)

    def dequantize(self) -> torch.Tensor:
        """The float (out, in) weight this layer computes with, in its scales' dtype."""
        sz = self.scales_and_zeros.float()  # (groups, out, 2)
        scale, zero = sz[..., 0].t(), sz[..., 1].t()  # (out, groups)
        levels = unpack_int4(self.weight).float().view(self.out_features, -1, self.group_size)
        w = (levels - 8) * scale[..., None] + zero[..., None]
        return w.view(self.out_features, self.in_features).to(self.scales_and_zeros.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features), self.weight, self.group_size,
                                              self.scales_and_zeros.to(x.dtype))
        y = y.view(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, int4 group={self.group_size}, "
                f"bias={self.bias is not None}")


@torch.no_grad()
def quantize_model(model, scheme: str = "int8", group_size: int = INT4_GROUP_SIZE, head: str | None = None,
                   blocks: bool | None = None, importance: dict[str, torch.Tensor] | None = None):
    """Replace every linear layer (and the embedding / LM head) of `model` by its quantized version, in place.

    scheme "int8" or "int4". `head` is how the LM head is stored: "int8" (the default for both
    schemes) or "int4"; the embedding is int8 either way. blocks: store in blocks of 32 through our
    CPU kernels (True: int8 as Q8_0, int4 as Q4_1 with x rounded to int8), or in torch's layouts
    (False: int8 per channel, int4 in groups of `group_size`); None picks blocks wherever the kernels
    are built. int4 in blocks has groups of 32 only; another `group_size` means torch's layout.
    importance: {qualified name of a decoder layer's product: (in,) weights}, how much each input's
    error counts in int4 blocks' rounding (qwen2/calibration.py); None counts every input alike.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"quantize={scheme!r} is not supported; expected one of {SCHEMES} or None")
    head = head or "int8"
    if head not in ("int8", "int4"):
        raise ConfigError(f"head={head!r} is not supported; expected 'int8' or 'int4'")
    if scheme == "int4" or head == "int4":
        if model.device.type != "cpu":
            raise ConfigError(f"int4 weights need the CPU kernel; this model is on {model.device}")
        if group_size not in (32, 64, 128):
            raise ConfigError(f"int4 group_size must be 32, 64 or 128; got {group_size}")
    available = cpu_kernels.blocks_available(model.device)
    blocks = available if blocks is None else blocks
    if blocks and not available:
        why = f"this model is on {model.device}" if model.device.type != "cpu" else cpu_kernels.kernel_error()
        raise ConfigError(f"blocks=True needs our CPU kernels (qwen2/cpu_kernels.py): {why}")
    int4_blocks = blocks and group_size == BLOCK
    fused, rows = _has_int8_kernel(model.device), fused_max_rows(model.device)
    dtype = model.dtype

    def int8(linear: nn.Linear) -> nn.Module:
        if blocks and _fits_blocks(linear.out_features, linear.in_features):
            return Int8BlockLinear.from_linear(linear)
        return Int8Linear.from_linear(linear, fused, rows)

    def int4(weight: torch.Tensor, bias, weighing: torch.Tensor | None = None) -> nn.Module:
        if int4_blocks and _fits_blocks(*weight.shape):
            return Int4BlockLinear.from_weight(weight, bias, weighing)
        return Int4Linear.from_weight(weight, bias, group_size)

    importance, weighed = importance or {}, []

    def quantized(name: str, linear: nn.Module) -> nn.Module | None:  # fused or not
        if not isinstance(linear, nn.Linear):
            return None
        weighing = importance.get(name)
        new = int4(linear.weight.data, linear.bias, weighing) if scheme == "int4" else int8(linear)
        if weighing is not None and isinstance(new, Int4BlockLinear):
            weighed.append(name)
        return new

    plain_layers(model)  # a bf16 model's panel layers (qwen2/upcast.py) back to nn.Linear first
    swap_products(model, quantized)

    embedding = model.model.embed_tokens.weight.data
    embed_blocks = blocks and _fits_blocks(*embedding.shape)
    embed_q, embed_scales = to_panels(*quantize_blocks(embedding)) if embed_blocks else quantize_rows(embedding)
    embed_q, embed_scales = _int8_parameter(embed_q), _int8_parameter(embed_scales)
    if head == "int4":
        model.lm_head = int4(model.lm_head.weight.data, None)
    elif model.config.tie_word_embeddings:  # the same int8 rows serve both
        model.lm_head = (Int8BlockLinear(embed_q, embed_scales, None) if embed_blocks
                         else Int8Linear(embed_q, embed_scales, None, fused, rows))
    else:
        model.lm_head = int8(model.lm_head)
    model.model.embed_tokens = Int8Embedding(embed_q, embed_scales, dtype)
    model.info.quantization = scheme
    if scheme == "int4":
        model.info.quant_layout = INT4_BLOCKS_LAYOUT if int4_blocks else f"groups of {group_size}"
        model.info.quant_weighed = bool(weighed)
    else:
        model.info.quant_layout = f"blocks of {BLOCK}" if blocks else "per channel"
    return model
