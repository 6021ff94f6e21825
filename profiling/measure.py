"""`profile_model`: one profiling run of a loaded qwen2 model, returned as a JSON-ready dict.

Order: warm up (with and without hooks) -> a clean run (no hooks: the speed figures) -> the same
run with timing hooks (per-block figures; their cost against the clean run is the
instrumentation overhead) -> optional torch.profiler trace, context sweep, transformers baseline.
"""

from __future__ import annotations

import math

import torch

from . import runfile
from .device import dtype_name, memory_bandwidth_limit
from .environment import environment
from .errors import ProfilingError
from .hooks import LAYER_BLOCKS, ModuleHooks
from .memory import PeakMemory, parameter_count, weight_bytes
from .progress import Plan
from .steps import has_fast_decode, prompt_ids, quantization, timed_run
from .timers import make_clock, summarize

DECODE_PATH_NOTE = ("eager DecodeSession (compiled=False): forward hooks do not fire inside CUDA "
                    "graphs or torch.compile regions, so all figures here come from the eager path")
TRACE_DECODE_STEPS = 4


# -- input checks ----------------------------------------------------------------------------
def _check_count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ProfilingError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def model_info(model) -> dict:
    cfg = model.config
    heads = int(cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    quantize = quantization(model)
    return {
        "source": str(getattr(model, "source", "")),
        "random_weights": bool(getattr(model, "random_weights", False)),
        "quantize": quantize,
        "num_layers": int(cfg.num_hidden_layers),
        "hidden_size": int(cfg.hidden_size),
        "intermediate_size": int(getattr(cfg, "intermediate_size", 0) or 0),
        "num_attention_heads": heads,
        "num_key_value_heads": int(getattr(cfg, "num_key_value_heads", None) or heads),
        "head_dim": int(head_dim),
        "vocab_size": int(cfg.vocab_size),
        "max_position_embeddings": int(cfg.max_position_embeddings),
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "parameters": parameter_count(model),
    }


def check_context(prompt_tokens: int, new_tokens: int, max_positions: int, what="prompt") -> None:
    if prompt_tokens + new_tokens > max_positions:
        raise ProfilingError(
            f"{what} of {prompt_tokens} tokens + {new_tokens} new tokens = "
            f"{prompt_tokens + new_tokens} exceeds the model's context of {max_positions} tokens")


def parse_sweep(sweep) -> list[int] | None:
    """None, "128,512,2048" or a list of ints -> sorted unique context lengths."""
    if sweep is None or sweep == "" or sweep == []:
        return None
    items = sweep.split(",") if isinstance(sweep, str) else list(sweep)
    out = []
    for item in items:
        try:
            value = int(str(item).strip())
        except ValueError:
            raise ProfilingError(f"sweep context lengths must be integers, got {item!r}") from None
        if value < 1:
            raise ProfilingError(f"sweep context lengths must be >= 1, got {value}")
        out.append(value)
    return sorted(set(out))


def sweep_steps(new_tokens: int) -> int:
    return max(3, min(new_tokens, 16))


# -- aggregation -----------------------------------------------------------------------------
def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _mean_parts(steps: list[dict]) -> dict:
    total: dict = {}
    for parts in steps:
        for key, sec in parts.items():
            total[key] = total.get(key, 0.0) + sec
    return {key: sec / len(steps) for key, sec in total.items()} if steps else {}


def _layer_entry(parts: dict, i: int) -> dict:
    entry = {f"{part}_ms": _ms(parts.get((part, i), 0.0)) for part in LAYER_BLOCKS.values()}
    entry["total_ms"] = sum(entry.values())
    return entry


def _breakdown(parts: dict, step_s: float, num_layers: int) -> dict:
    sums = {part: 0.0 for part in LAYER_BLOCKS.values()}
    for (part, layer), sec in parts.items():
        if layer is not None:
            sums[part] += sec
    out = {
        "step_ms": _ms(step_s),
        "embedding_ms": _ms(parts.get(("embedding", None), 0.0)),
        "attention_ms": _ms(sums["attention"]),
        "mlp_ms": _ms(sums["mlp"]),
        "norms_ms": _ms(sums["input_layernorm"] + sums["post_attention_layernorm"]
                        + parts.get(("final_norm", None), 0.0)),
        "final_norm_ms": _ms(parts.get(("final_norm", None), 0.0)),
        "lm_head_ms": _ms(parts.get(("lm_head", None), 0.0)),
        "layers_ms": _ms(sum(sums.values())),
    }
    accounted = (sum(sums.values()) + parts.get(("embedding", None), 0.0)
                 + parts.get(("final_norm", None), 0.0) + parts.get(("lm_head", None), 0.0))
    out["accounted_ms"] = _ms(accounted)
    out["other_ms"] = _ms(step_s - accounted)
    out["accounted_fraction"] = accounted / step_s if step_s > 0 else None
    return out


def _weights_read_per_token(model, weights: int) -> int:
    """Bytes of weights one decode step reads: all of them, except that an untied embedding
    table is only read one row at a time."""
    embed = model.model.embed_tokens.weight
    lm_head = getattr(getattr(model, "lm_head", None), "weight", None)
    tied = lm_head is not None and lm_head.data_ptr() == embed.data_ptr()
    if tied:
        return weights
    table = embed.numel() * embed.element_size()
    return weights - table + embed.shape[-1] * embed.element_size()


def _bandwidth(model, weights: int, kv_per_token: int, prompt_tokens: int, new_tokens: int,
               median_step_s: float | None, limit: float, limit_source: str) -> dict:
    weights_read = _weights_read_per_token(model, weights)
    # decode step i (0-based) attends over prompt + i + 1 positions (its own K/V included)
    mean_context = prompt_tokens + (new_tokens + 1) / 2
    kv_read = kv_per_token * mean_context
    per_token = weights_read + kv_read
    achieved = per_token / median_step_s if median_step_s else None
    return {
        "bytes_per_token": per_token,
        "weights_read_bytes": weights_read,
        "kv_read_bytes": kv_read,
        "mean_context_tokens": mean_context,
        "achieved_bytes_per_s": achieved,
        "limit_bytes_per_s": limit,
        "limit_source": limit_source,
        "roofline_fraction": achieved / limit if achieved and limit else None,
        "roofline_tokens_per_s": limit / per_token if limit else None,
        "model": "weights read once per token + K/V of the positions attended (static-cache "
                 "slots beyond the current length are not counted)",
    }


# -- the run ---------------------------------------------------------------------------------
def profile_model(model, *, prompt_tokens: int = 32, new_tokens: int = 8, warmup: int = 1,
                  baseline: str | None = None, sweep=None, trace_dir=None, progress=None,
                  seed: int = 0) -> dict:
    """Profile one loaded qwen2 model on its own device and dtype; return the run dict.

    progress: optional callable(fraction: float, desc: str).
    baseline: None or "transformers". sweep: None, "128,512" or a list of context lengths.
    trace_dir: write a torch.profiler trace (TensorBoard + Perfetto) under this directory.
    """
    _check_count("prompt_tokens", prompt_tokens)
    _check_count("new_tokens", new_tokens)
    _check_count("warmup", warmup, minimum=0)
    info = model_info(model)
    check_context(prompt_tokens, new_tokens, info["max_position_embeddings"])
    contexts = parse_sweep(sweep)
    k = sweep_steps(new_tokens)
    for ctx in contexts or []:
        check_context(ctx, k, info["max_position_embeddings"], what="sweep context")
    if baseline not in (None, "", "none"):
        from .baseline import check_baseline

        check_baseline(baseline)
    else:
        baseline = None

    device = torch.device(model.device) if not isinstance(model.device, torch.device) \
        else model.device
    dtype = model.dtype
    warm_steps = min(new_tokens, 2)
    units = (warmup * 2 * (1 + warm_steps) + 2 * (1 + new_tokens)
             + (len(contexts) * (1 + k) if contexts else 0)
             + ((2 + TRACE_DECODE_STEPS) if trace_dir else 0) + (10 if baseline else 0) + 1)
    plan = Plan(progress, units)

    ids = prompt_ids(info["vocab_size"], prompt_tokens, device, seed)
    clock = make_clock(device)
    tick = lambda: plan.advance(1)  # noqa: E731
    weights = weight_bytes(model)

    with torch.inference_mode():
        plan.stage("measuring memory bandwidth")
        limit, limit_source = memory_bandwidth_limit(device)
        plan.advance(1)

        for i in range(warmup):
            plan.stage(f"warm-up {i + 1}/{warmup}")
            timed_run(model, ids, warm_steps, clock, on_step=tick)
            with ModuleHooks(model, clock) as hooks:
                timed_run(model, ids, warm_steps, clock, hooks=hooks, on_step=tick)

        with PeakMemory(device) as peak:
            plan.stage("timing prefill + decode (no hooks)")
            clean = timed_run(model, ids, new_tokens, clock, on_step=tick)
            plan.stage("timing per block (hooks)")
            with ModuleHooks(model, clock) as hooks:
                hooked = timed_run(model, ids, new_tokens, clock, hooks=hooks, on_step=tick)

        fast = None
        if has_fast_decode(model):
            plan.stage("timing the model's fast (CUDA graph) decode path")
            timed_run(model, ids, warm_steps, clock, eager=False)
            fast_times = timed_run(model, ids, new_tokens, clock, eager=False)
            fast_stats = summarize(fast_times.step_s, 1e3)
            fast = {"decode_tokens_per_s": 1e3 / fast_stats["median"], "step_ms": fast_stats,
                    "ttft_s": fast_times.prefill_s,
                    "note": "the model's decode_fn (not hookable); no per-block figures"}

        trace = None
        if trace_dir:
            from .trace import run_trace

            plan.stage("torch.profiler trace")
            trace = run_trace(model, ids, min(new_tokens, TRACE_DECODE_STEPS), trace_dir,
                              on_step=tick)

        sweep_points = None
        if contexts:
            from .sweep import run_sweep

            sweep_points = run_sweep(model, contexts, k, info["vocab_size"], clock, seed,
                                     plan=plan)

    baseline_result = None
    if baseline:
        from .baseline import run_transformers_baseline

        baseline_result = run_transformers_baseline(
            model, ids, new_tokens, warmup=max(warmup, 1), plan=plan, reference_tokens=clean.tokens)

    plan.finish()
    return _assemble(model, info, device, dtype, prompt_tokens, new_tokens, warmup, seed,
                     clean, hooked, clock.kind, weights, peak, limit, limit_source,
                     trace, sweep_points, baseline_result, fast)


def _assemble(model, info, device, dtype, prompt_tokens, new_tokens, warmup, seed, clean, hooked,
              timer, weights, peak, limit, limit_source, trace, sweep_points, baseline,
              fast=None) -> dict:
    n_layers = info["num_layers"]
    decode_stats = summarize(clean.step_s, 1e3)
    tok_s = sorted(1.0 / s for s in clean.step_s if s > 0)
    median_step = decode_stats["median"] / 1e3 if decode_stats else None
    prefill_parts = hooked.prefill_parts
    decode_parts = _mean_parts(hooked.step_parts)
    hooked_step_mean = (sum(hooked.step_s) / len(hooked.step_s)) if hooked.step_s else 0.0

    layers = []
    for i in range(n_layers):
        entry = {"index": i, **_layer_entry(decode_parts, i)}
        entry["prefill"] = _layer_entry(prefill_parts, i)
        layers.append(entry)

    hooked_stats = summarize(hooked.step_s, 1e3)
    overhead_decode = (hooked_stats["median"] / decode_stats["median"] - 1.0
                       if decode_stats and decode_stats["median"] > 0 else None)
    run = {
        "schema": runfile.SCHEMA_NAME,
        "schema_version": runfile.SCHEMA_VERSION,
        "model": info,
        "device": str(device),
        "device_name": None,
        "dtype": dtype_name(dtype),
        "quantize": info["quantize"],
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "warmup": warmup,
        "seed": seed,
        "decode_path": DECODE_PATH_NOTE,
        "fast_decode": fast,
        "ttft_s": clean.prefill_s,
        "prefill_tokens_per_s": prompt_tokens / clean.prefill_s if clean.prefill_s > 0 else None,
        "decode_tokens_per_s": 1.0 / median_step if median_step else None,
        "prefill": {"time_ms": clean.prefill_s * 1e3, "tokens": prompt_tokens},
        "decode": {
            "steps": len(clean.step_s),
            "step_ms": decode_stats,
            "tokens_per_s": {
                "median": 1.0 / median_step if median_step else None,
                "p10": summarize(tok_s)["p10"] if tok_s else None,
                "p90": summarize(tok_s)["p90"] if tok_s else None,
                "min": tok_s[0] if tok_s else None,
                "max": tok_s[-1] if tok_s else None,
            },
            "step_ms_list": [s * 1e3 for s in clean.step_s],
        },
        "generated_token_ids": clean.tokens,
        "bandwidth": _bandwidth(model, weights["weights_bytes"], clean.kv_bytes_per_token,
                                prompt_tokens, new_tokens, median_step, limit, limit_source),
        "layers": layers,
        "breakdown": {
            "prefill": _breakdown(prefill_parts, hooked.prefill_s, n_layers),
            "decode": _breakdown(decode_parts, hooked_step_mean, n_layers),
            "note": "from the hooked run; decode figures are means over steps; other_ms is the "
                    "step time not inside any hooked block (residual adds, RoPE, masks, cache "
                    "bookkeeping, argmax, Python)",
        },
        "instrumentation": {
            "timer": timer,
            "sync": "one synchronize per step" if timer != "perf_counter" else "none needed",
            "prefill_ms_clean": clean.prefill_s * 1e3,
            "prefill_ms_hooked": hooked.prefill_s * 1e3,
            "decode_step_ms_clean": decode_stats["median"] if decode_stats else None,
            "decode_step_ms_hooked": hooked_stats["median"] if hooked_stats else None,
            "overhead_fraction_prefill": (hooked.prefill_s / clean.prefill_s - 1.0
                                          if clean.prefill_s > 0 else None),
            "overhead_fraction_decode": overhead_decode,
        },
        "memory": {
            "weights_bytes": weights["weights_bytes"],
            "parameter_bytes": weights["parameter_bytes"],
            "buffer_bytes": weights["buffer_bytes"],
            "kv_cache_bytes": clean.kv_allocated_bytes,
            "kv_cache_allocated_bytes": clean.kv_allocated_bytes,
            "kv_cache_used_bytes": clean.kv_used_bytes,
            "kv_cache_tokens": clean.kv_length,
            "kv_bytes_per_token": clean.kv_bytes_per_token,
            "peak_bytes": peak.peak_bytes,
            "peak_source": peak.source,
            "start_bytes": peak.start_bytes,
        },
        "environment": environment(device, dtype),
        "trace": trace,
        "sweep": sweep_points,
        "baseline": baseline,
    }
    run["device_name"] = run["environment"]["device_name"]
    return _finite(run)


def _finite(obj):
    """Replace NaN/inf by None so the dict is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
