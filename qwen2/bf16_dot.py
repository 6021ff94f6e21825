"""bf16 products on CPUs that multiply bf16 themselves (AVX-512 BF16): decode through our
dot-product kernel, prompts through oneDNN, one plain copy of the weights.

torch's bf16 product of one row of x (oneDNN) streamed the weights at about half the rate our kernels
reach, and Inductor's frozen decode step pre-packs every weight into a second copy for it. Where our
kernels build with AVX-512 BF16, the decoder layers' linear layers and the LM head become
Bf16DotLinear: `torch.ops.qwen2.bf16_linear` takes up to nine rows of x at once (a decode step, a
speculative verification) as dot products along the weights' own rows (qwen2/csrc/bf16_dot.cpp), a
short prompt's up to 24 rows nine at a time, and hands longer prompts to at::linear. Being one
operator Inductor cannot see into, the compiled steps call it as it is: no packed copy. The math is
the product's: the same bf16 weights and x, float32 sums, one rounding to bf16 with the bias.
(CPUs without bf16 math: qwen2/upcast.py.)
"""

from __future__ import annotations

import torch
from torch import nn

from . import cpu_kernels
from .options import cpu_has_bfloat16_math
from .products import swap_products
from .upcast import SameWeightsLinear


class Bf16DotLinear(SameWeightsLinear):
    """nn.Linear (the same plain weight and bias) whose product is torch.ops.qwen2.bf16_linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.qwen2.bf16_linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)


def wants_bf16_dot(model) -> bool:
    """A bf16 model on a CPU with bf16 math, where our kernels are built with its dot products."""
    return (model.device.type == "cpu" and model.dtype == torch.bfloat16 and cpu_has_bfloat16_math()
            and cpu_kernels.blocks_available(model.device) and torch.ops.qwen2.bf16_dot_available())


def dot_products(model):
    """Swap the decoder layers' nn.Linear layers and the LM head for Bf16DotLinear, in place; the
    Parameters are the same objects (a tied embedding keeps sharing its table with the head)."""
    swap_products(model, lambda name, module: Bf16DotLinear.from_linear(module) if type(module) is nn.Linear else None)
    if type(model.lm_head) is nn.Linear:
        model.lm_head = Bf16DotLinear.from_linear(model.lm_head)
    return model
