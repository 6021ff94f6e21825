"""Plotly figures built from run dicts (as returned by profile_model or load_run). A trace's
timeline is drawn by profiling/trace_chart.py, the headline table built by profiling/headline.py,
and the look every figure shares (themes, text measures, stacked panels, bar rows) is in
profiling/chart_style.py.

The app's dashboard and `python -m profiling.report` use these same functions. Every chart takes
`theme="light" | "dark"`. Charts do not mislead: every value axis is linear and starts at 0, spreads
are drawn (p10–p90), values are written beside the bars, and the model's memory is shown apart from
the process it runs in.

The server cannot know how wide the screen is, so every chart reads from a 420 px phone to a
desktop: its panels are stacked one per row (never side by side); runs are rows of horizontal bars,
named on the left in short lines (never rotated), each value written past its bar's end or whisker
with room kept for it; legends sit at the bottom of the figure (the plot shrinks to make room, so
nothing runs into them); titles, subplot titles and legend names are short or wrapped to lines that
fit 360 px; and bytes are decimal (kB, MB, GB) as in the headline table.
"""

from __future__ import annotations

import plotly.graph_objects as go

from .chart_style import (AXIS_PX, COMPONENT_COLORS, MEMORY_COLORS, PATTERNS, PHASES, RUN_COLORS, ValueLabels,
                          byte_unit, empty_figure, finite_value, hbar, legend_px, number, row_px, runs_axis,
                          stacked_panels, style, theme_colors, top_margin, wrap)

# The run names and the headline table live in headline.py; charts.<name> is also their documented home.
from .headline import HEADLINE_COLUMNS, headline_rows, hover_labels, model_name, run_labels  # noqa: F401

# -- per-layer latency -----------------------------------------------------------------------
OUTSIDE = ("embedding", "final norm", "LM head", "other")
LAYER_TITLES = {"decode": "Per-layer latency · decode", "prefill": "Per-layer latency · prefill"}
LAYER_SUBTITLES = {"decode": "mean ms per decode step", "prefill": "ms for the whole prompt"}
COMPONENT_NAMES = {"attention": "Attention", "mlp": "MLP", "norms": "RMSNorms",
                   "model": "Embedding / final norm / LM head", "other": "Other (outside hooks)"}
LEGEND_CHARS = 40


def _layer_rows(run: dict, phase: str) -> tuple[list[int], dict[str, list[float]], dict[str, float]]:
    """The decoder layers' indices and ms per component in each (attention, MLP, norms), and the
    ms outside the layers (embedding, final norm, LM head, other)."""
    layers = run.get("layers") or []
    breakdown = (run.get("breakdown") or {}).get(phase) or {}
    index = [int(number(layer.get("index", i))) for i, layer in enumerate(layers)]
    comps: dict[str, list[float]] = {"attention": [], "mlp": [], "norms": []}
    for layer in layers:
        figures = layer if phase == "decode" else (layer.get("prefill") or {})
        comps["attention"].append(number(figures.get("attention_ms")))
        comps["mlp"].append(number(figures.get("mlp_ms")))
        comps["norms"].append(number(figures.get("input_layernorm_ms"))
                              + number(figures.get("post_attention_layernorm_ms")))
    outside = {"embedding": number(breakdown.get("embedding_ms")),
               "final norm": number(breakdown.get("final_norm_ms")),
               "LM head": number(breakdown.get("lm_head_ms")),
               "other": max(number(breakdown.get("other_ms")), 0.0)}
    return index, comps, outside


def layer_views(runs: list[dict]) -> tuple[list[dict], list[str], list[str], list[str]]:
    """The per-layer chart's bar groups (views, names, hover texts, the phases each has): each run's
    eager figures (its hooked run) and, beside them where the run traced its compiled decode step
    (fast_decode.layers, profiling.compiled_step), that step's figures as a view of their own
    (decode only: prefill is eager on both paths)."""
    views, names, hovers, phases = [], [], [], []
    for run, name, hover in zip(runs, run_labels(runs), hover_labels(runs)):
        fast = run.get("fast_decode") or {}
        if not fast.get("layers"):
            views.append(run), names.append(name), hovers.append(hover), phases.append("both")
            continue
        decoder = str(fast.get("decoder") or "fast path")
        views += [run, {"layers": fast["layers"], "breakdown": {"decode": fast.get("breakdown") or {}}}]
        names += [f"{name} · eager", f"{name} · {decoder}"]
        hovers += [f"{hover}<br>eager decode: forward hooks",
                   f"{hover}<br>{decoder} decode step: its trace cut at the matrix products"]
        phases += ["both", "decode"]
    return views, names, hovers, phases


def _add_layer_bars(fig: go.Figure, runs: list[dict], hovers: list[str], phase: str,
                    visible: bool) -> int:
    """Every run's bars for one phase: attention / MLP / norms stacked per decoder layer (top
    panel), embedding, final norm, LM head and other (bottom panel); returns how many traces it
    added. The legend names each component once (its colour); runs are told apart by hatching."""
    added = 0
    for r, (run, hover) in enumerate(zip(runs, hovers)):
        index, comps, outside = _layer_rows(run, phase)
        pattern = {"shape": PATTERNS[r % len(PATTERNS)]}
        base = [0.0] * len(index)
        for comp, values in comps.items():
            if not any(values):
                continue
            name = COMPONENT_NAMES[comp]
            fig.add_bar(
                x=index, y=values, base=list(base), offsetgroup=str(r), name=name,
                legendgroup=comp, showlegend=r == 0, visible=visible,
                marker={"color": COMPONENT_COLORS[comp], "pattern": pattern},
                hovertemplate=f"{hover}<br>layer %{{x}} {name}: %{{y:.3f}} ms<extra></extra>",
                row=1, col=1)
            base = [b + v for b, v in zip(base, values)]
            added += 1
        for comp, cats in (("model", OUTSIDE[:3]), ("other", OUTSIDE[3:])):
            values = [outside[c] for c in cats]
            if not any(values):
                continue
            fig.add_bar(
                x=list(cats), y=values, offsetgroup=str(r), name=COMPONENT_NAMES[comp],
                legendgroup=comp, showlegend=r == 0, visible=visible,
                marker={"color": COMPONENT_COLORS[comp], "pattern": pattern},
                hovertemplate=f"{hover}<br>%{{x}}: %{{y:.3f}} ms<extra></extra>", row=2, col=1)
            added += 1
    return added


def _run_hatching_legend(fig: go.Figure, labels: list[str], visible: list[bool]) -> int:
    """One legend entry per run showing its hatching (an empty bar); returns how many."""
    for r, label in enumerate(labels):
        fig.add_bar(x=[None], y=[None], name=wrap(label, LEGEND_CHARS), legendgroup=f"run{r}",
                    **({} if visible[r] else {"visible": False}),
                    marker={"color": "rgba(150,150,150,0.6)",
                            "pattern": {"shape": PATTERNS[r % len(PATTERNS)] or "",
                                        "fillmode": "overlay"}}, row=1, col=1)
    return len(labels)


def layer_latency_figure(runs: list[dict], phase: str = "decode",
                         theme: str = "light") -> go.Figure:
    """Stacked attention / MLP / norms per decoder layer, one bar group per run (hatching tells
    runs apart; a run that traced its compiled decode step has a second group, layer_views), and
    below it what runs outside the layers (embedding, final norm, LM head, other), each panel on its
    own scale. `phase` ("decode" or "prefill") is shown first; buttons switch."""
    if phase not in PHASES:
        raise ValueError(f"phase must be 'decode' or 'prefill', got {phase!r}")
    if not runs:
        return empty_figure("no runs to show", theme, LAYER_TITLES[phase])
    colors = theme_colors(theme)
    views, labels, hovers, view_phases = layer_views(runs)
    fig, area = stacked_panels([230, 140])
    owner: list[str] = []
    for ph in PHASES:
        owner += [ph] * _add_layer_bars(fig, views, hovers, ph, visible=(ph == phase))
    if len(views) > 1:  # a compiled step's entry only where it has bars (decode)
        _run_hatching_legend(fig, labels, [p in (phase, "both") for p in view_phases])
        owner += view_phases
    buttons = [{"label": ph.capitalize(), "method": "update",
                "args": [{"visible": [o in (ph, "both") for o in owner]},
                         {"title.text": LAYER_TITLES[ph], "title.subtitle.text": LAYER_SUBTITLES[ph]}]}
               for ph in PHASES]
    names = list(dict.fromkeys(t.name for t in fig.data if t.showlegend is not False))
    height = top_margin(LAYER_TITLES[phase], LAYER_SUBTITLES[phase], True) + area + AXIS_PX + \
        legend_px(names)
    style(fig, theme, LAYER_TITLES[phase], LAYER_SUBTITLES[phase], height=round(height),
           buttons=True, barmode="group", updatemenus=[{
               "buttons": buttons, "type": "buttons", "direction": "right", "x": 0,
               "xanchor": "left", "y": 1, "yanchor": "bottom", "pad": {"b": 12},
               "active": PHASES.index(phase), "showactive": True, "bgcolor": colors["button"],
               "bordercolor": colors["border"], "font": {"color": "#222222", "size": 13}}])
    fig.update_layout(legend={"groupclick": "toggleitem"})
    fig.update_xaxes(title_text="decoder layer", rangemode="normal", row=1, col=1)
    fig.update_xaxes(title_text="outside the decoder layers", type="category",
                     categoryorder="array", categoryarray=list(OUTSIDE), row=2, col=1)
    fig.update_yaxes(title_text="ms", rangemode="tozero")
    return fig


# -- memory ----------------------------------------------------------------------------------
def _memory_parts(run: dict) -> dict:
    mem = run.get("memory") or {}
    weights, kv = number(mem.get("weights_bytes")), number(mem.get("kv_cache_bytes"))
    activations = finite_value(mem.get("activations_bytes"))
    return {"weights": weights, "kv": kv, "activations": activations,
            "kv_used": finite_value(mem.get("kv_cache_used_bytes")),
            "process_peak": finite_value(mem.get("peak_bytes")),
            "peak_source": str(mem.get("peak_source") or "")}


def _process_peak_name(sources: set[str]) -> str:
    if sources and all("RSS" in s for s in sources):
        return "whole-process peak RSS (Python, torch, libraries, the app + the model)"
    return "whole-process peak (" + "; ".join(sorted(sources)) + ")" if sources else \
        "whole-process peak"


def _model_memory_bars(fig: go.Figure, hovers: list[str], parts: list[dict], n: int, scale: float,
                       unit: str, values: ValueLabels) -> None:
    """Weights, KV cache and activations/other stacked per run (top panel); the stack's total is
    written past its end, each part is in the hover."""
    base = [0.0] * len(parts)
    for key, name in (("weights", "Weights"), ("kv", "KV cache (allocated)"),
                      ("activations", "Activations / other (model peak − weights − KV)")):
        if key == "activations" and all(p[key] is None for p in parts):
            continue  # a run file from before the model peak was measured
        part = [number(p[key]) / scale for p in parts]
        hbar(fig, 1, 0, n, hovers, part, base=list(base), name=wrap(name, LEGEND_CHARS),
              marker_color=MEMORY_COLORS[key], legendgroup=key,
              hovertemplate=f"%{{hovertext}}<br>{name}: %{{x:.3f}} {unit}<extra></extra>")
        base = [b + v for b, v in zip(base, part)]
    values.add(1, 0, n, base, [f"model {b:.3g} {unit}" for b in base])


def _process_peak_bars(fig: go.Figure, hovers: list[str], parts: list[dict], scale: float,
                       unit: str, theme: str, values: ValueLabels) -> None:
    """The whole process's peak, an outlined bar under the model's stack, named for what it is."""
    name = _process_peak_name({p["peak_source"] for p in parts} - {""})
    process = [number(p["process_peak"]) / scale or None for p in parts]
    hbar(fig, 1, 1, 2, hovers, process, name=wrap(name, LEGEND_CHARS),
          marker={"color": "rgba(0,0,0,0)", "line": {"color": theme_colors(theme)["muted"], "width": 2}},
          hovertemplate=f"%{{hovertext}}<br>{name}: %{{x:.3f}} {unit}<extra></extra>")
    values.add(1, 1, 2, process, [f"process {v:.3g} {unit}" if v else "" for v in process])


def _kv_cache_bars(fig: go.Figure, hovers: list[str], parts: list[dict], values: ValueLabels) -> str:
    """The KV cache alone (bottom panel), allocated and used, on its own scale; returns its unit."""
    top = max(max(p["kv"], number(p["kv_used"])) for p in parts)
    scale, unit = byte_unit(top)
    has_used = any(p["kv_used"] is not None for p in parts)
    n = 2 if has_used else 1
    allocated = [p["kv"] / scale for p in parts]
    hbar(fig, 2, 0, n, hovers, allocated, name="KV cache (allocated)", legendgroup="kv",
          marker_color=MEMORY_COLORS["kv"], showlegend=False,
          hovertemplate=f"%{{hovertext}}<br>KV allocated: %{{x:.3f}} {unit}<extra></extra>")
    values.add(2, 0, n, allocated, [f"{v:.3g} {unit}" for v in allocated])
    if has_used:
        used = [number(p["kv_used"]) / scale for p in parts]
        hbar(fig, 2, 1, n, hovers, used, name="KV cache (used at the end)",
              marker_color=MEMORY_COLORS["kv"], marker_pattern_shape="/", opacity=0.6,
              hovertemplate=f"%{{hovertext}}<br>KV used: %{{x:.3f}} {unit}<extra></extra>")
        values.add(2, 1, n, used, [f"used {v:.3g} {unit}" for v in used])
    return unit


def memory_figure(runs: list[dict], theme: str = "light") -> go.Figure:
    """Top: the model's own memory per run, stacked (weights, KV cache, activations/other =
    model peak - weights - KV, the process baseline left out), with the whole process's peak as an
    outlined bar apart. Bottom: the KV cache alone on its own scale (allocated and used)."""
    title = "Memory: the model and its process"
    if not runs:
        return empty_figure("no runs to show", theme, title)
    labels = run_labels(runs)
    parts = [_memory_parts(r) for r in runs]
    top = max(max(number(p["process_peak"]), p["weights"] + p["kv"] + number(p["activations"]))
              for p in parts)
    scale, unit = byte_unit(top)
    has_process = any(p["process_peak"] for p in parts)
    n = 2 if has_process else 1
    fig, area = stacked_panels([row_px(len(runs), n, labels), row_px(len(runs), 2, labels)],
                        ["Model (stacked) and process peak", "KV cache alone (own scale)"])
    values = ValueLabels()
    hovers = hover_labels(runs)
    _model_memory_bars(fig, hovers, parts, n, scale, unit, values)
    if has_process:
        _process_peak_bars(fig, hovers, parts, scale, unit, theme, values)
    kv_unit = _kv_cache_bars(fig, hovers, parts, values)
    names = [t.name for t in fig.data if t.showlegend is not False]
    values.draw(fig, theme)
    height = top_margin(title) + area + AXIS_PX + legend_px(names)
    style(fig, theme, title, height=round(height), barmode="overlay")
    for row in (1, 2):
        runs_axis(fig, labels, row)
    fig.update_xaxes(type="linear", rangemode="tozero")
    fig.update_xaxes(title_text=unit, row=1, col=1)
    fig.update_xaxes(title_text=kv_unit, row=2, col=1)
    return fig


# -- throughput ------------------------------------------------------------------------------
def divergence_text(run: dict) -> str:
    """How transformers' greedy tokens compare with ours in `run` ("" without a baseline)."""
    base = run.get("baseline") or {}
    if base.get("tokens_match") is False:
        return base.get("divergence_note") or (
            f"outputs diverge at token {base.get('diverged_at', base.get('first_mismatch'))}")
    return "same greedy tokens" if base.get("tokens_match") else ""


def _decode_series(runs: list[dict], theme: str) -> list[dict]:
    """The decode panel's bars, each {name, values, ends (where its label goes), texts, bar: the
    go.Bar settings}: ours with its p10–p90 whisker and % of roofline, the fast path and
    transformers where measured, and the roofline (an outlined bar: the most the bandwidth allows)."""
    decode = [number(r.get("decode_tokens_per_s")) for r in runs]
    spread = [((r.get("decode") or {}).get("tokens_per_s") or {}) for r in runs]
    upper = [max(number(s.get("p90")) - d, 0.0) if s else 0.0 for s, d in zip(spread, decode)]
    lower = [max(d - number(s.get("p10")), 0.0) if s else 0.0 for s, d in zip(spread, decode)]
    pct = [(r.get("bandwidth") or {}).get("roofline_fraction") for r in runs]
    text = [f"{d:.1f}" + (f" · {100 * p:.0f}% of roofline" if finite_value(p) is not None else "")
            for d, p in zip(decode, pct)]
    series = [{"name": "decode (ours, eager; p10–p90 whiskers)", "values": decode, "texts": text,
               "ends": [d + u for d, u in zip(decode, upper)],
               "bar": {"marker_color": RUN_COLORS[0], "text": text,
                       "error_x": {"type": "data", "array": upper, "arrayminus": lower,
                                   "visible": True, "color": theme_colors(theme)["ink"], "width": 4},
                       "hovertemplate": "%{hovertext}<br>%{x:.1f} tok/s<br>%{text}<extra></extra>"}}]
    fast = [finite_value((r.get("fast_decode") or {}).get("decode_tokens_per_s")) for r in runs]
    if any(fast):
        series.append({"name": "decode (fast path, no hooks)", "values": fast,
                       "texts": [f"{v:.1f}" if v else "" for v in fast],
                       "bar": {"marker_color": RUN_COLORS[2],
                               "hovertemplate": "%{hovertext}<br>fast path %{x:.1f} tok/s"
                                                "<extra></extra>"}})
    base = [finite_value((r.get("baseline") or {}).get("decode_tokens_per_s")) for r in runs]
    if any(base):
        notes = [divergence_text(r) for r in runs]
        text = [f"{number(v):.1f}" + (" ⚠" if "diverge" in n else "") if v else ""
                for v, n in zip(base, notes)]
        series.append({"name": "decode (transformers)", "values": base, "texts": text,
                       "bar": {"marker_color": RUN_COLORS[3], "customdata": notes, "text": text,
                               "hovertemplate": "%{hovertext}<br>transformers %{x:.1f} tok/s<br>"
                                                "%{customdata}<extra></extra>"}})
    bandwidth = [r.get("bandwidth") or {} for r in runs]
    roof = [finite_value(b.get("roofline_tokens_per_s")) for b in bandwidth]
    if any(roof):
        hover = [f"{number(b.get('limit_bytes_per_s')) / 1e9:.0f} GB/s ({b.get('limit_source')})"
                 for b in bandwidth]
        series.append({"name": "roofline (bandwidth ÷ bytes per token)", "values": roof,
                       "texts": [f"{v:.1f}" if v else "" for v in roof],
                       "bar": {"customdata": hover,
                               "marker": {"color": "rgba(0,0,0,0)",
                                          "line": {"color": theme_colors(theme)["ink"], "width": 2}},
                               "hovertemplate": "%{hovertext}<br>roofline %{x:.1f} tok/s<br>"
                                                "%{customdata}<extra></extra>"}})
    return series


def _prefill_series(runs: list[dict]) -> list[dict]:
    ours = [number(r.get("prefill_tokens_per_s")) for r in runs]
    series = [{"name": "prefill (ours)", "values": ours, "texts": [f"{v:.0f}" for v in ours],
               "bar": {"marker_color": RUN_COLORS[1],
                       "hovertemplate": "%{hovertext}<br>%{x:.1f} tok/s<extra></extra>"}}]
    base = [finite_value((r.get("baseline") or {}).get("prefill_tokens_per_s")) for r in runs]
    if any(base):
        series.append({"name": "prefill (transformers)", "values": base,
                       "texts": [f"{v:.0f}" if v else "" for v in base],
                       "bar": {"marker_color": RUN_COLORS[4],
                               "hovertemplate": "%{hovertext}<br>transformers %{x:.1f} tok/s"
                                                "<extra></extra>"}})
    return series


def throughput_figure(runs: list[dict], theme: str = "light") -> go.Figure:
    """Decode tokens/s (median, p10–p90 whiskers, % of roofline written beside the bar) with the
    bandwidth roofline and transformers' baseline (divergence said), and prefill tokens/s, one
    row per run. Linear axes from 0: a bar's length compares with every other's."""
    title = "Throughput per run"
    if not runs:
        return empty_figure("no runs to show", theme, title)
    labels = run_labels(runs)
    panels = [_decode_series(runs, theme), _prefill_series(runs)]
    hovers = hover_labels(runs)
    fig, area = stacked_panels([row_px(len(runs), len(p), labels) for p in panels],
                        ["Decode (median, p10–p90)", "Prefill"])
    values = ValueLabels()
    for row, series in enumerate(panels, start=1):
        for s, one in enumerate(series):
            hbar(fig, row, s, len(series), hovers, one["values"], name=wrap(one["name"], LEGEND_CHARS),
                  **one["bar"])
            values.add(row, s, len(series), one.get("ends", one["values"]), one["texts"])
    names = [t.name for t in fig.data]
    values.draw(fig, theme)
    notes = [f"{lab}: {text}" for r, lab in zip(runs, labels) if "diverge" in (text := divergence_text(r))]
    subtitle = "<br>".join(wrap(f"⚠ {n}") for n in notes)
    height = top_margin(title, subtitle) + area + AXIS_PX + legend_px(names)
    style(fig, theme, title, subtitle=subtitle, height=round(height), barmode="overlay")
    for row in (1, 2):
        runs_axis(fig, labels, row)
    fig.update_xaxes(title_text="tokens/s", type="linear", rangemode="tozero")
    return fig


# -- context sweep ---------------------------------------------------------------------------
def _sweep_spread(points: list[dict]) -> tuple[list, list, list]:
    """Median tok/s per point with its p10–p90 spread (from the step-time p90 / p10)."""
    mid, up, down = [], [], []
    for p in points:
        ms = p.get("decode_step_ms") or {}
        median = finite_value(p.get("decode_tokens_per_s"))
        fast = 1e3 / ms["p10"] if finite_value(ms.get("p10")) else median
        slow = 1e3 / ms["p90"] if finite_value(ms.get("p90")) else median
        mid.append(median)
        up.append(max(number(fast) - number(median), 0.0))
        down.append(max(number(median) - number(slow), 0.0))
    return mid, up, down


def sweep_figure(runs: list[dict], theme: str = "light") -> go.Figure:
    """Decode tokens/s (median, p10–p90 error bars) and KV-cache size against context length, one
    line per run; linear axes from 0."""
    title = "How cost grows with context"
    with_sweep = [(i, r, lab, hover) for i, (r, lab, hover)
                  in enumerate(zip(runs, run_labels(runs), hover_labels(runs))) if r.get("sweep")]
    if not with_sweep:
        return empty_figure("no sweep data: run with --sweep 128,512,2048", theme, title)
    fig, area = stacked_panels([200, 170], ["Decode tokens/s (p10–p90)", "KV cache"])
    max_kv = max(number(p.get("kv_cache_bytes")) for _, r, _, _ in with_sweep for p in r["sweep"])
    scale, unit = byte_unit(max_kv)
    for i, run, label, hover in with_sweep:
        points = sorted(run["sweep"], key=lambda p: number(p.get("context_tokens")))
        ctx = [p.get("context_tokens") for p in points]
        color = RUN_COLORS[i % len(RUN_COLORS)]
        mid, up, down = _sweep_spread(points)
        fig.add_scatter(x=ctx, y=mid, mode="lines+markers", name=wrap(label, LEGEND_CHARS),
                        legendgroup=label, line={"color": color}, row=1, col=1,
                        error_y={"type": "data", "array": up, "arrayminus": down,
                                 "visible": True},
                        hovertemplate=f"{hover}<br>context %{{x}}: %{{y:.1f}} tok/s<extra></extra>")
        fig.add_scatter(x=ctx, y=[number(p.get("kv_cache_bytes")) / scale for p in points],
                        mode="lines+markers", name=label, legendgroup=label, showlegend=False,
                        line={"color": color, "dash": "dot"}, row=2, col=1,
                        hovertemplate=f"{hover}<br>context %{{x}}: %{{y:.3f}} {unit}"
                                      "<extra></extra>")
    names = [t.name for t in fig.data if t.showlegend is not False]
    height = top_margin(title) + area + AXIS_PX + legend_px(names)
    style(fig, theme, title, height=round(height))
    fig.update_xaxes(type="linear", rangemode="tozero", title_text="context tokens",
                     ticks="outside", ticklen=4)
    fig.update_yaxes(rangemode="tozero", ticks="outside", ticklen=4)
    fig.update_yaxes(title_text="tokens/s", row=1, col=1)
    fig.update_yaxes(title_text=unit, row=2, col=1)
    return fig


# -- serving -----------------------------------------------------------------------------------
def serving_figure(results: list[dict], theme: str = "light") -> go.Figure:
    """Throughput and time to first token against concurrent users, one line per serving run
    (python -m profiling.serve): all new tokens over the wall time and each stream's decode tok/s
    on top, TTFT p95 below."""
    title = "Serving: tok/s and TTFT vs users"
    if not results:
        return empty_figure("No serving run yet (python -m profiling.serve --out FILE)", theme, title)
    fig, area = stacked_panels([200, 160], ["Throughput (tok/s)", "Time to first token, p95 (s)"])
    for result in results:
        rows = result.get("rows") or []
        users = [r["users"] for r in rows]
        name = f"{result.get('path', '?')} · {result.get('decode', '')}".strip(" ·")
        fig.add_trace(go.Scatter(x=users, y=[r["aggregate_tok_s"] for r in rows], mode="lines+markers",
                                 name=wrap(f"{name}: all streams (over the wall)", LEGEND_CHARS)),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=users, y=[r["stream_tok_s_mean"] for r in rows], mode="lines+markers",
                                 line={"dash": "dot"}, name=wrap(f"{name}: each stream", LEGEND_CHARS)),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=users, y=[r["ttft_p95_s"] for r in rows], mode="lines+markers",
                                 name=wrap(f"{name}: TTFT p95", LEGEND_CHARS)), row=2, col=1)
    cpu = str((results[0].get("environment") or {}).get("cpu", ""))
    height = top_margin(title, wrap(cpu)) + area + AXIS_PX + legend_px([t.name for t in fig.data])
    style(fig, theme, title, subtitle=cpu, height=round(height))
    fig.update_xaxes(title_text="concurrent users", type="category")
    fig.update_yaxes(rangemode="tozero")
    return fig
