"""Forward hooks that time (and optionally label) the model's blocks from the outside.

The model has no timing code: `ModuleHooks` attaches forward pre/post hooks to the embedding,
each decoder layer's input_layernorm / self_attn / post_attention_layernorm / mlp, the final
norm and the LM head, and removes every hook on exit. With a clock, each hook records one mark
(a perf_counter reading, or a CUDA event: no synchronize inside a hook). With labels=True, each
block and each whole layer also runs inside a torch.profiler record_function range, so traces
show "layers.3.self_attn" and friends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.profiler import record_function

# block attribute on a DecoderLayer -> the name used in run files
LAYER_BLOCKS = {
    "input_layernorm": "input_layernorm",
    "self_attn": "attention",
    "post_attention_layernorm": "post_attention_layernorm",
    "mlp": "mlp",
}


@dataclass(frozen=True)
class Site:
    part: str            # "embedding", "attention", "mlp", ..., "final_norm", "lm_head", "layer"
    layer: int | None    # decoder layer index, None for model-level parts
    label: str           # the module's qualified name, e.g. "model.layers.0.self_attn"
    module: torch.nn.Module
    timed: bool = True   # False: label only (whole layers, which would double count)


def decoder_layers(model) -> list[torch.nn.Module]:
    return list(model.model.layers)


def sites(model) -> list[Site]:
    """Every block the profiler hooks, in execution order."""
    out = [Site("embedding", None, "model.embed_tokens", model.model.embed_tokens)]
    for i, layer in enumerate(decoder_layers(model)):
        out.append(Site("layer", i, f"model.layers.{i}", layer, timed=False))
        for attr, part in LAYER_BLOCKS.items():
            out.append(Site(part, i, f"model.layers.{i}.{attr}", getattr(layer, attr)))
    out.append(Site("final_norm", None, "model.norm", model.model.norm))
    out.append(Site("lm_head", None, "lm_head", model.lm_head))
    return out


class ModuleHooks:
    """Context manager attaching timing and/or record_function hooks; removes them on exit.

    Per step: `start_step()` before the call, `clock.finish()` after it, then `collect()` gives
    {(part, layer): seconds} summed over the calls in that step.
    """

    def __init__(self, model, clock=None, labels: bool = False):
        self.model = model
        self.clock = clock
        self.labels = labels
        self.sites = [s for s in sites(model) if labels or s.timed]
        self._handles: list = []
        self._open: dict[int, object] = {}
        self._ranges: dict[int, list] = {}
        self._marks: list[tuple[Site, object, object]] = []

    # -- attach / detach ---------------------------------------------------------------------
    def __enter__(self) -> "ModuleHooks":
        try:
            for site in self.sites:
                self._handles.append(site.module.register_forward_pre_hook(self._pre(site)))
                self._handles.append(site.module.register_forward_hook(self._post(site)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for stack in self._ranges.values():  # ranges left open by an exception inside a block
            while stack:
                stack.pop().__exit__(None, None, None)
        self._ranges.clear()
        self._open.clear()

    def _pre(self, site: Site):
        key = id(site)
        clock = self.clock if site.timed else None
        labels = self.labels

        def hook(module, args):
            if labels:
                rf = record_function(site.label)
                rf.__enter__()
                self._ranges.setdefault(key, []).append(rf)
            if clock is not None:
                self._open[key] = clock.mark()

        return hook

    def _post(self, site: Site):
        key = id(site)
        clock = self.clock if site.timed else None
        labels = self.labels

        def hook(module, args, output):
            if clock is not None:
                start = self._open.pop(key, None)
                if start is not None:
                    self._marks.append((site, start, clock.mark()))
            if labels:
                stack = self._ranges.get(key)
                if stack:
                    stack.pop().__exit__(None, None, None)

        return hook

    # -- per step ----------------------------------------------------------------------------
    def start_step(self) -> None:
        self._marks.clear()
        self._open.clear()

    def collect(self) -> dict[tuple[str, int | None], float]:
        """Seconds per (part, layer) for the step just finished (call after clock.finish())."""
        out: dict[tuple[str, int | None], float] = {}
        for site, start, end in self._marks:
            key = (site.part, site.layer)
            out[key] = out.get(key, 0.0) + self.clock.seconds(start, end)
        return out
