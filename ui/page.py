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
@media (max-width: 720px) { .gradio-container { padding: 0 4px !important; } }
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
                views, status, saved, serving_plot, page_load = dashboard.dashboard_tab(lm, dash, theme)
            with gr.Tab("Inside the model", id="inside"):
                inside.inside_tab(lm, Inside(lm, busy))
        demo.load(None, None, theme, js=THEME_JS).then(
            page_load, theme, [*views, status, saved], api_visibility="undocumented").then(
            serving_view, theme, serving_plot, api_visibility="undocumented")
    return demo
