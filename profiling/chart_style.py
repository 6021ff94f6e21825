"""The charts' shared look: colours, the light and dark themes, the font, text measures (lines of
so many characters, pixels per line), byte units, and the layout helpers every figure is built
with (stacked panels, runs as rows of horizontal bars, values written past the bars' ends, legends
at the bottom). profiling/charts.py and inside/charts.py draw with these; nothing here knows a run.
"""

from __future__ import annotations

import re

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
MEMORY_COLORS = {"weights": "#4C78A8", "kv": "#F58518", "activations": "#54A24B"}
PATTERNS = ["", "/", "x", ".", "\\", "+", "-", "|"]
RUN_COLORS = ["#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#FF9DA6",
              "#9D755D"]
# Plotly draws the active button near-white (#F4FAFF, fixed): buttons keep dark text in both themes.
THEMES = {
    "light": {"template": "plotly_white", "ink": "#222222", "muted": "#666666",
              "button": "#E1E5EA", "border": "#9AA3AF"},
    "dark": {"template": "plotly_dark", "ink": "#EEEEEE", "muted": "#AAAAAA",
             "button": "#AEB6C2", "border": "#D0D5DC"},
}

# Sizes that hold at 420 px (a phone: the chart is about 360 px wide) and at any larger width.
FONT = 'Arial, "Liberation Sans", Helvetica, sans-serif'  # the same metrics on every system
TITLE_CHARS = 36     # a title line (17 px)
LINE_CHARS = 44      # a subtitle line or a legend entry's line (12 px)
TICK_CHARS = 14      # a line of a run's name on the runs' axis
CHAR_PX = 7.0        # a 12 px character, generously
LINE_PX = 16         # a line of 12 px text
VALUE_AXIS_PX = 200  # the value axis' length on a phone: room is kept there for every value label
BAR_PX = 18          # a horizontal bar's thickness
GROUP = 0.8          # the part of a run's row that its bars fill
PANEL_GAP_PX = 92    # between stacked panels: tick labels, axis title and the next panel's title
AXIS_PX = 48         # under the last panel: its tick labels and axis title


# -- units, layout -------------------------------------------------------------------------
def byte_unit(max_bytes: float) -> tuple[float, str]:
    """The decimal unit (GB, MB, kB, B) to show `max_bytes` in: the headline table's MB system."""
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if max_bytes >= scale:
            return scale, unit
    return 1.0, "B"


def wrap(text: str, width: int = LINE_CHARS, sep: str = " ") -> str:
    """`text` in lines of at most `width` characters (broken at `sep` only, so a longer word keeps
    its line), joined with <br>; existing <br> are kept."""
    lines = []
    for part in str(text).split("<br>"):
        line = ""
        for word in part.split(sep):
            if line and len(line) + len(sep) + len(word) > width:
                lines.append(line)
                line = word
            else:
                line = f"{line}{sep}{word}" if line else word
        lines.append(line)
    return "<br>".join(lines)


def text_lines(text: str) -> int:
    return str(text).count("<br>") + 1 if text else 0


def number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def finite_value(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def theme_colors(theme: str) -> dict:
    if theme not in THEMES:
        raise ValueError(f"theme must be 'light' or 'dark', got {theme!r}")
    return THEMES[theme]


def top_margin(title: str, subtitle: str = "", buttons: bool = False) -> int:
    """Room above the plot: the title's and subtitle's lines, the buttons, the first panel's title."""
    return max(100, 20 + 24 * text_lines(title) + LINE_PX * text_lines(subtitle) + (40 if buttons else 0) + 34)


def style(fig: go.Figure, theme: str, title: str, subtitle: str = "", *, height: int,
           buttons: bool = False, **layout) -> go.Figure:
    """Template, transparent background (the page's colour shows), the title (and a subtitle) in
    the figure's top left, the legend along the figure's bottom edge (its rows push the plot up,
    however many a narrow screen needs), value axes from 0, tick labels never rotated."""
    colors = theme_colors(theme)
    title, subtitle = wrap(title, TITLE_CHARS), wrap(subtitle) if subtitle else ""
    fig.update_layout(
        template=colors["template"], paper_bgcolor="rgba(0,0,0,0)", height=height,
        plot_bgcolor="rgba(0,0,0,0)", font={"color": colors["ink"], "family": FONT, "size": 12},
        title={"text": title, "x": 0, "xref": "container", "xanchor": "left", "y": 1,
               "yref": "container", "yanchor": "top", "pad": {"l": 8, "t": 12},
               "font": {"size": 17},
               "subtitle": {"text": subtitle, "font": {"size": 12, "color": colors["muted"]}}},
        margin={"t": top_margin(title, subtitle, buttons), "b": 8, "l": 8, "r": 16},
        legend={"orientation": "h", "x": 0, "xref": "container", "xanchor": "left", "y": 0,
                "yref": "container", "yanchor": "bottom", "traceorder": "normal",
                "font": {"size": 12}},
        hoverlabel={"align": "left"}, **layout)
    fig.update_xaxes(automargin=True, tickangle=0)
    fig.update_yaxes(automargin=True, tickangle=0)
    return fig


def legend_px(names: list[str]) -> int:
    """The legend's height on a phone, where each entry may take a row of its own."""
    return 12 + LINE_PX * sum(text_lines(n) for n in names)


def stacked_panels(rows_px: list[float], titles: list[str] | None = None) -> tuple[go.Figure, float]:
    """One panel per row, `rows_px` high each on a phone (taller where the legend needs fewer rows),
    subplot titles at each panel's top left, clear of the panel above; (figure, plot area px)."""
    area = sum(rows_px) + PANEL_GAP_PX * (len(rows_px) - 1)
    fig = make_subplots(rows=len(rows_px), cols=1, row_heights=[p / sum(rows_px) for p in rows_px],
                        vertical_spacing=PANEL_GAP_PX / area if len(rows_px) > 1 else 0,
                        subplot_titles=titles)
    for note in fig.layout.annotations:
        note.update(x=0, xanchor="left", font={"size": 14}, yshift=4)
    return fig, area


def empty_figure(text: str, theme: str, title: str) -> go.Figure:
    fig = go.Figure()
    style(fig, theme, title, height=300)
    fig.add_annotation(text=wrap(text, 40), showarrow=False, xref="paper", yref="paper", x=0.5,
                       y=0.5, font={"size": 14})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


# -- runs as rows of horizontal bars -----------------------------------------------------------
def bar_slot(s: int, n: int) -> tuple[float, float]:
    """Where series s of n sits in a run's row (offset from the row's centre, downwards) and the
    thickness of its bar, in rows."""
    width = GROUP / n
    return -GROUP / 2 + width * (s + 0.5), width * 0.86


def row_px(n_runs: int, n_series: int, labels: list[str]) -> float:
    """A panel's height: each run's row holds its bars and its name's lines."""
    name_lines = max((text_lines(wrap(label, TICK_CHARS, " · ")) for label in labels), default=1)
    return n_runs * max(n_series * BAR_PX, name_lines * LINE_PX + 6) / GROUP


def runs_axis(fig: go.Figure, labels: list[str], row: int) -> None:
    """The runs' axis of a panel: run i at y = i, first at the top, named in short lines."""
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(labels))),
                     ticktext=[wrap(label, TICK_CHARS, " · ") for label in labels],
                     range=[len(labels) - 0.5, -0.5], showgrid=False, zeroline=False,
                     ticks="", row=row, col=1)


def hbar(fig: go.Figure, row: int, s: int, n: int, hovers: list[str], values: list, **bar) -> go.Bar:
    """Series s of n as horizontal bars, one per run, in its slot of each run's row; the run's full
    account (headline.hover_labels: model, hardware, settings) is the hover text."""
    offset, width = bar_slot(s, n)
    fig.add_bar(x=values, y=[i + offset for i in range(len(values))], width=width,
                orientation="h", hovertext=hovers, textposition="none", row=row, col=1, **bar)
    return fig.data[-1]


def value_room(ends: list[float], texts: list[str]) -> float:
    """The value axis' end that leaves room for every label past its bar on a phone."""
    top = 0.0
    for end, text in zip(ends, texts):
        px = len(re.sub(r"<[^>]+>", "", text or "")) * CHAR_PX + 12
        top = max(top, number(end) / max(1.0 - px / VALUE_AXIS_PX, 0.3))
    return top


class ValueLabels:
    """Value labels written past the end of each bar (or of its whisker), added as text traces after
    every bar so that the bars keep their places in fig.data."""

    def __init__(self):
        self.points: dict[int, list[tuple[float, float, str]]] = {}

    def add(self, row: int, s: int, n: int, ends: list, texts: list[str]) -> None:
        offset, _ = bar_slot(s, n)
        self.points.setdefault(row, []).extend(
            (number(e), i + offset, "\u00a0" + t)  # a space from the bar's end or whisker
            for i, (e, t) in enumerate(zip(ends, texts)) if t and e is not None)

    def room(self, row: int) -> float:
        points = self.points.get(row, [])
        ends = [p[0] for p in points]
        return max(value_room(ends, [p[2] for p in points]), 1.05 * max(ends, default=0.0))

    def draw(self, fig: go.Figure, theme: str) -> None:
        for row, points in self.points.items():
            if points:
                fig.add_scatter(x=[p[0] for p in points], y=[p[1] for p in points],
                                text=[p[2] for p in points], mode="text", textposition="middle right",
                                textfont={"color": theme_colors(theme)["ink"], "size": 12}, cliponaxis=False,
                                showlegend=False, hoverinfo="skip", name="values", row=row, col=1)
            fig.update_xaxes(range=[0, self.room(row)], row=row, col=1)
