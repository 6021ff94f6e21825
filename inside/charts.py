"""Plotly figures of an Inside view (inside.views' JSON).

path_figure(view), candidates_figure(view), logit_lens_figure(view), attention_figure(view, layer):
each takes the dict InsideSession.start/step/view returns (plain JSON, so it can come from an API
call too) and returns a go.Figure. Token text is shown with visible whitespace (token_label).

Every figure takes `theme="light" | "dark"`, as the dashboard's (profiling.charts, whose colours
they share): the text, the template and the table's lines follow the page's theme, backgrounds are
transparent and fills translucent, so the page's own colour shows through. Like profiling.charts,
they read from a 420 px phone to a desktop: titles and key lines are
wrapped to fit 360 px, tick labels are never rotated (token positions are numbered, the tokens
listed in a key and in the hover), attention maps wrap to at most four per row, and the path table
is laid out for PATH_MIN_PX (the page keeps it that wide: it scrolls sideways on a phone).
"""

from __future__ import annotations

import re

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from profiling.chart_style import FONT, LINE_CHARS, THEMES, wrap

STAGE_COLORS = ["#BAB0AC", "#B279A2", "#F58518", "#4C78A8", "#54A24B", "#E45756", "#72B7B2"]
SCOPE_FILL = {"model": "rgba(76,120,168,0.10)", "layer": "rgba(245,133,24,0.16)"}
BAD_FILL = "rgba(228,87,86,0.35)"
HEADER_FILL = "rgba(128,128,128,0.22)"
RULE = "rgba(128,128,128,0.35)"   # table lines, grid lines
BLANK = "rgba(128,128,128,0.14)"  # attention cells a query may not see
HEAT = "Viridis"
PATH_MIN_PX = 760                 # ui/page.py keeps #inside-path at least this wide
CELL_CHAR_PX = 6.2                # a 12 px character (Arial averages 5.7)
MAX_COLS = 4                      # attention maps per row
KEY_TOKENS = 64                   # the token key lists at most this many


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
    """Decimal units (kB, MB, GB), as the dashboard's headline table and charts."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")" if shape is not None else "?"


WARNING = {"light": "#c0392b", "dark": "#ff7b6b"}  # the random-weights note, readable on either page


def _colors(theme: str) -> dict:
    if theme not in THEMES:
        raise ValueError(f"theme must be 'light' or 'dark', got {theme!r}")
    return THEMES[theme]


def _notice(view: dict, theme: str) -> str:
    return f" <span style='color:{WARNING[theme]}'>(random weights)</span>" if view.get("notice") else ""


def _style(fig: go.Figure, theme: str, title: str, subtitle: str = "", *, body: float, **layout) -> go.Figure:
    """The theme's template and text, transparent backgrounds, grey rules, the title (and a wrapped
    subtitle) at the top left with room for them above the `body` px of the plot and its legend, a
    legend along the bottom edge, tick labels never rotated."""
    colors = _colors(theme)
    lines = title.count("<br>") + 1 + (subtitle.count("<br>") + 1 if subtitle else 0)
    top = 30 + 20 * lines
    layout = {"plot_bgcolor": "rgba(0,0,0,0)", **layout}
    fig.update_layout(
        template=colors["template"], paper_bgcolor="rgba(0,0,0,0)",
        font={"family": FONT, "color": colors["ink"], "size": 12}, height=round(top + body),
        title={"text": title, "x": 0, "xref": "container", "xanchor": "left", "y": 1,
               "yref": "container", "yanchor": "top", "pad": {"l": 8, "t": 10}, "font": {"size": 16},
               "subtitle": {"text": subtitle, "font": {"size": 12, "color": colors["muted"]}}},
        margin={"l": 10, "r": 10, "b": 10, "t": top},
        legend={"orientation": "h", "x": 0, "xref": "container", "xanchor": "left", "y": 0,
                "yref": "container", "yanchor": "bottom"},
        hoverlabel={"align": "left"}, **layout)
    fig.update_xaxes(gridcolor=RULE, zerolinecolor=RULE, linecolor=RULE, tickangle=0, automargin=True)
    fig.update_yaxes(gridcolor=RULE, zerolinecolor=RULE, linecolor=RULE, tickangle=0, automargin=True)
    return fig


# ----------------------------------------------------------------------------- the path

PATH_COLUMNS = [("stage", 1.6), ("module", 2.4), ("shape", 1.2), ("params", 0.8), ("what happens", 4.6)]


def _fit(text: str, fraction: float, dotted: bool = False) -> str:
    """A cell's text in lines that fit its column at PATH_MIN_PX; a `dotted` name (a module's path)
    breaks after a dot."""
    chars = max(4, int((PATH_MIN_PX - 40) * fraction / CELL_CHAR_PX) - 1)
    if not dotted:
        return wrap(text, chars)
    line, lines = "", []
    for part in re.findall(r"[^.]+\.?", text):
        if line and len(line) + len(part) > chars:
            lines.append(line)
            line = part
        else:
            line += part
    return "<br>".join(lines + [line])


def path_figure(view: dict, theme: str = "light") -> go.Figure:
    """The path as a table: stage, module, the shape it produced (batch of one dropped), the shape
    the config implies when they differ, parameters, what it does. Layer rows are shaded: they
    repeat once per decoder layer. Cells are wrapped to fit PATH_MIN_PX, so the table's height does
    not depend on the screen's width. The cells' text takes the theme's ink: a table draws its
    own text, which the figure's font colour does not reach."""
    ink = _colors(theme)["ink"]
    m, kv = view["model"], view["kv_cache"]
    rows = view["path"]
    columns: list[list[str]] = [[] for _ in PATH_COLUMNS]
    fill = []
    for s in rows:
        ok = s["ok"]
        text = s["detail"]
        if s["key"] == "attention":
            text += (f"; KV cache {_bytes(kv['bytes_per_token_per_layer'])}/token/layer, "
                     f"{_bytes(kv['bytes_per_layer'])} per layer now")
        cells = [("↻ " if s["scope"] == "layer" else "") + s["label"], s["module"] or "",
                 _shape(s["shape"]) + ("" if ok else f" ≠ {_shape(s['expected'])} ✗"), _count(s["params"]),
                 text]
        for column, cell, (name, fraction) in zip(columns, cells, PATH_COLUMNS):
            column.append(_fit(cell, fraction / sum(f for _, f in PATH_COLUMNS), dotted=name == "module"))
        fill.append(SCOPE_FILL[s["scope"]] if ok else BAD_FILL)
    lines = [max(column[i].count("<br>") + 1 for column in columns) for i in range(len(rows))]
    fig = go.Figure(go.Table(
        columnwidth=[f for _, f in PATH_COLUMNS],
        header=dict(values=[f"<b>{name}</b>" for name, _ in PATH_COLUMNS], fill_color=HEADER_FILL,
                    align="left", line_color=RULE, height=26, font={"color": ink}),
        cells=dict(values=columns, fill_color=[fill] * len(PATH_COLUMNS), align="left", line_color=RULE,
                   height=24, font={"color": ink}),
    ))
    title = wrap(f"{_count(m['parameters'])} params: {m['layers']} layers × {_count(m['parameters_per_layer'])} "
                 f"(↻ rows) + embedding, norm, head", 70) + _notice(view, theme)
    subtitle = wrap(f"{m['heads']} query heads / {m['kv_heads']} KV heads · KV cache {_bytes(kv['bytes'])} for "
                    f"{kv['tokens']} tokens · {view['phase']} of {view['path'][0]['shape'][0]} token(s) · "
                    f"{m['dtype']} on {m['device']}", 110)
    # the header, then each row (24 px for a line; plotly grows a row to hold more), a little slack
    _style(fig, theme, title, subtitle, body=30 + sum(24 if n == 1 else 14 + 16 * n for n in lines) + 24)
    return fig


# ----------------------------------------------------------------------------- candidates


def candidates_figure(view: dict, inactive: bool = False, theme: str = "light") -> go.Figure:
    """The candidate tokens' probabilities before and after each sampling processor (bars per
    stage; processors left at their "off" value are hidden unless inactive=True). The chosen token
    is marked ▶ on its row."""
    cand = view["candidates"]
    chosen = view["chosen"]["id"]
    labels = [("▶ " if t["id"] == chosen else "") + token_label(t["text"])
              + ("" if t["text"] == f"[{t['id']}]" else f"  #{t['id']}") for t in cand["tokens"]]
    fig = go.Figure()
    stages = [s for s in cand["stages"] if s["active"] or inactive or s is cand["stages"][0]]
    top = max(max(s["probs"], default=0.0) for s in stages)
    for n, s in enumerate(stages):
        fig.add_bar(
            y=labels, x=s["probs"], orientation="h", name=wrap(s["label"], 40),
            marker_color=STAGE_COLORS[n % len(STAGE_COLORS)],
            customdata=[[s["kept"], s["other"]]] * len(labels),
            hovertemplate="%{y}<br>%{x:.4f}<br>" + s["label"] + " · %{customdata[0]} tokens kept"
                          "<br>others: %{customdata[1]:.4f}<extra></extra>")
    title = "Next-token candidates" + _notice(view, theme)
    subtitle = wrap(f"▶ chosen: {token_label(view['chosen']['text'])} (p={view['chosen']['prob']:.3f}) · "
                    "probability before and after each sampling setting", LINE_CHARS)
    bars = len(labels) * (12 + 9 * len(stages))
    legend = 12 + 18 * sum(wrap(s["label"], 40).count("<br>") + 1 for s in stages)
    _style(fig, theme, title, subtitle, body=max(200, bars) + 50 + legend, barmode="group",
           xaxis={"title": "probability", "range": [0, min(1.02, 1.15 * top + 0.01)]},
           yaxis={"autorange": "reversed", "tickfont": {"family": "monospace"}})
    return fig


# ----------------------------------------------------------------------------- logit lens


def logit_lens_figure(view: dict, theme: str = "light") -> go.Figure:
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
    text = [[token_label(t, 7) for t in row] for row in lens["top_texts"]]
    fig = go.Figure(go.Heatmap(
        z=lens["top_probs"], x=[f"#{c + 1}" for c in range(k)], y=rows, text=text,
        texttemplate="%{text}", textfont={"size": 10}, hovertext=hover, hoverinfo="text", colorscale=HEAT,
        zmin=0, zmax=1, colorbar=dict(title="p", thickness=14)))
    title = "Logit lens" + _notice(view, theme)
    subtitle = wrap(f"the layer where '{token_label(target['text'])}' appears: each layer's top {k} "
                    "next tokens", LINE_CHARS)
    _style(fig, theme, title, subtitle, body=max(220, 40 + 22 * len(rows)) + 20,
           yaxis=dict(autorange=True, tickfont=dict(size=10)), xaxis=dict(side="top"))
    return fig


# ----------------------------------------------------------------------------- attention


def _masked(values, visible):
    """Probabilities with invisible cells as None (drawn blank), so a window shows its shape."""
    if visible is None:
        return values
    return [v if ok else None for v, ok in zip(values, visible)]


def _token_key(labels: list[str]) -> str:
    """The positions' tokens, for axes that number them: "0 The · 1 ␣c · …"."""
    shown = [f"{i} {t}" for i, t in enumerate(labels[:KEY_TOKENS])]
    more = f" · … ({len(labels)} tokens; hover for the rest)" if len(labels) > KEY_TOKENS else ""
    return wrap("tokens: " + " · ".join(shown) + more, LINE_CHARS, sep=" · ")


def attention_figure(view_or_layer: dict, layer: int = 0, mode: str = "auto", tokens: list | None = None,
                     heads: list[int] | None = None, theme: str = "light") -> go.Figure:
    """One layer's attention, query heads grouped under their KV head.

    view_or_layer: a view (then `layer` picks the layer) or one layer's dict from
    InsideSession.attention_layer (then pass `tokens`, the view's "tokens").
    mode: "full" the T × T map of every head as small multiples (at most four per row, a KV head's
    heads together), "last" the last token's weights over the context (heads × tokens), "auto" full
    when the view has it. heads: the query heads to draw (default all). Cells a query may not see
    are blank. Token positions are numbered on the axes; the tokens are listed in the subtitle.
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
    title = f"Layer {entry['layer']} ({kind})" + _notice({"notice": notice}, theme)

    if mode == "last":
        z = [_masked(entry["last_row"][h], entry["last_visible"]) for h in heads]
        ylabels = [f"kv{kv_of[h]} · q{h}" for h in heads]
        fig = go.Figure(go.Heatmap(
            z=z, x=list(range(S)), y=list(range(len(heads))), colorscale=HEAT, zmin=0, zmax=1,
            customdata=[[labels[s] for s in range(S)] for _ in heads],
            hovertemplate="key %{x}: %{customdata}<br>%{z:.4f}<extra></extra>",
            colorbar=dict(title="p", thickness=14)))
        for n in range(1, len(heads)):  # a line between KV groups
            if kv_of[heads[n]] != kv_of[heads[n - 1]]:
                fig.add_hline(y=n - 0.5, line=dict(color="rgba(128,128,128,0.9)", width=3))
        subtitle = wrap(f"the last token '{labels[-1]}' over the context", LINE_CHARS) + "<br>" + _token_key(labels)
        _style(fig, theme, title, subtitle, body=max(200, 80 + 22 * len(heads)) + 60,
               xaxis=dict(title="key position", showgrid=False, zeroline=False),
               yaxis=dict(tickvals=list(range(len(heads))), ticktext=ylabels, autorange="reversed",
                          title="query head", showgrid=False, zeroline=False))
        return fig

    # full: one small map per query head, a KV head's heads together, at most MAX_COLS per row
    groups: dict[int, list[int]] = {}
    for h in heads:
        groups.setdefault(kv_of[h], []).append(h)
    n_cols = min(MAX_COLS, max(len(g) for g in groups.values()))
    grid: list[list[int | None]] = []  # rows of query heads (None: an empty cell)
    for members in groups.values():
        for i in range(0, len(members), n_cols):
            chunk = members[i:i + n_cols]
            grid.append(chunk + [None] * (n_cols - len(chunk)))
    n_rows = len(grid)
    cell, gap = 200, 50  # a map's height and the room under it (tick labels, the next map's title)
    area = n_rows * cell + (n_rows - 1) * gap
    fig = make_subplots(rows=n_rows, cols=n_cols, horizontal_spacing=0.05 if n_cols > 1 else 0,
                        vertical_spacing=gap / area if n_rows > 1 else 0,
                        subplot_titles=[f"q{h} · kv{kv_of[h]}" if h is not None else "" for row in grid for h in row])
    for note in fig.layout.annotations:
        note.update(font={"size": 12})
    visible = entry["full_visible"]
    few = 3 if n_cols > 2 else None  # at most ~3 numbered ticks on a small map
    for r, row in enumerate(grid, start=1):
        for c, h in enumerate(row, start=1):
            if h is None:
                fig.update_xaxes(visible=False, row=r, col=c)
                fig.update_yaxes(visible=False, row=r, col=c)
                continue
            z = [_masked(values, visible[q]) for q, values in enumerate(entry["full"][h])]
            fig.add_trace(go.Heatmap(
                z=z, coloraxis="coloraxis", customdata=[[f"{q} {labels[q]} → {k} {labels[k]}" for k in range(S)]
                                                        for q in range(S)],
                hovertemplate=f"q{h}: " + "%{customdata}<br>%{z:.4f}<extra></extra>"), row=r, col=c)
            below = r == n_rows or grid[r][c - 1] is None  # nothing under this map
            fig.update_xaxes(showticklabels=below, nticks=few, title_text="key" if below and c == 1 else None,
                             showgrid=False, zeroline=False, row=r, col=c)
            fig.update_yaxes(showticklabels=c == 1, nticks=few, autorange="reversed", showgrid=False,
                             zeroline=False, title_text="query" if c == 1 else None, row=r, col=c)
    subtitle = "rows: queries, columns: keys; positions numbered<br>" + _token_key(labels)
    _style(fig, theme, title, subtitle, body=area + 50, plot_bgcolor=BLANK,
           coloraxis=dict(colorscale=HEAT, cmin=0, cmax=1, colorbar=dict(title="p", thickness=14)))
    return fig
