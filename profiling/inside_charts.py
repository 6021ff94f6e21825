"""Plotly figures for the "Inside the model" views (profiling.inside's JSON view).

path_figure(view), candidates_figure(view), logit_lens_figure(view), attention_figure(view, layer):
each takes the dict InsideSession.start/step/view returns (plain JSON, so it can come from an API
call too) and returns a go.Figure. Token text is shown with visible whitespace (token_label).
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

STAGE_COLORS = ["#BAB0AC", "#B279A2", "#F58518", "#4C78A8", "#54A24B", "#E45756", "#72B7B2"]
SCOPE_FILL = {"model": "#EEF3FA", "layer": "#FFF6EC"}
HEAT = "Viridis"


def token_label(text: str, limit: int = 16) -> str:
    """A token's text with its whitespace made visible: ' ' -> '␣', newline -> '↵', tab -> '⇥'."""
    shown = text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("\r", "")
    shown = shown or "∅"
    return shown if len(shown) <= limit else shown[:limit - 1] + "…"


def _count(n: int) -> str:
    if n == 0:
        return "–"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}".replace(".00", "")
    return str(n)


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")" if shape is not None else "?"


def _notice_title(view: dict, title: str) -> str:
    return title + (" <span style='color:#c0392b'>(random weights)</span>" if view.get("notice") else "")


# ----------------------------------------------------------------------------- the path


def path_figure(view: dict) -> go.Figure:
    """The path as a table: stage, module, the shape it produced (batch of one dropped), the shape
    the config implies when they differ, parameters, what it does. Layer rows are shaded: they
    repeat once per decoder layer."""
    m, kv = view["model"], view["kv_cache"]
    rows = view["path"]
    stage, module, shape, params, detail, fill = [], [], [], [], [], []
    for s in rows:
        ok = s["ok"]
        stage.append(("↻ " if s["scope"] == "layer" else "") + s["label"])
        module.append(s["module"] or "")
        shape.append(_shape(s["shape"]) + ("" if ok else f" ≠ {_shape(s['expected'])} ✗"))
        params.append(_count(s["params"]))
        text = s["detail"]
        if s["key"] == "attention":
            text += f"; KV cache {_bytes(kv['bytes_per_token_per_layer'])}/token/layer, {_bytes(kv['bytes_per_layer'])} per layer now"
        detail.append(text)
        fill.append(SCOPE_FILL[s["scope"]] if ok else "#F8D7DA")
    fig = go.Figure(go.Table(
        columnwidth=[1.3, 2.2, 1.3, 0.8, 5],
        header=dict(values=["<b>stage</b>", "<b>module</b>", "<b>shape</b>", "<b>params</b>", "<b>what happens</b>"],
                    fill_color="#DDE4EE", align="left"),
        cells=dict(values=[stage, module, shape, params, detail], fill_color=[fill] * 5, align="left",
                   height=24),
    ))
    title = (f"{_count(m['parameters'])} params: {m['layers']} layers × {_count(m['parameters_per_layer'])} "
             f"(↻ rows) + embedding, norm, head · {m['heads']} query heads / {m['kv_heads']} KV heads"
             f"<br><sup>KV cache {_bytes(kv['bytes'])} for {kv['tokens']} tokens · {view['phase']} of "
             f"{view['path'][0]['shape'][0]} token(s) · {m['dtype']} on {m['device']}</sup>")
    fig.update_layout(title=_notice_title(view, title), height=110 + 26 * (len(rows) + 1),
                      margin=dict(l=10, r=10, t=70, b=10))
    return fig


# ----------------------------------------------------------------------------- candidates


def candidates_figure(view: dict, inactive: bool = False) -> go.Figure:
    """The candidate tokens' probabilities before and after each sampling processor (bars per
    stage; processors left at their "off" value are hidden unless inactive=True)."""
    cand = view["candidates"]
    labels = [token_label(t["text"]) + ("" if t["text"] == f"[{t['id']}]" else f"  #{t['id']}")
              for t in cand["tokens"]]
    chosen = view["chosen"]["id"]
    fig = go.Figure()
    stages = [s for s in cand["stages"] if s["active"] or inactive or s is cand["stages"][0]]
    top = max(max(s["probs"], default=0.0) for s in stages)
    for n, s in enumerate(stages):
        fig.add_bar(
            y=labels, x=s["probs"], orientation="h", name=s["label"],
            marker_color=STAGE_COLORS[n % len(STAGE_COLORS)],
            customdata=[[s["kept"], s["other"]]] * len(labels),
            hovertemplate="%{y}<br>%{x:.4f}<br>" + s["label"] + " · %{customdata[0]} tokens kept"
                          "<br>others: %{customdata[1]:.4f}<extra></extra>")
    fig.update_layout(
        barmode="group", title=_notice_title(
            view, f"Next-token candidates · chosen {token_label(view['chosen']['text'])!s} "
                  f"(p={view['chosen']['prob']:.3f})"),
        xaxis=dict(title="probability", range=[0, min(1.02, 1.15 * top + 0.01)]),
        yaxis=dict(autorange="reversed", tickfont=dict(family="monospace")),
        legend=dict(orientation="h", y=-0.15), height=max(320, 40 + len(labels) * (12 + 9 * len(stages))),
        margin=dict(l=10, r=10, t=50, b=10))
    if chosen in [t["id"] for t in cand["tokens"]]:
        i = [t["id"] for t in cand["tokens"]].index(chosen)
        fig.add_annotation(x=1.0, xref="paper", y=labels[i], text="◀ chosen", showarrow=False, xanchor="right")
    return fig


# ----------------------------------------------------------------------------- logit lens


def logit_lens_figure(view: dict) -> go.Figure:
    """Layers (embedding at the bottom, last layer at the top) × top-5 tokens, coloured by
    probability, token text in the cells; hover adds the chosen token's probability and rank."""
    lens = view["logit_lens"]
    target = lens["target"]
    rows = lens["rows"]
    k = len(lens["top_ids"][0])
    hover = [[f"{rows[r]} · #{c + 1}: {token_label(lens['top_texts'][r][c], 40)!s} (id {lens['top_ids'][r][c]})"
              f"<br>p = {lens['top_probs'][r][c]:.4f}"
              f"<br>{token_label(target['text'], 40)!s}: p = {target['probs'][r]:.4f}, rank {target['ranks'][r]}"
              for c in range(k)] for r in range(len(rows))]
    text = [[token_label(t, 10) for t in row] for row in lens["top_texts"]]
    fig = go.Figure(go.Heatmap(
        z=lens["top_probs"], x=[f"#{c + 1}" for c in range(k)], y=rows, text=text,
        texttemplate="%{text}", hovertext=hover, hoverinfo="text", colorscale=HEAT, zmin=0, zmax=1,
        colorbar=dict(title="p")))
    fig.update_layout(
        title=_notice_title(view, f"Logit lens: the layer where '{token_label(target['text'])}' appears"),
        yaxis=dict(autorange=True, tickfont=dict(size=10)), xaxis=dict(side="top"),
        height=max(300, 80 + 22 * len(rows)), margin=dict(l=10, r=10, t=70, b=10))
    return fig


# ----------------------------------------------------------------------------- attention


def _masked(values, visible):
    """Probabilities with invisible cells as None (drawn blank), so a window shows its shape."""
    if visible is None:
        return values
    return [v if ok else None for v, ok in zip(values, visible)]


def attention_figure(view_or_layer: dict, layer: int = 0, mode: str = "auto", tokens: list | None = None,
                     heads: list[int] | None = None) -> go.Figure:
    """One layer's attention, query heads grouped under their KV head.

    view_or_layer: a view (then `layer` picks the layer) or one layer's dict from
    InsideSession.attention_layer (then pass `tokens`, the view's "tokens").
    mode: "full" the T × T map of every head as small multiples (one row per KV head), "last" the
    last token's weights over the context (heads × tokens), "auto" full when the view has it.
    heads: the query heads to draw (default all). Cells a query may not see are blank.
    """
    if "attention" in view_or_layer:
        entry = view_or_layer["attention"]["layers"][layer]
        tokens = view_or_layer["tokens"]
        notice = bool(view_or_layer.get("notice"))
    else:
        entry, notice = view_or_layer, False
        if tokens is None:
            raise ValueError("attention_figure needs tokens= with one layer's dict")
    if mode == "auto":
        mode = "full" if entry.get("full") is not None else "last"
    if mode == "full" and entry.get("full") is None:
        mode = "last"
    kv_of = entry["kv_head_of"]
    heads = list(range(len(kv_of))) if heads is None else [h for h in heads if 0 <= h < len(kv_of)]
    labels = [token_label(t["text"], 12) for t in tokens]
    S = len(labels)
    kind = "sliding window " + str(entry["window"]) if entry["window"] else "full attention"
    title = f"Layer {entry['layer']} ({kind})"
    if notice:
        title += " <span style='color:#c0392b'>(random weights)</span>"

    if mode == "last":
        z = [_masked(entry["last_row"][h], entry["last_visible"]) for h in heads]
        ylabels = [f"kv{kv_of[h]} · q{h}" for h in heads]
        fig = go.Figure(go.Heatmap(
            z=z, x=list(range(S)), y=list(range(len(heads))), colorscale=HEAT, zmin=0, zmax=1,
            customdata=[[labels[s] for s in range(S)] for _ in heads],
            hovertemplate="key %{x}: %{customdata}<br>%{z:.4f}<extra></extra>", colorbar=dict(title="p")))
        for n in range(1, len(heads)):  # a line between KV groups
            if kv_of[heads[n]] != kv_of[heads[n - 1]]:
                fig.add_hline(y=n - 0.5, line=dict(color="white", width=3))
        fig.update_layout(
            title=title + f" · last token {labels[-1]!s} over the context",
            xaxis=dict(tickvals=list(range(S)), ticktext=labels, tickangle=-60, title="key token"),
            yaxis=dict(tickvals=list(range(len(heads))), ticktext=ylabels, autorange="reversed",
                       title="query head"),
            height=max(260, 120 + 22 * len(heads)), margin=dict(l=10, r=10, t=50, b=10))
        return fig

    # full: one small map per query head, a row per KV head
    groups: dict[int, list[int]] = {}
    for h in heads:
        groups.setdefault(kv_of[h], []).append(h)
    n_rows, n_cols = len(groups), max(len(g) for g in groups.values())
    fig = make_subplots(rows=n_rows, cols=n_cols, horizontal_spacing=0.02, vertical_spacing=0.06,
                        subplot_titles=[f"q{h} (kv{g})" if c < len(members) else ""
                                        for g, members in groups.items()
                                        for c, h in enumerate(members + [None] * (n_cols - len(members)))])
    visible = entry["full_visible"]
    ticks = list(range(S)) if S <= 24 else list(range(0, S, math.ceil(S / 24)))
    for r, (g, members) in enumerate(groups.items(), start=1):
        for c, h in enumerate(members, start=1):
            z = [_masked(row, visible[q]) for q, row in enumerate(entry["full"][h])]
            fig.add_trace(go.Heatmap(
                z=z, coloraxis="coloraxis", customdata=[[f"{labels[q]} → {labels[k]}" for k in range(S)]
                                                        for q in range(S)],
                hovertemplate=f"q{h}: " + "%{customdata}<br>%{z:.4f}<extra></extra>"), row=r, col=c)
            fig.update_xaxes(tickvals=ticks, ticktext=[labels[t] for t in ticks] if r == n_rows else None,
                             showticklabels=r == n_rows, tickangle=-60, tickfont=dict(size=9), row=r, col=c)
            fig.update_yaxes(tickvals=ticks, ticktext=[labels[t] for t in ticks] if c == 1 else None,
                             showticklabels=c == 1, autorange="reversed", tickfont=dict(size=9), row=r, col=c)
    cell = max(110, min(260, 900 // n_cols))
    fig.update_layout(
        title=title + " · rows: queries, columns: keys", coloraxis=dict(colorscale=HEAT, cmin=0, cmax=1),
        height=80 + n_rows * (cell + 40) + 60, margin=dict(l=10, r=10, t=60, b=10), plot_bgcolor="#f4f4f4")
    return fig
