"""The decoder layers' linear products by their qualified names ("model.layers.3.mlp.down_proj"):
one walk for everything that swaps them for another layout (qwen2/upcast.py, bf16_dot.py, quant.py)
or reads their inputs (calibration.py), so the names mean the same module everywhere."""

from __future__ import annotations

from typing import Callable

from torch import nn


def decoder_products(model) -> dict[str, nn.Module]:
    """{qualified name: module} of every linear product of the decoder layers (attention, then MLP,
    layer by layer), whatever class holds it (nn.Linear, panels, quantized)."""
    return {f"model.layers.{i}.{block}.{name}": module
            for i, layer in enumerate(model.model.layers) for block in ("self_attn", "mlp")
            for name, module in getattr(layer, block).named_children() if hasattr(module, "in_features")}


def swap_products(model, make: Callable[[str, nn.Module], nn.Module | None]) -> None:
    """Put make(name, module) in place of each decoder product where it returns a module (None keeps
    the product as it is), in place."""
    for name, module in decoder_products(model).items():
        new = make(name, module)
        if new is not None:
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent), attribute, new)
