"""Plotly figures built from run dicts (as returned by profile_model or load_run).

Every function takes a list of runs and labels each by device + dtype (+ quantize); the app's
dashboard and `python -m profiling.report` use these same functions.
"""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

PHASES = ("decode", "prefill")
COMPONENT_COLORS = {
    "attention": "#4C78A8",
    "mlp": "#F58518",
    "norms": "#54A24B",
    "model": "#B279A2",    # embedding, final norm, LM head
    "other": "#BAB0AC",
}
MEMORY_COLORS = {"weights": "#4C78A8", "kv": "#F58518", "rest": "#BAB0AC"}
PATTERNS = ["", "/", "x", ".", "\\", "+", "-", "|"]
RUN_COLORS = ["#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#FF9DA6",
              "#9D755D"]


# -- labels and units ------------------------------------------------------------------------
def run_label(run: dict) -> str:
    label = f"{run.get('device', '?')} {run.get('dtype', '?')}"
    quantize = run.get("quantize") or (run.get("model") or {}).get("quantize")
    if quantize:
        label += f" {quantize}"
    return label


def run_labels(runs: list[dict]) -> list[str]:
    """device + dtype (+ quantize); labels shared by several runs get the model name (when the
    models differ) and then a counter, so every label is unique."""
    labels = [run_label(r) for r in runs]
    for label in set(labels):
        same = [i for i, lab in enumerate(labels) if lab == label]
        names = {_model_name(runs[i]) for i in same}
        if len(same) > 1 and len(names) > 1:
            for i in same:
                labels[i] = f"{label} · {_model_name(runs[i]) or '?'}"
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab} #{seen[lab]}")
    return out


def _model_name(run: dict) -> str:
    source = str((run.get("model") or {}).get("source") or "")
    return source.rstrip("/").split("/")[-1] if source else ""


def byte_unit(max_bytes: float) -> tuple[float, str]:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if max_bytes >= scale:
            return float(scale), unit
    return 1.0, "B"


def _num(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _empty(fig: go.Figure, text: str) -> go.Figure:
    fig.add_annotation(text=text, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                       font={"size": 14})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


# -- per-layer latency -----------------------------------------------------------------------
def _layer_rows(run: dict, phase: str) -> tuple[list[str], dict[str, list[float]]]:
    """Categories (embed, L0.., final norm, lm_head, other) and ms per component."""
    layers = run.get("layers") or []
    breakdown = (run.get("breakdown") or {}).get(phase) or {}
    cats = ["embed"] + [f"L{layer.get('index', i)}" for i, layer in enumerate(layers)] + \
        ["final norm", "lm_head", "other"]
    comps = {name: [0.0] * len(cats) for name in COMPONENT_COLORS}
    comps["model"][0] = _num(breakdown.get("embedding_ms"))
    for j, layer in enumerate(layers, start=1):
        figures = layer if phase == "decode" else (layer.get("prefill") or {})
        comps["attention"][j] = _num(figures.get("attention_ms"))
        comps["mlp"][j] = _num(figures.get("mlp_ms"))
        comps["norms"][j] = (_num(figures.get("input_layernorm_ms"))
                             + _num(figures.get("post_attention_layernorm_ms")))
    comps["model"][-3] = _num(breakdown.get("final_norm_ms"))
    comps["model"][-2] = _num(breakdown.get("lm_head_ms"))
    comps["other"][-1] = max(_num(breakdown.get("other_ms")), 0.0)
    return cats, comps


def layer_latency_figure(runs: list[dict], phase: str = "decode") -> go.Figure:
    """Stacked attention / MLP / norms per decoder layer, one bar group per run.

    `phase` ("decode" or "prefill") is the one shown first; a dropdown switches between them.
    Decode figures are means per step, prefill figures are for the whole prompt.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be 'decode' or 'prefill', got {phase!r}")
    fig = go.Figure()
    if not runs:
        return _empty(fig, "no runs to show")
    labels = run_labels(runs)
    names = {"attention": "Attention", "mlp": "MLP", "norms": "RMSNorms",
             "model": "Embedding / final norm / LM head", "other": "Other (outside hooks)"}
    owner: list[str] = []
    for ph in PHASES:
        for r, (run, label) in enumerate(zip(runs, labels)):
            cats, comps = _layer_rows(run, ph)
            base = [0.0] * len(cats)
            for comp, values in comps.items():
                if not any(values):
                    continue
                fig.add_bar(
                    x=cats, y=values, base=list(base), offsetgroup=str(r),
                    name=f"{names[comp]} · {label}" if len(runs) > 1 else names[comp],
                    legendgroup=comp, visible=(ph == phase),
                    marker={"color": COMPONENT_COLORS[comp],
                            "pattern": {"shape": PATTERNS[r % len(PATTERNS)]}},
                    hovertemplate=f"{label}<br>%{{x}} {names[comp]}: %{{y:.3f}} ms<extra></extra>")
                base = [b + v for b, v in zip(base, values)]
                owner.append(ph)
    titles = {"decode": "Per-layer latency, decode (mean ms per step)",
              "prefill": "Per-layer latency, prefill (ms for the whole prompt)"}
    buttons = [
        {"label": ph.capitalize(), "method": "update",
         "args": [{"visible": [o == ph for o in owner]}, {"title.text": titles[ph]}]}
        for ph in PHASES
    ]
    fig.update_layout(
        title={"text": titles[phase]}, barmode="group", yaxis_title="ms", xaxis_title="block",
        legend={"groupclick": "toggleitem"},
        updatemenus=[{"buttons": buttons, "type": "buttons", "direction": "right",
                      "x": 1.0, "xanchor": "right", "y": 1.15, "yanchor": "top",
                      "active": PHASES.index(phase)}])
    return fig


# -- memory ----------------------------------------------------------------------------------
def memory_figure(runs: list[dict]) -> go.Figure:
    """Stacked weights + KV cache (allocated) + rest of the peak, one bar per run."""
    fig = go.Figure()
    if not runs:
        return _empty(fig, "no runs to show")
    labels = run_labels(runs)
    weights, kv, rest, peaks = [], [], [], []
    for run in runs:
        mem = run.get("memory") or {}
        w, k, p = _num(mem.get("weights_bytes")), _num(mem.get("kv_cache_bytes")), \
            _num(mem.get("peak_bytes"))
        weights.append(w)
        kv.append(k)
        rest.append(max(p - w - k, 0.0))
        peaks.append(max(p, w + k))
    scale, unit = byte_unit(max(peaks) if peaks else 0)
    for key, name, values in (("weights", "Weights", weights), ("kv", "KV cache (allocated)", kv),
                              ("rest", "Rest of peak (activations, runtime)", rest)):
        fig.add_bar(x=labels, y=[v / scale for v in values], name=name,
                    marker_color=MEMORY_COLORS[key],
                    hovertemplate=f"%{{x}}<br>{name}: %{{y:.3f}} {unit}<extra></extra>")
    sources = {(r.get("memory") or {}).get("peak_source") for r in runs} - {None, ""}
    fig.update_layout(
        title={"text": "Memory: weights, KV cache and the rest of the peak"},
        barmode="stack", yaxis_title=unit,
        annotations=[{"text": "peak: " + "; ".join(sorted(sources)), "showarrow": False,
                      "xref": "paper", "yref": "paper", "x": 0, "y": -0.18,
                      "font": {"size": 10}}] if sources else [])
    return fig


# -- throughput ------------------------------------------------------------------------------
def throughput_figure(runs: list[dict]) -> go.Figure:
    """Decode tokens/s (median, p10-p90 whiskers) with the bandwidth roofline, and prefill."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "Decode tokens/s (median, p10–p90) vs roofline", "Prefill tokens/s"))
    if not runs:
        return _empty(fig, "no runs to show")
    labels = run_labels(runs)
    decode = [_num(r.get("decode_tokens_per_s")) for r in runs]
    spread = [((r.get("decode") or {}).get("tokens_per_s") or {}) for r in runs]
    upper = [max(_num(s.get("p90")) - d, 0.0) if s else 0.0 for s, d in zip(spread, decode)]
    lower = [max(d - _num(s.get("p10")), 0.0) if s else 0.0 for s, d in zip(spread, decode)]
    bandwidth = [r.get("bandwidth") or {} for r in runs]
    pct = [b.get("roofline_fraction") for b in bandwidth]
    text = [f"{100 * p:.0f}% of roofline" if isinstance(p, (int, float)) else "" for p in pct]
    fig.add_bar(x=labels, y=decode, name="decode (ours)", marker_color=RUN_COLORS[0],
                error_y={"type": "data", "array": upper, "arrayminus": lower, "visible": True},
                text=text, textposition="outside", row=1, col=1,
                hovertemplate="%{x}<br>%{y:.1f} tok/s<br>%{text}<extra></extra>")
    fast = [(r.get("fast_decode") or {}).get("decode_tokens_per_s") for r in runs]
    if any(fast):
        fig.add_bar(x=labels, y=[_num(v) for v in fast], name="decode (fast path, no hooks)",
                    marker_color=RUN_COLORS[2], row=1, col=1)
    base_decode = [(r.get("baseline") or {}).get("decode_tokens_per_s") for r in runs]
    if any(base_decode):
        fig.add_bar(x=labels, y=[_num(v) for v in base_decode], name="decode (transformers)",
                    marker_color=RUN_COLORS[3], row=1, col=1)
    roof = [b.get("roofline_tokens_per_s") for b in bandwidth]
    if any(roof):
        hover = [f"{_num(b.get('limit_bytes_per_s')) / 1e9:.0f} GB/s ({b.get('limit_source')})"
                 for b in bandwidth]
        fig.add_scatter(x=labels, y=[_num(v) if v else None for v in roof], mode="markers",
                        name="roofline (bandwidth limit ÷ bytes per token)",
                        marker={"symbol": "line-ew-open", "size": 40, "color": "black",
                                "line": {"width": 3}},
                        customdata=hover, row=1, col=1,
                        hovertemplate="%{x}<br>roofline %{y:.1f} tok/s<br>%{customdata}"
                                      "<extra></extra>")
    fig.add_bar(x=labels, y=[_num(r.get("prefill_tokens_per_s")) for r in runs],
                name="prefill (ours)", marker_color=RUN_COLORS[1], row=1, col=2,
                hovertemplate="%{x}<br>%{y:.1f} tok/s<extra></extra>")
    base_prefill = [(r.get("baseline") or {}).get("prefill_tokens_per_s") for r in runs]
    if any(base_prefill):
        fig.add_bar(x=labels, y=[_num(v) for v in base_prefill], name="prefill (transformers)",
                    marker_color=RUN_COLORS[4], row=1, col=2)
    values = [v for v in decode + [_num(v) for v in roof if v] if v > 0]
    if values and max(values) / min(values) > 30:
        fig.update_yaxes(type="log", row=1, col=1)
    fig.update_yaxes(title_text="tokens/s", row=1, col=1)
    fig.update_layout(title={"text": "Throughput per device and dtype"}, barmode="group")
    return fig


# -- context sweep ---------------------------------------------------------------------------
def sweep_figure(runs: list[dict]) -> go.Figure:
    """Decode tokens/s and KV-cache bytes against context length, one line per run."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Decode tokens/s vs context",
                                                        "KV cache vs context"))
    with_sweep = [(r, lab) for r, lab in zip(runs, run_labels(runs)) if r.get("sweep")]
    if not with_sweep:
        return _empty(fig, "no sweep data: run with --sweep 128,512,2048")
    max_kv = max(_num(p.get("kv_cache_bytes")) for r, _ in with_sweep for p in r["sweep"])
    scale, unit = byte_unit(max_kv)
    for i, (run, label) in enumerate(with_sweep):
        points = sorted(run["sweep"], key=lambda p: _num(p.get("context_tokens")))
        ctx = [p.get("context_tokens") for p in points]
        color = RUN_COLORS[i % len(RUN_COLORS)]
        fig.add_scatter(x=ctx, y=[p.get("decode_tokens_per_s") for p in points],
                        mode="lines+markers", name=label, legendgroup=label,
                        line={"color": color}, row=1, col=1,
                        hovertemplate=f"{label}<br>context %{{x}}: %{{y:.1f}} tok/s<extra></extra>")
        fig.add_scatter(x=ctx, y=[_num(p.get("kv_cache_bytes")) / scale for p in points],
                        mode="lines+markers", name=label, legendgroup=label, showlegend=False,
                        line={"color": color, "dash": "dot"}, row=1, col=2,
                        hovertemplate=f"{label}<br>context %{{x}}: %{{y:.3f}} {unit}"
                                      "<extra></extra>")
    fig.update_xaxes(type="log", title_text="context tokens")
    fig.update_yaxes(title_text="tokens/s", row=1, col=1)
    fig.update_yaxes(title_text=unit, row=1, col=2)
    fig.update_layout(title={"text": "How cost grows with context"})
    return fig
