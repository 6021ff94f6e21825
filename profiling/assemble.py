"""The run dict (the run file's content) built from what `profiling.measure` measured.

Each top-level section of the run file has one small function here; `assemble` joins them.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen2.cache import kv_bytes_per_token
from qwen2.config import parameter_counts
from qwen2.options import dtype_name

from . import runfile
from .environment import environment
from .hooks import LAYER_BLOCKS
from .memory import PeakMemory
from .overhead import median_ratio_interval, paired_median_ratio
from .settings import Settings
from .steps import RunTimes
from .timers import summarize

DECODE_PATH_NOTE = ("eager DecodeSession (no fast decode path): forward hooks do not fire inside CUDA "
                    "graphs or torch.compile regions, so all figures here come from the eager path")
BREAKDOWN_NOTE = ("from the hooked run; decode figures are means over steps; other_ms is the step "
                  "time not inside any hooked block (residual adds, RoPE, masks, cache "
                  "bookkeeping, argmax, Python)")
MODEL_PEAK_NOTE = ("model peak = process peak - process baseline, where the baseline is what the "
                   "process held at the start of the timed runs less the weights (Python, torch, "
                   "libraries, an app, other models), and at least weights + KV cache; "
                   "activations/other = model peak - weights - KV cache")


@dataclass
class Measurements:
    """Everything `profiling.measure` measured for one run."""
    clean: RunTimes                  # timed without hooks: the speed figures
    hooked: RunTimes                 # the same run with timing hooks: per-block figures
    timer: str                       # the clock's kind ("perf_counter", "cuda_events", ...)
    weights: dict                    # profiling.memory.weight_bytes(model)
    peak: PeakMemory                 # over the clean and the hooked run
    bandwidth_limit: float           # bytes/s
    bandwidth_source: str            # "table" or "measured"
    fast_decode: dict | None = None
    trace: dict | None = None
    sweep: list[dict] | None = None
    baseline: dict | None = None


def model_facts(model) -> dict:
    """The run file's `model` section: where the weights came from and the model's shape."""
    cfg, info = model.config, model.info
    heads = int(cfg.num_attention_heads)
    return {
        "source": str(info.source),
        "name": runfile.model_name(str(info.source)),
        "random_weights": bool(info.random_weights),
        "quantize": info.quantization,
        "num_layers": int(cfg.num_hidden_layers),
        "hidden_size": int(cfg.hidden_size),
        "intermediate_size": int(cfg.intermediate_size),
        "num_attention_heads": heads,
        "num_key_value_heads": int(cfg.num_key_value_heads or heads),
        "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
        "vocab_size": int(cfg.vocab_size),
        "max_position_embeddings": int(cfg.max_position_embeddings),
        "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        "parameters": parameter_counts(cfg)["total"],
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# -- speed -----------------------------------------------------------------------------------
def speed_section(settings: Settings, clean: RunTimes) -> dict:
    """ttft_s, prefill/decode tok/s (decode: the median step) and the `prefill` / `decode` parts."""
    step_ms = summarize(clean.step_s, 1e3)
    median_s = step_ms["median"] / 1e3 if step_ms else None
    tok_s = summarize([1.0 / s for s in clean.step_s if s > 0]) or {}
    return {
        "ttft_s": clean.prefill_s,
        "prefill_tokens_per_s": _ratio(settings.prompt_tokens, clean.prefill_s),
        "decode_tokens_per_s": _ratio(1.0, median_s),
        "prefill": {"time_ms": clean.prefill_s * 1e3, "tokens": settings.prompt_tokens},
        "decode": {
            "steps": len(clean.step_s),
            "step_ms": step_ms,
            "tokens_per_s": {"median": _ratio(1.0, median_s), "p10": tok_s.get("p10"),
                             "p90": tok_s.get("p90"), "min": tok_s.get("min"),
                             "max": tok_s.get("max")},
            "step_ms_list": [s * 1e3 for s in clean.step_s],
        },
    }


# -- per block -------------------------------------------------------------------------------
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


def layers_section(hooked: RunTimes, num_layers: int) -> list[dict]:
    """One entry per decoder layer: decode ms per block (mean per step), and `prefill` alike."""
    decode = _mean_parts(hooked.step_parts)
    return [{"index": i, **_layer_entry(decode, i), "prefill": _layer_entry(hooked.prefill_parts, i)}
            for i in range(num_layers)]


def _breakdown(parts: dict, step_s: float) -> dict:
    sums = {part: 0.0 for part in LAYER_BLOCKS.values()}
    for (part, layer), sec in parts.items():
        if layer is not None:
            sums[part] += sec
    embedding, final_norm, lm_head = (parts.get((name, None), 0.0)
                                      for name in ("embedding", "final_norm", "lm_head"))
    accounted = sum(sums.values()) + embedding + final_norm + lm_head
    return {
        "step_ms": _ms(step_s),
        "embedding_ms": _ms(embedding),
        "attention_ms": _ms(sums["attention"]),
        "mlp_ms": _ms(sums["mlp"]),
        "norms_ms": _ms(sums["input_layernorm"] + sums["post_attention_layernorm"] + final_norm),
        "final_norm_ms": _ms(final_norm),
        "lm_head_ms": _ms(lm_head),
        "layers_ms": _ms(sum(sums.values())),
        "accounted_ms": _ms(accounted),
        "other_ms": _ms(step_s - accounted),
        "accounted_fraction": _ratio(accounted, step_s),
    }


FAST_BLOCKS_NOTE = ("per block from a torch.profiler trace of the compiled step, cut at its matrix products "
                    "(profiling.compiled_step): a product's time is its block's, the fused kernels between two "
                    "products are the block they sit in; other_ms is the step outside the compiled call")


def fast_decode_section(name: str, clean: RunTimes, traced: RunTimes | None, num_layers: int,
                        why_no_blocks: str) -> dict:
    """The fast path's speed (its clean run) and, when its traced run could be cut into blocks, the
    per-block figures (means over the traced steps) with what the tracing cost."""
    step_ms = summarize(clean.step_s, 1e3)
    section = {"decoder": name, "decode_tokens_per_s": 1e3 / step_ms["median"], "step_ms": step_ms,
               "ttft_s": clean.prefill_s}
    if traced is None or not traced.step_parts:
        return {**section, "note": f"the model's {name} decode path (not hookable); no per-block figures: "
                                   f"{why_no_blocks}"}
    parts = _mean_parts(traced.step_parts)
    traced_ms = summarize(traced.step_s, 1e3)["median"]
    interval = median_ratio_interval(clean.step_s, traced.step_s) or (None, None)
    return {**section, "note": FAST_BLOCKS_NOTE,
            "layers": [{"index": i, **_layer_entry(parts, i)} for i in range(num_layers)],
            "breakdown": _breakdown(parts, sum(traced.step_s) / len(traced.step_s)),
            "instrumentation": {"profiler": "torch.profiler, CPU events",
                                "decode_step_ms_clean": step_ms["median"], "decode_step_ms_traced": traced_ms,
                                "overhead_fraction_decode": traced_ms / step_ms["median"] - 1.0,
                                "overhead_fraction_decode_low": interval[0],
                                "overhead_fraction_decode_high": interval[1]}}


def breakdown_section(hooked: RunTimes) -> dict:
    mean_step = sum(hooked.step_s) / len(hooked.step_s) if hooked.step_s else 0.0
    return {"prefill": _breakdown(hooked.prefill_parts, hooked.prefill_s),
            "decode": _breakdown(_mean_parts(hooked.step_parts), mean_step),
            "note": BREAKDOWN_NOTE}


def instrumentation_section(clean: RunTimes, hooked: RunTimes, timer: str) -> dict:
    """The hooks' cost: the hooked calls' times against the clean ones' (made in pairs, call by call:
    profiling.steps.paired_runs), the decode figure the per-step ratios' median (per order, averaged) with its
    bootstrap interval (profiling.overhead: noise can still make it negative)."""
    clean_step, hooked_step = summarize(clean.step_s, 1e3), summarize(hooked.step_s, 1e3)
    clean_ms = clean_step["median"] if clean_step else None
    hooked_ms = hooked_step["median"] if hooked_step else None
    overhead_prefill = _ratio(hooked.prefill_s, clean.prefill_s)
    paired = paired_median_ratio(clean.step_s, hooked.step_s)
    if paired is None:  # one step: its ratio, no spread to size
        ratio = _ratio(hooked_ms, clean_ms)
        paired = (None if ratio is None else ratio - 1.0, None, None)
    overhead_decode, *interval = paired
    return {
        "timer": timer,
        "sync": "one synchronize per step" if timer != "perf_counter" else "none needed",
        "prefill_ms_clean": clean.prefill_s * 1e3,
        "prefill_ms_hooked": hooked.prefill_s * 1e3,
        "decode_step_ms_clean": clean_ms,
        "decode_step_ms_hooked": hooked_ms,
        "overhead_fraction_prefill": None if overhead_prefill is None else overhead_prefill - 1.0,
        "overhead_fraction_decode": overhead_decode,
        "overhead_pairs": "each decode step timed without and with hooks at the same position, "
                          "which first alternating",
        "overhead_fraction_decode_low": interval[0],
        "overhead_fraction_decode_high": interval[1],
        "decode_step_ms_hooked_list": [s * 1e3 for s in hooked.step_s],
    }


# -- bandwidth and memory --------------------------------------------------------------------
def _weights_read_per_token(model, weights: int) -> int:
    """Bytes of weights one decode step reads: all of them, except that an untied embedding
    table is only read one row at a time."""
    embed = model.model.embed_tokens.weight
    lm_head = getattr(model.lm_head, "weight", None)  # a quantized head keeps other tensors
    if lm_head is not None and lm_head.data_ptr() == embed.data_ptr():
        return weights
    table = embed.numel() * embed.element_size()
    return weights - table + embed.shape[-1] * embed.element_size()


def bandwidth_section(model, settings: Settings, m: Measurements, median_step_s) -> dict:
    weights_read = _weights_read_per_token(model, m.weights["weights_bytes"])
    # decode step i (0-based) attends over prompt + i + 1 positions (its own K/V included)
    mean_context = settings.prompt_tokens + (settings.new_tokens + 1) / 2
    kv_read = kv_bytes_per_token(model.config, model.dtype) * mean_context
    per_token = weights_read + kv_read
    achieved = _ratio(per_token, median_step_s)
    limit = m.bandwidth_limit
    return {
        "bytes_per_token": per_token,
        "weights_read_bytes": weights_read,
        "kv_read_bytes": kv_read,
        "mean_context_tokens": mean_context,
        "achieved_bytes_per_s": achieved,
        "limit_bytes_per_s": limit,
        "limit_source": m.bandwidth_source,
        "roofline_fraction": _ratio(achieved, limit),
        "roofline_tokens_per_s": _ratio(limit, per_token),
        "model": "weights read once per token + K/V of the positions attended (static-cache "
                 "slots beyond the current length are not counted)",
    }


def memory_section(model, m: Measurements) -> dict:
    """Weights, KV cache, the process peak, and the model's own peak apart from the process."""
    weights, kv = m.weights["weights_bytes"], m.clean.kv_allocated_bytes
    start, peak = m.peak.start_bytes, m.peak.peak_bytes
    baseline = max(start - weights, 0) if start is not None else None
    # at least weights + KV: a small cache can come from memory the process had already mapped
    model_peak = (max(peak - baseline, weights + kv)
                  if peak is not None and baseline is not None else None)
    return {
        "weights_bytes": weights,
        "parameter_bytes": m.weights["parameter_bytes"],
        "buffer_bytes": m.weights["buffer_bytes"],
        "kv_cache_bytes": kv,
        "kv_cache_allocated_bytes": kv,
        "kv_cache_used_bytes": m.clean.kv_used_bytes,
        "kv_cache_tokens": m.clean.kv_length,
        "kv_bytes_per_token": kv_bytes_per_token(model.config, model.dtype),
        "peak_bytes": peak,
        "peak_source": m.peak.source,
        "start_bytes": start,
        "process_baseline_bytes": baseline,
        "model_peak_bytes": model_peak,
        "activations_bytes": (max(model_peak - weights - kv, 0)
                              if model_peak is not None else None),
        "model_peak_note": MODEL_PEAK_NOTE,
    }


# -- the run ---------------------------------------------------------------------------------
def assemble(model, settings: Settings, m: Measurements) -> dict:
    """The run dict: strict JSON (NaN / inf become None), valid against runfile's schema."""
    speed = speed_section(settings, m.clean)
    step_ms = speed["decode"]["step_ms"]
    facts = model_facts(model)
    env = environment(model.device, model.dtype)
    run = {
        "schema": runfile.SCHEMA_NAME,
        "schema_version": runfile.SCHEMA_VERSION,
        "model": facts,
        "device": str(model.device),
        "device_name": env["device_name"],
        "dtype": dtype_name(model.dtype),
        "quantize": facts["quantize"],
        "prompt_tokens": settings.prompt_tokens,
        "new_tokens": settings.new_tokens,
        "warmup": settings.warmup,
        "seed": settings.seed,
        "decode_path": DECODE_PATH_NOTE,
        "fast_decode": m.fast_decode,
        **speed,
        "generated_token_ids": m.clean.tokens,
        "bandwidth": bandwidth_section(model, settings, m,
                                       step_ms["median"] / 1e3 if step_ms else None),
        "layers": layers_section(m.hooked, facts["num_layers"]),
        "breakdown": breakdown_section(m.hooked),
        "instrumentation": instrumentation_section(m.clean, m.hooked, m.timer),
        "memory": memory_section(model, m),
        "environment": env,
        "trace": m.trace,
        "sweep": m.sweep,
        "baseline": m.baseline,
    }
    return runfile.finite(run)
