"""The page: the header (model, serving state, notices) over three tabs, each laid out by its own module."""

from __future__ import annotations

import gradio as gr

from studio.chat import Chat
from studio.dashboard import Dashboard, serving_view
from studio.hosting import Busy, LoadedModel
from studio.inside import Inside
from studio.runs import RunStore

from . import chat, dashboard, inside

CSS = """
#notice { border-left: 4px solid #f59e0b; padding: 0.25rem 0.75rem; background: #f59e0b14; }
#busy-note:not(:empty) { border-left: 4px solid #3b82f6; padding: 0 0.75rem; }
#kpi-table, #trace-ops { overflow-x: auto; }
/* A reply's tokens from kept guesses (studio/chat.py: guessed_marks): long lines wrap, and the marks
   are translucent so that they read in both themes. */
#chatbot pre.guessed-tokens { white-space: pre-wrap; overflow-wrap: anywhere; }
#chatbot pre.guessed-tokens mark { background: #facc1566; color: inherit; border-radius: 2px; }
@media (max-width: 720px) { .gradio-container { padding: 0 4px !important; } }
/* The dashboard's checkboxes (ui/dashboard.py): Gradio lets a row of them shrink to clip their
   labels; each keeps its label's width and they wrap instead. */
.profile-option { min-width: min(13rem, 100%) !important; flex: 1 1 13rem !important; }

/* The headline table (and the trace's top operations): header cells wrap between words, never
   inside one ("decode tok/s", not "decod e tok/s"); the first column (the run) is narrower, its
   label wrapping; every other column is at least a header word wide. At 1400 px with three runs
   every column is in view; on a phone the table scrolls sideways (the page does not). Gradio sizes
   the columns from these cells. */
#kpi-table { --first-column: min(14rem, 40vw); }  /* 12 columns (the model and hardware ones too) */
#trace-ops { --first-column: min(15rem, 36vw); }  /* in an accordion: a little less room */
:is(#kpi-table, #trace-ops) thead :is(.header, .header-content) {
  white-space: normal !important; word-break: normal !important; overflow-wrap: normal !important;
  hyphens: none !important; }
:is(#kpi-table, #trace-ops) :is(.header-cell.first-column, .body-cell.first-column,
                                .sizing-body td:first-child) {
  width: var(--first-column) !important; min-width: var(--first-column) !important;
  max-width: var(--first-column) !important; flex: 0 0 var(--first-column) !important; }
:is(#kpi-table, #trace-ops) .header-cell:not(.first-column) { min-width: 5.5rem; }
#kpi-table :is(.body-cell .cell-wrap, .body-cell span, .sizing-body .cell-wrap) {
  white-space: normal; word-break: normal; overflow-wrap: normal; }

/* Inside the model: its charts (profiling/inside_charts.py) are drawn for both themes, with
   transparent backgrounds and translucent fills; in dark mode their text is lightened here. */
.dark :is(#inside-attention, #inside-candidates, #inside-lens, #inside-path)
  :is(.infolayer, .xaxislayer-above, .yaxislayer-above, .table) text {
  fill: var(--body-text-color) !important; }
/* The path table is laid out for 760 px (inside_charts.PATH_MIN_PX): narrower, it scrolls sideways. */
#inside-path { overflow-x: auto; }
#inside-path .js-plotly-plot { min-width: 760px; }
"""
THEME_JS = "() => document.querySelector('.dark') ? 'dark' : 'light'"


def build_demo(lm: LoadedModel, runs: RunStore) -> gr.Blocks:
    """The whole page, its events wired to one Busy (the model held alone) shared by every tab."""
    busy = Busy(lm.engine)
    dash = Dashboard(lm, runs, busy)
    # Gradio keeps a copy of every upload and download in its cache: hourly, drop those over an hour old.
    with gr.Blocks(title="Qwen2 Studio", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"# Qwen2 Studio\n{lm.summary()}")
        serving = gr.Markdown(lm.serving(), elem_id="serving")
        # The engine's state (eager -> compiling 2/3 -> compiled, replies in flight), refreshed while the
        # page is open; the tick reads two counters and runs outside the queue.
        gr.Timer(3).tick(lm.serving, None, serving, queue=False, api_visibility="undocumented",
                         show_progress="hidden")
        if lm.notice():
            gr.Markdown(lm.notice(), elem_id="notice")
        theme = gr.Textbox("light", visible=False, label="Chart theme (light or dark)")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                chat.chat_tab(lm, Chat(lm, busy))
            with gr.Tab("Dashboard", id="dashboard"):
                views, status, saved, serving_plot, page_load, then_reveal = dashboard.dashboard_tab(lm, dash, theme)
            with gr.Tab("Inside the model", id="inside"):
                inside.inside_tab(lm, Inside(lm, busy))
        shown = demo.load(None, None, theme, js=THEME_JS).then(
            page_load, theme, [*views, status, saved], api_visibility="undocumented")
        then_reveal(shown).then(serving_view, theme, serving_plot, api_visibility="undocumented")
    return demo
