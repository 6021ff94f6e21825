"""Per-layer figures of the compiled CPU decode step, read from a torch.profiler trace.

Forward hooks see nothing inside the compiled step (qwen2/cpu_compile.py): Inductor turned the
whole forward into one generated function, its small ops fused across block and even layer
boundaries. What a profiler still sees there are the matrix products: each is a library call
(aten::mm / addmm, the int8 and int4 kernels, oneDNN) or one of Inductor's GEMM templates (a named
range: the step is compiled with `cpp.enable_kernel_profile`). And the products come in the
model's order, by data dependence: layer i's q/k/v product before its attention, its o_proj after
it, its MLP's products after that, then layer i + 1, then the LM head. So a step's trace cut at
its products is the model cut at its blocks:

    [embedding + layer 0's norm] qkv [RoPE, cache write, attention] o_proj [residual, norm]
      gate_up [SwiGLU] down [residual, layer 1's norm] qkv ... down [residual, final norm] lm_head [cast]

A product's time goes to its block (attention or MLP). The time between two products (the fused
kernels Inductor generated there, and the generated wrapper's own Python) goes to the block it
sits in: the stretch before a layer's first product is its input norm (with the previous layer's
residual add fused into it; for layer 0, with the embedding lookup), between its q/k/v and o_proj products its attention, after o_proj
its post-attention norm, between its MLP products the MLP. What runs outside the compiled call
(dynamo's guards, copying the token into the step's buffers, the argmax) is "other".

The cut is checked, not assumed: a step's trace must hold exactly as many products as the model
has linear layers (per layer, its attention's and its MLP's; then the LM head), else the step gets
no figures and the reason says what was found.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# The generated function's range in a trace: its direct children are the step's kernels.
COMPILED_CALL = "## Call CompiledFxGraph"
# The events that are matrix products: library calls (int4: `quantized::int4mm_packed_weight_cpu`,
# what Inductor lowers torch's int4 kernel to; ours: `qwen2::int8_block_mm` / `int4_block_mm` /
# `bf16_panel_mm` / `bf16_linear`, not `qwen2::decode_attention`), and Inductor's C++ GEMM templates (named after
# the template, or plainly `graph_N_kernel` for its int8 weight-only template).
PRODUCT = re.compile(r"^(mkl|mkldnn|onednn|quantized)::|^qwen2::(\w+_mm|bf16_linear)$|"
                     r"^aten::(mm|addmm|bmm|_weight_int8pack_mm|_weight_int4pack_mm\w*)$|"
                     r"Gemm|_template|(^|_)gemm_|^graph_\d+_kernel$")


@dataclass(frozen=True)
class Layout:
    """How many products a decode step makes: per layer, its attention's and its MLP's, then one."""

    layers: int
    attention_products: int  # q, k, v (or one fused qkv) and o_proj
    mlp_products: int        # gate, up (or one fused gate_up) and down

    @property
    def per_layer(self) -> int:
        return self.attention_products + self.mlp_products

    @property
    def products(self) -> int:
        return self.layers * self.per_layer + 1  # + the LM head

    def product_block(self, p: int) -> tuple[str, int | None]:
        """The block (part, layer) product p of a step belongs to."""
        if p == self.layers * self.per_layer:
            return "lm_head", None
        layer, k = divmod(p, self.per_layer)
        return ("attention", layer) if k < self.attention_products else ("mlp", layer)

    def gap_block(self, p: int) -> tuple[str, int | None]:
        """The block the time just before product p belongs to."""
        if p == self.layers * self.per_layer:
            return "final_norm", None
        layer, k = divmod(p, self.per_layer)
        if k == 0:  # layer 0's: with the embedding lookup, which Inductor fuses into that norm
            return "input_layernorm", layer
        if k < self.attention_products:
            return "attention", layer
        if k == self.attention_products:
            return "post_attention_layernorm", layer
        return "mlp", layer


def _linear_layers(module: torch.nn.Module) -> int:
    """The linear layers directly in `module` (nn.Linear and the quantized ones alike)."""
    return sum(1 for child in module.children() if hasattr(child, "out_features"))


def layout_of(model) -> Layout:
    layers = list(model.model.layers)
    return Layout(len(layers), _linear_layers(layers[0].self_attn), _linear_layers(layers[0].mlp))


def step_parts(children, start: float, end: float, layout: Layout) -> dict[tuple[str, int | None], float]:
    """Seconds per (part, layer) of one compiled call lasting [start, end] (µs), from its direct
    children (profiler events with .name and .time_range, in µs). ValueError when the products found
    are not the model's."""
    products = sorted((e for e in children if PRODUCT.search(e.name)), key=lambda e: e.time_range.start)
    if len(products) != layout.products:
        names = sorted({e.name for e in products})
        raise ValueError(f"{len(products)} matrix products in the step's trace, the model has {layout.products} "
                         f"({layout.layers} layers x {layout.per_layer} + the LM head); found {names[:6]}")
    parts: dict[tuple[str, int | None], float] = {}

    def add(block, microseconds):
        parts[block] = parts.get(block, 0.0) + max(microseconds, 0.0) * 1e-6

    at = start
    for p, event in enumerate(products):
        add(layout.gap_block(p), event.time_range.start - at)
        add(layout.product_block(p), event.time_range.end - event.time_range.start)
        at = max(at, event.time_range.end)
    add(("lm_head", None), end - at)  # the logits' cast to float32 after the head's product
    return parts


def traced_step_parts(events, layout: Layout) -> list[dict[tuple[str, int | None], float]]:
    """step_parts for every compiled call in a trace (torch.profiler's `events()`), in call order."""
    calls = sorted((e for e in events if e.name.startswith(COMPILED_CALL)), key=lambda e: e.time_range.start)
    children: dict[int, list] = {id(call): [] for call in calls}
    for event in events:
        parent = event.cpu_parent
        if parent is not None and id(parent) in children:
            children[id(parent)].append(event)
    return [step_parts(children[id(call)], call.time_range.start, call.time_range.end, layout) for call in calls]


def profiler():
    """The profiler a traced run runs under: CPU events only, nothing recorded that is not used."""
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False,
                                  with_stack=False, profile_memory=False)
