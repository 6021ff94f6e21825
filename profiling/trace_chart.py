"""A timeline of a run's torch.profiler trace (profiling/trace.py): one row each for the decode
steps, the decoder layers, their blocks (attention, MLP, norms), the operators and, on a GPU, the
kernels, coloured as the per-layer chart colours the blocks (profiling/charts.py)."""

from __future__ import annotations

import re

import plotly.graph_objects as go

from .chart_style import AXIS_PX, COMPONENT_COLORS, empty_figure, style, top_margin, wrap

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

    title = "Trace timeline"
    fig = go.Figure()
    events = load_trace_events(trace_path)
    steps = [e for e in events if str(e.get("name", "")).startswith("qwen2.")]
    if not steps:
        return empty_figure("no qwen2 steps in this trace", theme, title)
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
    subtitle = ("prefill, then decode steps · blue: attention · orange: MLP · green: norms · "
                "purple: layers, embedding, LM head · teal: matrix products")
    shown = [r for r in TIMELINE_ROWS if rows[r]]
    style(fig, theme, title, subtitle=subtitle, barmode="overlay",
           xaxis_title="ms from the prefill's start",
           height=top_margin(title, wrap(subtitle)) + 46 * len(shown) + 40 + AXIS_PX,
           uniformtext={"minsize": 9, "mode": "hide"})
    fig.update_yaxes(categoryorder="array", rangemode="normal",
                     categoryarray=list(reversed(shown)))
    return fig
