"""Which run is which, in words: the charts' short run names and hover text, and the headline table
(one row per run) that the app's dashboard and the HTML report show above the charts.

A chart's run name must fit a phone's axis, so it names only what tells the runs shown apart
(the model's size, the hardware, the settings); the full account of a run (model name and size,
CPU or GPU, cores and threads, settings, date, commit) is in its hover text and the table.
"""

from __future__ import annotations

from .overhead import overhead_text
from .runfile import hardware_label, label_parts, model_label, model_size, run_label
from .runfile import model_name as name_of_source

# The figures come first, so that a phone (where the table scrolls sideways) shows some beside the run;
# the model and hardware columns follow them.
HEADLINE_COLUMNS = ["run", "time to first token (ms)", "ms per decode step", "decode tok/s", "prefill tok/s",
                    "% of roofline", "weights MB", "KV cache MB", "peak MB (model)", "model", "hardware",
                    "hook overhead"]
MB = 1e6


def _short_parts(run: dict) -> dict[str, str]:
    """The parts a chart's run name may use, in order: model (its size), device, hardware (its name
    and threads), then runfile.label_parts' dtype, quantization, tokens, weights, date and commit."""
    model = run.get("model") or {}
    env = run.get("environment") or {}
    parts = label_parts(run)
    short = {"model": model_size(model.get("parameters")) or model_name(run) or "?",
             "model name": model_name(run) or "?", "device": parts.pop("device")}
    short["hardware"] = str(env.get("device_name") or run.get("device_name") or env.get("cpu_model") or "?")
    if env.get("torch_threads"):
        short["threads"] = f"{env['torch_threads']} threads"
    return {**short, **parts}


ALWAYS = ("device", "dtype", "quantize")
WHEN_THEY_DIFFER = ("model", "model name", "hardware", "threads", "tokens", "weights", "date", "commit")
ORDER = ("model", "model name", "device", "hardware", "threads", "dtype", "quantize", "tokens", "weights",
         "date", "commit")


def run_labels(runs: list[dict]) -> list[str]:
    """Short unique names for chart axes: device · dtype (· quantize), plus what differs between
    the runs shown (model size, or its name where sizes are equal; hardware; threads; tokens;
    weights; date; commit), then a counter where runs still look alike. The full account is
    `hover_labels`."""
    parts = [_short_parts(r) for r in runs]
    varying = {k for k in WHEN_THEY_DIFFER if len({p.get(k) for p in parts}) > 1}
    if "model" in varying:
        varying.discard("model name")  # the size tells them apart: the short one
    labels = [" · ".join(p[k] for k in ORDER if k in p and (k in ALWAYS or k in varying)) for p in parts]
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return out


def hover_labels(runs: list[dict]) -> list[str]:
    """Each run's chart name, then its model, hardware and full label, one per line (hover text)."""
    return [f"<b>{short}</b><br>{model_label(run)}<br>{hardware_label(run)}<br>{run_label(run)}"
            for short, run in zip(run_labels(runs), runs)]


def model_name(run: dict) -> str:
    model = run.get("model") or {}
    return str(model.get("name") or name_of_source(model.get("source") or ""))


def _value(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _round(value, digits: int = 1):
    value = _value(value)
    return None if value is None else round(value, digits)


def headline_rows(runs: list[dict]) -> tuple[list[str], list[list]]:
    """The headline figures, one row per run (numbers, None where not measured): the full run
    label, time to first token, ms per decode step, decode and prefill tok/s, % of roofline,
    weights / KV cache / model peak memory (MB, the model apart from the process baseline), the
    model (name and size), the hardware (CPU and cores, or GPU; threads) and the timing hooks'
    overhead (text: its interval, or "within noise")."""
    rows = []
    for run in runs:
        mem = run.get("memory") or {}
        step = ((run.get("decode") or {}).get("step_ms") or {}).get("median")
        roof = _value((run.get("bandwidth") or {}).get("roofline_fraction"))
        ttft = _value(run.get("ttft_s"))
        rows.append([
            run_label(run),
            _round(ttft * 1e3 if ttft else None, 1),
            _round(step, 2),
            _round(run.get("decode_tokens_per_s"), 1),
            _round(run.get("prefill_tokens_per_s"), 1),
            _round(100 * roof if roof is not None else None, 1),
            _round((_value(mem.get("weights_bytes")) or 0.0) / MB, 1),
            _round((_value(mem.get("kv_cache_bytes")) or 0.0) / MB, 2),
            _round(mem["model_peak_bytes"] / MB if _value(mem.get("model_peak_bytes")) else None, 1),
            model_label(run), hardware_label(run),
            overhead_text(run),
        ])
    return list(HEADLINE_COLUMNS), rows
