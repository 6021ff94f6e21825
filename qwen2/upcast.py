"""bf16 weights, float32 products, on CPUs without bf16 math.

Without AVX-512 BF16 or AMX, torch multiplies bf16 matrices by converting them as it goes, several
times slower than a float32 GEMM of the same shape: a 47-token prompt's products took 82 ms per
layer of the 0.5B model in bf16 against 28 ms in float32 (docs/benchmarks.md).

Where our CPU kernels build (qwen2/cpu_kernels.py), the decoder layers' linear layers become
Bf16PanelLinear: bf16 weights in the kernel's panel order, widened to float32 in registers and
summed in float32 for any number of rows (qwen2/csrc/bf16_panels.cpp): decode reads the bf16
bytes, and prompts need no float32 copy (docs/benchmarks.md). Elsewhere they become UpcastLinear:
above UPCAST_ABOVE_ROWS rows a linear layer with bf16 weights copies them into a float32 scratch
buffer and multiplies in float32, then rounds the output back to bf16. The copy costs ~2 ms per layer
because the buffer is reused (one for the process, 16 MB; larger layers go in slices): a fresh
35 MB tensor costs ten times that in page faults alone. A decode step (a few rows) keeps the bf16
product, which reads half the bytes; so does anything compiled (the compiled decode steps and the
verification). The math is unchanged: the same weights, float32 accumulation either way.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .options import cpu_has_bfloat16_math
from .products import swap_products

# Rows of x above which the float32 product wins, copy included (the 0.5B model's four products per
# layer, 2 threads, AMD EPYC AVX2: bf16 ahead at 8 rows; float32 1.3x faster at 16, 2.6x at 47;
# docs/benchmarks.md)
UPCAST_ABOVE_ROWS = 16

# Weights copied to float32 at a time: products of larger layers run in slices of output channels,
# so the buffer stays 16 MB whatever the model (7B's gate|up would need 543 MB in one piece).
COPY_WEIGHTS = 1 << 22


class _Scratch:
    """One float32 buffer for the process and a lock: a buffer per thread would keep one alive per
    web worker thread that ever ran a prompt, and prompts are compute-bound on a CPU anyway, so they
    take turns. Made outside inference mode, so that it can be written in it and out of it."""

    def __init__(self):
        self.lock = threading.Lock()
        with torch.inference_mode(False):
            self.buffer = torch.empty(COPY_WEIGHTS, dtype=torch.float32)

    def float32_copy(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (at most COPY_WEIGHTS values) in float32, in the buffer (valid while the lock is held)."""
        return self.buffer[:weight.numel()].view(weight.shape).copy_(weight)


_scratch = _Scratch()


class SameWeightsLinear(nn.Linear):
    """An nn.Linear subclass made from an nn.Linear: the same Parameter objects (a tie stays a tie),
    another forward."""

    @classmethod
    def from_linear(cls, linear: nn.Linear):
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        return new


class UpcastLinear(SameWeightsLinear):
    """nn.Linear whose products of more than UPCAST_ABOVE_ROWS rows run in float32 (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Dynamo reads is_dynamo_compiling() as True while it traces (and only then, on any thread):
        # compiled code keeps the bf16 product, and the row test below never guards a symbolic batch.
        if torch.compiler.is_dynamo_compiling() or x.numel() // x.shape[-1] <= UPCAST_ABOVE_ROWS:
            return F.linear(x, self.weight, self.bias)
        x32 = x.float()
        y = torch.empty(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)
        step = max(1, COPY_WEIGHTS // self.in_features)  # output channels per slice
        with _scratch.lock:
            for start in range(0, self.out_features, step):
                weight = _scratch.float32_copy(self.weight[start:start + step])
                bias = None if self.bias is None else self.bias[start:start + step].float()
                y[..., start:start + step] = F.linear(x32, weight, bias)
        return y


def to_panels(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) weight, out a multiple of 8 -> the bf16 kernel's panel order: panel p is `in` runs of
    the 8 channels' weights for one input each."""
    out_features, in_features = weight.shape
    return weight.view(out_features // 8, 8, in_features).transpose(1, 2).reshape(out_features, in_features)


class Bf16PanelLinear(nn.Module):
    """y = x @ W^T + bias, W bf16 in the kernel's panel order (`to_panels`), summed in float32 for any
    number of rows (module docstring); the output is rounded to x's dtype, then the bias added."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Bf16PanelLinear":
        return cls(nn.Parameter(to_panels(linear.weight.data), requires_grad=False), linear.bias)

    def plain_weight(self) -> torch.Tensor:
        """The (out, in) weight, as nn.Linear holds it."""
        panels = self.weight.view(self.out_features // 8, self.in_features, 8)
        return panels.transpose(1, 2).reshape(self.out_features, self.in_features)

    def as_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = nn.Parameter(self.plain_weight(), requires_grad=False), self.bias
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.qwen2.bf16_panel_mm(x.reshape(-1, self.in_features), self.weight)
        y = y.view(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bf16 in panels, bias={self.bias is not None}"


class Bf16PanelEmbedding(nn.Module):
    """Row lookup of a bf16 table held in the kernel's panel order: the embedding of a model whose
    tied LM head is a Bf16PanelLinear, so that both read the one copy of the table."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return panel_rows(self.weight, ids)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}, bf16 in panels"


def panel_rows(panels: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` (indices, any shape) of an (out, in) weight held in panel order: (..., in)."""
    out_features, in_features = panels.shape
    flat = rows.reshape(-1)
    picked = panels.view(out_features // 8, in_features, 8)[flat // 8, :, flat % 8]  # (n, in)
    return picked.reshape(*rows.shape, in_features)


def wants_upcast(model) -> bool:
    """A bf16 model on a CPU that converts bf16 products as it goes."""
    return model.device.type == "cpu" and model.dtype == torch.bfloat16 and not cpu_has_bfloat16_math()


def _fits_panels(linear: nn.Linear) -> bool:
    return linear.out_features % cpu_kernels.PANEL == 0 and linear.in_features % 8 == 0  # the kernel's 8 FMA chains


def float32_products(model):
    """Swap the decoder layers' linear layers for Bf16PanelLinear where our kernels build and the
    shapes fit their panels, else for UpcastLinear, in place. The LM head becomes a Bf16PanelLinear
    too where the kernels build (a decode step reads all of it: a quarter of the 0.5B model's bytes);
    a tied embedding then reads its rows out of the head's panels (Bf16PanelEmbedding). Without the
    kernels the head stays as it is: a prompt needs its last row only."""
    panels = cpu_kernels.blocks_available(model.device)

    def products(name, module):
        if type(module) is nn.Linear:
            return (Bf16PanelLinear if panels and _fits_panels(module) else UpcastLinear).from_linear(module)
        return None

    swap_products(model, products)
    head = model.lm_head
    if panels and type(head) is nn.Linear and _fits_panels(head):
        tied = head.weight is model.model.embed_tokens.weight
        model.lm_head = Bf16PanelLinear.from_linear(head)
        if tied:
            model.model.embed_tokens = Bf16PanelEmbedding(model.lm_head.weight)
    return model


def plain_layers(model):
    """Undo float32_products' panels, in place: nn.Linear layers and head, nn.Embedding (quantize_model
    starts from these)."""
    swap_products(model, lambda name, module: module.as_linear() if isinstance(module, Bf16PanelLinear) else None)
    if isinstance(model.lm_head, Bf16PanelLinear):
        model.lm_head = model.lm_head.as_linear()
        if isinstance(model.model.embed_tokens, Bf16PanelEmbedding):
            embedding = nn.Embedding(*model.lm_head.weight.shape, device="meta")
            embedding.weight = model.lm_head.weight
            model.model.embed_tokens = embedding
    return model
