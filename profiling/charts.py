"""Plotly figures and the headline table built from run dicts (as returned by profile_model or
load_run), plus a timeline of a run's trace file.

The app's dashboard and `python -m profiling.report` use these same functions. Every chart takes
`theme="light" | "dark"`. Charts do not mislead: every y axis is linear and starts at 0, spreads
are drawn (p10–p90), values are written on the bars, and the model's memory is shown apart from
the process it runs in.
"""

from __future__ import annotations

import re

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .runfile import label_parts, run_label

PHASES = ("decode", "prefill")
COMPONENT_COLORS = {
    "attention": "#4C78A8",
    "mlp": "#F58518",
    "norms": "#54A24B",
    "model": "#B279A2",    # embedding, final norm, LM head
    "other": "#BAB0AC",
}
MEMORY_COLORS = {"weights": "#4C78A8", "kv": "#F58518", "activations": "#54A24B"}
PATTERNS = ["", "/", "x", ".", "\\", "+", "-", "|"]
RUN_COLORS = ["#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#FF9DA6",
              "#9D755D"]
THEMES = {
    "light": {"template": "plotly_white", "ink": "#222222", "muted": "#666666"},
    "dark": {"template": "plotly_dark", "ink": "#EEEEEE", "muted": "#AAAAAA"},
}
HEADLINE_COLUMNS = ["run", "time to first token (ms)", "ms per decode step", "decode tok/s",
                    "prefill tok/s", "% of roofline", "weights MB", "KV cache MB",
                    "peak MB (model)", "hook overhead %"]
MB = 1e6


# -- labels, units, layout -------------------------------------------------------------------
def run_labels(runs: list[dict]) -> list[str]:
    """Short unique labels for chart axes: device · dtype (· quantize), plus those parts of the
    full run label (tokens, weights, date, commit) that differ between the runs shown, then a
    counter where runs still look alike. The full label is `runfile.run_label`."""
    parts = [label_parts(r) for r in runs]
    keys = ["device", "dtype", "quantize", "tokens", "weights", "date", "commit"]
    varying = {k for k in keys[3:] if len({p.get(k) for p in parts}) > 1}
    labels = [" · ".join(v for k, v in p.items() if k in keys[:3] or k in varying) for p in parts]
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return out


def model_name(run: dict) -> str:
    source = str((run.get("model") or {}).get("source") or "")
    return source.rstrip("/").split("/")[-1] if source else ""


def byte_unit(max_bytes: float) -> tuple[float, str]:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if max_bytes >= scale:
            return float(scale), unit
    return 1.0, "B"


def _num(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _value(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _theme(theme: str) -> dict:
    if theme not in THEMES:
        raise ValueError(f"theme must be 'light' or 'dark', got {theme!r}")
    return THEMES[theme]


def _style(fig: go.Figure, theme: str, title: str, subtitle: str = "", **layout) -> go.Figure:
    """Template, transparent background (the page's colour shows), room for the title (and a
    subtitle) and a legend under the plot (narrow screens), y axes from 0."""
    colors = _theme(theme)
    lines = subtitle.count("<br>") + 1 if subtitle else 0
    fig.update_layout(
        template=colors["template"], paper_bgcolor="rgba(0,0,0,0)",
        plot_bgcolor="rgba(0,0,0,0)", font={"color": colors["ink"]},
        title={"text": title, "x": 0.01, "xanchor": "left", "y": 0.985, "yanchor": "top",
               "subtitle": {"text": subtitle, "font": {"size": 12, "color": colors["muted"]}}},
        margin={"t": 100 + 18 * lines, "b": 60, "l": 70, "r": 30},
        legend={"orientation": "h", "x": 0, "xanchor": "left", "y": -0.18, "yanchor": "top"},
        uniformtext={"minsize": 9, "mode": "show"}, **layout)
    fig.update_xaxes(automargin=True)
    fig.update_yaxes(rangemode="tozero", automargin=True)
    return fig


def _headroom(fig: go.Figure, top: float, row: int, col: int) -> None:
    """y from 0 to 25 % above the tallest value, so labels above bars stay inside the plot."""
    if top > 0:
        fig.update_yaxes(range=[0, top * 1.25], row=row, col=col)


def _empty(fig: go.Figure, text: str, theme: str, title: str) -> go.Figure:
    _style(fig, theme, title)
    fig.add_annotation(text=text, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                       font={"size": 14})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


# -- headline figures ------------------------------------------------------------------------
def _round(value, digits: int = 1):
    value = _value(value)
    return None if value is None else round(value, digits)


def headline_rows(runs: list[dict]) -> tuple[list[str], list[list]]:
    """The headline figures, one row per run (numbers, None where not measured): the full run
    label, time to first token, ms per decode step, decode and prefill tok/s, % of roofline,
    weights / KV cache / model peak memory (MB, the model apart from the process baseline) and
    the timing hooks' overhead."""
    rows = []
    for run in runs:
        mem = run.get("memory") or {}
        step = ((run.get("decode") or {}).get("step_ms") or {}).get("median")
        roof = (run.get("bandwidth") or {}).get("roofline_fraction")
        overhead = (run.get("instrumentation") or {}).get("overhead_fraction_decode")
        rows.append([
            run_label(run),
            _round(_num(run.get("ttft_s")) * 1e3 if _value(run.get("ttft_s")) else None, 1),
            _round(step, 2),
            _round(run.get("decode_tokens_per_s"), 1),
            _round(run.get("prefill_tokens_per_s"), 1),
            _round(100 * roof if _value(roof) is not None else None, 1),
            _round(_num(mem.get("weights_bytes")) / MB, 1),
            _round(_num(mem.get("kv_cache_bytes")) / MB, 2),
            _round(mem["model_peak_bytes"] / MB if _value(mem.get("model_peak_bytes")) else None, 1),
            _round(100 * overhead if _value(overhead) is not None else None, 1),
        ])
    return list(HEADLINE_COLUMNS), rows


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


LAYER_TITLES = {"decode": "Per-layer latency, decode (mean ms per step)",
                "prefill": "Per-layer latency, prefill (ms for the whole prompt)"}
COMPONENT_NAMES = {"attention": "Attention", "mlp": "MLP", "norms": "RMSNorms",
                   "model": "Embedding / final norm / LM head", "other": "Other (outside hooks)"}


def _add_layer_bars(fig: go.Figure, runs: list[dict], labels: list[str], phase: str,
                    visible: bool) -> int:
    """Stacked component bars of every run for one phase; returns how many traces it added.
    The legend names each component once (its colour); the runs are told apart by hatching."""
    added = 0
    for r, (run, label) in enumerate(zip(runs, labels)):
        cats, comps = _layer_rows(run, phase)
        base = [0.0] * len(cats)
        for comp, values in comps.items():
            if not any(values):
                continue
            name = COMPONENT_NAMES[comp]
            fig.add_bar(
                x=cats, y=values, base=list(base), offsetgroup=str(r), name=name,
                legendgroup=comp, showlegend=r == 0, visible=visible,
                marker={"color": COMPONENT_COLORS[comp],
                        "pattern": {"shape": PATTERNS[r % len(PATTERNS)]}},
                hovertemplate=f"{label}<br>%{{x}} {name}: %{{y:.3f}} ms<extra></extra>")
            base = [b + v for b, v in zip(base, values)]
            added += 1
    return added


def _run_hatching_legend(fig: go.Figure, labels: list[str]) -> int:
    """One legend entry per run showing its hatching (an empty bar); returns how many."""
    for r, label in enumerate(labels):
        fig.add_bar(x=[None], y=[None], name=label, legendgroup=f"run{r}",
                    marker={"color": "rgba(150,150,150,0.6)",
                            "pattern": {"shape": PATTERNS[r % len(PATTERNS)] or "",
                                        "fillmode": "overlay"}})
    return len(labels)


def layer_latency_figure(runs: list[dict], phase: str = "decode",
                         theme: str = "light") -> go.Figure:
    """Stacked attention / MLP / norms per decoder layer, one bar group per run (hatching tells
    runs apart). `phase` ("decode" or "prefill") is shown first; buttons switch between them."""
    if phase not in PHASES:
        raise ValueError(f"phase must be 'decode' or 'prefill', got {phase!r}")
    fig = go.Figure()
    if not runs:
        return _empty(fig, "no runs to show", theme, LAYER_TITLES[phase])
    labels = run_labels(runs)
    owner: list[str] = []
    for ph in PHASES:
        owner += [ph] * _add_layer_bars(fig, runs, labels, ph, visible=(ph == phase))
    if len(runs) > 1:
        owner += ["both"] * _run_hatching_legend(fig, labels)
    buttons = [{"label": ph.capitalize(), "method": "update",
                "args": [{"visible": [o in (ph, "both") for o in owner]},
                         {"title.text": LAYER_TITLES[ph]}]}
               for ph in PHASES]
    _style(fig, theme, LAYER_TITLES[phase], barmode="group", yaxis_title="ms",
           xaxis_title="block", updatemenus=[{
               "buttons": buttons, "type": "buttons", "direction": "right", "x": 1.0,
               "xanchor": "right", "y": 1.02, "yanchor": "bottom",
               "active": PHASES.index(phase)}])
    fig.update_layout(legend={"groupclick": "toggleitem"})
    return fig


# -- memory ----------------------------------------------------------------------------------
def _memory_parts(run: dict) -> dict:
    mem = run.get("memory") or {}
    weights, kv = _num(mem.get("weights_bytes")), _num(mem.get("kv_cache_bytes"))
    activations = _value(mem.get("activations_bytes"))
    return {"weights": weights, "kv": kv, "activations": activations,
            "kv_used": _value(mem.get("kv_cache_used_bytes")),
            "process_peak": _value(mem.get("peak_bytes")),
            "peak_source": str(mem.get("peak_source") or "")}


def _process_peak_name(sources: set[str]) -> str:
    if sources and all("RSS" in s for s in sources):
        return "whole-process peak RSS (Python, torch, libraries, the app + the model)"
    return "whole-process peak (" + "; ".join(sorted(sources)) + ")" if sources else \
        "whole-process peak"


def _model_memory_bars(fig: go.Figure, labels: list[str], parts: list[dict], top: float,
                       scale: float, unit: str) -> None:
    """Weights, KV cache and activations/other stacked per run (left panel), values written on
    the segments big enough to hold them (the rest in the hover)."""
    base = [0.0] * len(parts)
    for key, name in (("weights", "Weights"), ("kv", "KV cache (allocated)"),
                      ("activations", "Activations / other (model peak − weights − KV)")):
        if key == "activations" and all(p[key] is None for p in parts):
            continue  # a run file from before the model peak was measured
        values = [_num(p[key]) / scale for p in parts]
        fig.add_bar(x=labels, y=values, base=list(base), offsetgroup="model", name=name,
                    marker_color=MEMORY_COLORS[key], textposition="inside",
                    text=[f"{v:.3g}" if v >= top * 0.06 else "" for v in values],
                    insidetextanchor="middle",
                    hovertemplate=f"%{{x}}<br>{name}: %{{y:.3f}} {unit}<extra></extra>",
                    row=1, col=1)
        base = [b + v for b, v in zip(base, values)]


def _process_peak_marks(fig: go.Figure, labels: list[str], parts: list[dict], scale: float,
                        unit: str, theme: str) -> None:
    """The whole process's peak, marked apart from the model's stack and named for what it is."""
    if not any(p["process_peak"] for p in parts):
        return
    name = _process_peak_name({p["peak_source"] for p in parts} - {""})
    process = [_num(p["process_peak"]) / scale or None for p in parts]
    fig.add_scatter(x=labels, y=process, mode="markers+text", name=name,
                    text=[f"process {v:.3g} {unit}" if v else "" for v in process],
                    textposition="top center",
                    marker={"symbol": "line-ew-open", "size": 36, "line": {"width": 3},
                            "color": _theme(theme)["muted"]},
                    hovertemplate=f"%{{x}}<br>{name}: %{{y:.3f}} {unit}<extra></extra>",
                    row=1, col=1)


def _kv_cache_bars(fig: go.Figure, labels: list[str], parts: list[dict]) -> None:
    """The KV cache alone (right panel), allocated and used, on its own scale."""
    top = max(max(p["kv"], _num(p["kv_used"])) for p in parts)
    scale, unit = byte_unit(top)
    fig.add_bar(x=labels, y=[p["kv"] / scale for p in parts], name="KV cache (allocated)",
                marker_color=MEMORY_COLORS["kv"], showlegend=False, texttemplate="%{y:.3g}",
                textposition="outside", cliponaxis=False, row=1, col=2,
                hovertemplate=f"%{{x}}<br>KV allocated: %{{y:.3f}} {unit}<extra></extra>")
    if any(p["kv_used"] is not None for p in parts):
        fig.add_bar(x=labels, y=[_num(p["kv_used"]) / scale for p in parts],
                    name="KV cache (used at the end)", marker_color=MEMORY_COLORS["kv"],
                    marker_pattern_shape="/", opacity=0.6, texttemplate="%{y:.3g}",
                    textposition="outside", cliponaxis=False, row=1, col=2,
                    hovertemplate=f"%{{x}}<br>KV used: %{{y:.3f}} {unit}<extra></extra>")
    fig.update_yaxes(title_text=unit, row=1, col=2)
    _headroom(fig, top / scale, 1, 2)


def memory_figure(runs: list[dict], theme: str = "light") -> go.Figure:
    """Left: the model's own memory per run, stacked (weights, KV cache, activations/other =
    model peak - weights - KV, the process baseline left out), with the whole process's peak
    marked apart. Right: the KV cache alone on its own scale (allocated and used)."""
    title = "Memory: the model apart from the process it runs in"
    fig = make_subplots(rows=1, cols=2, column_widths=[0.65, 0.35], horizontal_spacing=0.12,
                        subplot_titles=("Model memory (stacked)", "KV cache (own scale)"))
    if not runs:
        return _empty(fig, "no runs to show", theme, title)
    labels = run_labels(runs)
    parts = [_memory_parts(r) for r in runs]
    top = max(max(_num(p["process_peak"]), p["weights"] + p["kv"] + _num(p["activations"]))
              for p in parts)
    scale, unit = byte_unit(top)
    _model_memory_bars(fig, labels, parts, top / scale, scale, unit)
    _process_peak_marks(fig, labels, parts, scale, unit, theme)
    _style(fig, theme, title, barmode="group")
    _kv_cache_bars(fig, labels, parts)
    fig.update_yaxes(title_text=unit, row=1, col=1)
    _headroom(fig, top / scale, 1, 1)
    return fig


# -- throughput ------------------------------------------------------------------------------
def divergence_text(run: dict) -> str:
    """How transformers' greedy tokens compare with ours in `run` ("" without a baseline)."""
    base = run.get("baseline") or {}
    if base.get("tokens_match") is False:
        return base.get("divergence_note") or (
            f"outputs diverge at token {base.get('diverged_at', base.get('first_mismatch'))}")
    return "same greedy tokens" if base.get("tokens_match") else ""


def _decode_bars(fig: go.Figure, runs: list[dict], labels: list[str]) -> None:
    decode = [_num(r.get("decode_tokens_per_s")) for r in runs]
    spread = [((r.get("decode") or {}).get("tokens_per_s") or {}) for r in runs]
    upper = [max(_num(s.get("p90")) - d, 0.0) if s else 0.0 for s, d in zip(spread, decode)]
    lower = [max(d - _num(s.get("p10")), 0.0) if s else 0.0 for s, d in zip(spread, decode)]
    pct = [(r.get("bandwidth") or {}).get("roofline_fraction") for r in runs]
    text = [f"{d:.1f}" + (f"<br>{100 * p:.0f}% of roofline" if _value(p) is not None else "")
            for d, p in zip(decode, pct)]
    fig.add_bar(x=labels, y=decode, name="decode (ours, eager; p10–p90 whiskers)",
                marker_color=RUN_COLORS[0], text=text, textposition="outside", cliponaxis=False,
                error_y={"type": "data", "array": upper, "arrayminus": lower, "visible": True},
                hovertemplate="%{x}<br>%{y:.1f} tok/s<br>%{text}<extra></extra>", row=1, col=1)
    fast = [(r.get("fast_decode") or {}).get("decode_tokens_per_s") for r in runs]
    if any(fast):
        fig.add_bar(x=labels, y=[_value(v) for v in fast], name="decode (fast path, no hooks)",
                    marker_color=RUN_COLORS[2], texttemplate="%{y:.1f}", textposition="outside",
                    cliponaxis=False, row=1, col=1)
    base = [(r.get("baseline") or {}).get("decode_tokens_per_s") for r in runs]
    if any(base):
        notes = [divergence_text(r) for r in runs]
        fig.add_bar(x=labels, y=[_value(v) for v in base], name="decode (transformers)",
                    marker_color=RUN_COLORS[3], customdata=notes, cliponaxis=False,
                    text=[f"{_num(v):.1f}" + (" ⚠" if "diverge" in n else "")
                          for v, n in zip(base, notes)], textposition="outside",
                    hovertemplate="%{x}<br>transformers %{y:.1f} tok/s<br>%{customdata}"
                                  "<extra></extra>", row=1, col=1)


def _roofline_marks(fig: go.Figure, runs: list[dict], labels: list[str], theme: str) -> None:
    bandwidth = [r.get("bandwidth") or {} for r in runs]
    roof = [_value(b.get("roofline_tokens_per_s")) for b in bandwidth]
    if not any(roof):
        return
    hover = [f"{_num(b.get('limit_bytes_per_s')) / 1e9:.0f} GB/s ({b.get('limit_source')})"
             for b in bandwidth]
    fig.add_scatter(x=labels, y=roof, mode="markers", customdata=hover, row=1, col=1,
                    name="roofline (bandwidth limit ÷ bytes per token)",
                    marker={"symbol": "line-ew-open", "size": 40, "line": {"width": 3},
                            "color": _theme(theme)["ink"]},
                    hovertemplate="%{x}<br>roofline %{y:.1f} tok/s<br>%{customdata}"
                                  "<extra></extra>")


def throughput_figure(runs: list[dict], theme: str = "light") -> go.Figure:
    """Decode tokens/s (median, p10–p90 whiskers, % of roofline written on the bar) with the
    bandwidth roofline marked and transformers' baseline (divergence said), and prefill tokens/s.
    Linear axes from 0: a bar's height compares with every other's."""
    title = "Throughput per run"
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=(
        "Decode tokens/s (median, p10–p90) vs roofline", "Prefill tokens/s"))
    if not runs:
        return _empty(fig, "no runs to show", theme, title)
    labels = run_labels(runs)
    _decode_bars(fig, runs, labels)
    _roofline_marks(fig, runs, labels, theme)
    fig.add_bar(x=labels, y=[_num(r.get("prefill_tokens_per_s")) for r in runs],
                name="prefill (ours)", marker_color=RUN_COLORS[1], texttemplate="%{y:.0f}",
                textposition="outside", cliponaxis=False, row=1, col=2,
                hovertemplate="%{x}<br>%{y:.1f} tok/s<extra></extra>")
    base_prefill = [(r.get("baseline") or {}).get("prefill_tokens_per_s") for r in runs]
    if any(base_prefill):
        fig.add_bar(x=labels, y=[_value(v) for v in base_prefill], name="prefill (transformers)",
                    marker_color=RUN_COLORS[4], texttemplate="%{y:.0f}", textposition="outside",
                    cliponaxis=False, row=1, col=2)
    notes = [f"{lab}: {text}" for r, lab in zip(runs, labels) if "diverge" in (text := divergence_text(r))]
    _style(fig, theme, title, subtitle="<br>".join(f"⚠ {n}" for n in notes), barmode="group")
    fig.update_yaxes(title_text="tokens/s", type="linear")
    _headroom(fig, max(_decode_top(runs), 0.0), 1, 1)
    _headroom(fig, max(_num(v) for r in runs for v in (
        r.get("prefill_tokens_per_s"), (r.get("baseline") or {}).get("prefill_tokens_per_s"))),
        1, 2)
    return fig


def _decode_top(runs: list[dict]) -> float:
    """The tallest thing drawn in the decode panel: a bar with its whisker, or a roofline mark."""
    values = []
    for r in runs:
        spread = (r.get("decode") or {}).get("tokens_per_s") or {}
        values += [_num(r.get("decode_tokens_per_s")), _num(spread.get("p90")),
                   _num((r.get("fast_decode") or {}).get("decode_tokens_per_s")),
                   _num((r.get("baseline") or {}).get("decode_tokens_per_s")),
                   _num((r.get("bandwidth") or {}).get("roofline_tokens_per_s"))]
    return max(values, default=0.0)


# -- context sweep ---------------------------------------------------------------------------
def _sweep_spread(points: list[dict]) -> tuple[list, list, list]:
    """Median tok/s per point with its p10–p90 spread (from the step-time p90 / p10)."""
    mid, up, down = [], [], []
    for p in points:
        ms = p.get("decode_step_ms") or {}
        median = _value(p.get("decode_tokens_per_s"))
        fast = 1e3 / ms["p10"] if _value(ms.get("p10")) else median
        slow = 1e3 / ms["p90"] if _value(ms.get("p90")) else median
        mid.append(median)
        up.append(max(_num(fast) - _num(median), 0.0))
        down.append(max(_num(median) - _num(slow), 0.0))
    return mid, up, down


def sweep_figure(runs: list[dict], theme: str = "light") -> go.Figure:
    """Decode tokens/s (median, p10–p90 error bars) and KV-cache size against context length, one
    line per run; linear axes from 0."""
    title = "How cost grows with context"
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=(
        "Decode tokens/s vs context (p10–p90)", "KV cache vs context"))
    with_sweep = [(i, r, lab) for i, (r, lab) in enumerate(zip(runs, run_labels(runs)))
                  if r.get("sweep")]
    if not with_sweep:
        return _empty(fig, "no sweep data: run with --sweep 128,512,2048", theme, title)
    max_kv = max(_num(p.get("kv_cache_bytes")) for _, r, _ in with_sweep for p in r["sweep"])
    scale, unit = byte_unit(max_kv)
    for i, run, label in with_sweep:
        points = sorted(run["sweep"], key=lambda p: _num(p.get("context_tokens")))
        ctx = [p.get("context_tokens") for p in points]
        color = RUN_COLORS[i % len(RUN_COLORS)]
        mid, up, down = _sweep_spread(points)
        fig.add_scatter(x=ctx, y=mid, mode="lines+markers", name=label, legendgroup=label,
                        line={"color": color}, row=1, col=1,
                        error_y={"type": "data", "array": up, "arrayminus": down,
                                 "visible": True},
                        hovertemplate=f"{label}<br>context %{{x}}: %{{y:.1f}} tok/s<extra></extra>")
        fig.add_scatter(x=ctx, y=[_num(p.get("kv_cache_bytes")) / scale for p in points],
                        mode="lines+markers", name=label, legendgroup=label, showlegend=False,
                        line={"color": color, "dash": "dot"}, row=1, col=2,
                        hovertemplate=f"{label}<br>context %{{x}}: %{{y:.3f}} {unit}"
                                      "<extra></extra>")
    _style(fig, theme, title)
    fig.update_xaxes(type="linear", rangemode="tozero", title_text="context tokens")
    fig.update_yaxes(title_text="tokens/s", row=1, col=1)
    fig.update_yaxes(title_text=unit, row=1, col=2)
    return fig


# -- trace timeline --------------------------------------------------------------------------
_BLOCK_RE = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp|input_layernorm|"
                       r"post_attention_layernorm)$|^(model\.embed_tokens|model\.norm|lm_head)$")
_LAYER_RE = re.compile(r"^model\.layers\.\d+$")
_KIND_COLORS = {"self_attn": COMPONENT_COLORS["attention"], "mlp": COMPONENT_COLORS["mlp"],
                "layernorm": COMPONENT_COLORS["norms"], "model.norm": COMPONENT_COLORS["norms"]}
TIMELINE_ROWS = ("steps", "layers", "blocks", "operators", "GPU kernels")
MAX_BARS_PER_ROW = 4000


def _timeline_row(event: dict, top_level: bool) -> str | None:
    name = str(event.get("name", ""))
    if event.get("cat") == "kernel":
        return "GPU kernels"
    if name.startswith("qwen2."):
        return "steps"
    if _LAYER_RE.match(name):
        return "layers"
    if _BLOCK_RE.match(name):
        return "blocks"
    if event.get("cat") == "cpu_op" and top_level:
        return "operators"
    return None


def _color(name: str) -> str:
    if re.search(r"attention|softmax", name):
        return COMPONENT_COLORS["attention"]
    if re.search(r"mm|linear|matmul|int8pack|gemm", name):
        return "#72B7B2"  # matrix products
    return next((c for key, c in _KIND_COLORS.items() if key in name), COMPONENT_COLORS["model"]
                if name.startswith(("model.", "lm_head")) else COMPONENT_COLORS["other"])


def trace_timeline(trace_path, theme: str = "light") -> go.Figure:
    """The trace as a timeline (ms from the first profiled step): steps (prefill, decode), layers,
    blocks (attention, MLP, norms), top-level CPU operators and, on a GPU, kernels."""
    from .trace import cpu_op_parents, load_trace_events

    title = "Trace timeline (prefill, then decode steps)"
    fig = go.Figure()
    events = load_trace_events(trace_path)
    steps = [e for e in events if str(e.get("name", "")).startswith("qwen2.")]
    if not steps:
        return _empty(fig, "no qwen2 steps in this trace", theme, title)
    t0 = min(e["ts"] for e in steps)
    t1 = max(e["ts"] + e["dur"] for e in steps)
    ops = [e for e in events if e.get("cat") == "cpu_op"]
    top = {id(e) for e, parent in zip(ops, cpu_op_parents(ops)) if parent is None}
    rows: dict[str, list[dict]] = {row: [] for row in TIMELINE_ROWS}
    for e in events:
        row = _timeline_row(e, id(e) in top)
        if row and (row == "GPU kernels" or t0 <= e["ts"] <= t1):
            rows[row].append(e)
    for row, items in rows.items():
        items = sorted(items, key=lambda e: e["dur"], reverse=True)[:MAX_BARS_PER_ROW]
        if not items:
            continue
        names = [str(e.get("name")) for e in items]
        fig.add_bar(y=[row] * len(items), x=[e["dur"] / 1e3 for e in items],
                    base=[(e["ts"] - t0) / 1e3 for e in items], orientation="h", name=row,
                    marker={"color": [_color(n) for n in names], "line": {"width": 0}},
                    customdata=names, showlegend=False, textposition="inside",
                    text=[n.removeprefix("qwen2.") for n in names] if row == "steps" else None,
                    hovertemplate="%{customdata}<br>start %{base:.3f} ms · %{x:.3f} ms"
                                  "<extra></extra>")
    _style(fig, theme, title, subtitle="blue: attention · orange: MLP · green: norms · purple: "
           "layers, embedding, LM head · teal: matrix products", barmode="overlay", xaxis_title="ms from the prefill's start", height=420)
    fig.update_yaxes(categoryorder="array", rangemode="normal",
                     categoryarray=[r for r in reversed(TIMELINE_ROWS) if rows[r]])
    return fig


# -- serving -----------------------------------------------------------------------------------
def serving_figure(results: list[dict], theme: str = "light") -> go.Figure:
    """Throughput and time to first token against concurrent users, one line per serving run
    (python -m profiling.serve): all new tokens over the wall time and each stream's decode tok/s
    left, TTFT p95 right."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("tok/s", "TTFT p95 (s)"),
                        horizontal_spacing=0.12)
    title = "Serving: tok/s and TTFT vs users"
    if not results:
        return _empty(fig, "No serving run yet (python -m profiling.serve --out FILE)", theme, title)
    for result in results:
        rows = result.get("rows") or []
        users = [r["users"] for r in rows]
        name = f"{result.get('path', '?')} · {result.get('decode', '')}".strip(" ·")
        fig.add_trace(go.Scatter(x=users, y=[r["aggregate_tok_s"] for r in rows], mode="lines+markers",
                                 name=f"{name}: all streams (over the wall)"), row=1, col=1)
        fig.add_trace(go.Scatter(x=users, y=[r["stream_tok_s_mean"] for r in rows], mode="lines+markers",
                                 line={"dash": "dot"}, name=f"{name}: each stream"), row=1, col=1)
        fig.add_trace(go.Scatter(x=users, y=[r["ttft_p95_s"] for r in rows], mode="lines+markers",
                                 name=f"{name}: TTFT p95"), row=1, col=2)
    cpu = (results[0].get("environment") or {}).get("cpu", "")
    _style(fig, theme, title, subtitle=cpu)
    fig.update_xaxes(title_text="concurrent users", type="category")
    return fig
