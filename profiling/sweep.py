"""Context sweep: decode speed and KV-cache memory against context length (clean runs)."""

from __future__ import annotations

from qwen2.cache import kv_bytes_per_token

from .memory import PeakMemory
from .prompts import seeded_prompt_ids
from .steps import timed_run
from .timers import summarize


def run_sweep(model, contexts, steps: int, clock, seed: int = 0, plan=None) -> list[dict]:
    """For each context length: prefill that many tokens, then time `steps` decode steps."""
    device = model.device
    per_token = kv_bytes_per_token(model.config, model.dtype)
    on_step = (lambda: plan.advance(1)) if plan is not None else None
    points = []
    for ctx in contexts:
        if plan is not None:
            plan.stage(f"sweep: context {ctx}")
        ids = seeded_prompt_ids(model.config.vocab_size, ctx, device, seed)
        with PeakMemory(device) as peak:
            times = timed_run(model, ids, steps, clock, on_step=on_step)
        stats = summarize(times.step_s, 1e3)
        points.append({
            "context_tokens": ctx,
            "decode_steps": steps,
            "decode_tokens_per_s": 1e3 / stats["median"] if stats and stats["median"] else None,
            "decode_step_ms": stats,
            "prefill_ms": times.prefill_s * 1e3,
            "prefill_tokens_per_s": ctx / times.prefill_s if times.prefill_s > 0 else None,
            "kv_cache_bytes": per_token * ctx,
            "kv_cache_used_bytes": times.kv_used_bytes,
            "kv_cache_allocated_bytes": times.kv_allocated_bytes,
            "peak_bytes": peak.peak_bytes,
        })
    return points
