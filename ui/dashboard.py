"""The Dashboard tab: run a profile or compare runs; headline figures, charts, the trace and the
serving benchmarks. The logic is studio.dashboard's; this module lays it out and maps what it
returns onto the page's components."""

from __future__ import annotations

import gradio as gr

from qwen2 import options
from studio.dashboard import (BASELINE_AVAILABLE, BASELINE_MISSING, VIEW_SLOTS, Dashboard, Progress, Shown,
                              shipped_note)
from studio.errors import VisitorError
from studio.hosting import LoadedModel, device_choices

from .queues import COMPUTE_QUEUE, on_gpu
from .refusals import api_error


def outputs(shown: Shown, choices) -> list:
    """[*views, runs' JSON, downloads, status, run list] for the page."""
    selected = {} if shown.selected is None else {"value": shown.selected}
    return [*shown.views, shown.runs, shown.files, shown.status, gr.update(choices=choices, **selected)]


def events(dash: Dashboard):
    """(profile, compare, page_load): the dashboard's logic as Gradio event functions."""

    def profile(devices=None, dtype="auto", prompt_tokens=64, new_tokens=16, baseline=False, sweep=False,
                trace=False, theme="light", progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
        try:
            for now in dash.profile(devices, dtype, prompt_tokens, new_tokens, baseline, sweep, trace, theme):
                if isinstance(now, Progress):
                    progress(now.fraction, desc=now.desc)
                    yield [gr.skip()] * (len(VIEW_SLOTS) + 2) + [dash.progress_status(now), gr.skip()]
                else:
                    yield outputs(now, dash.runs.choices())
        except VisitorError as exc:
            raise api_error("/profile", exc) from None

    def compare(selected=None, uploaded=None, theme="light"):
        uploads = [(u if isinstance(u, str) else u.name, getattr(u, "orig_name", None)) for u in uploaded or []]
        try:
            return outputs(dash.compare(selected, uploads, theme), dash.runs.choices())
        except VisitorError as exc:
            raise api_error("/compare", exc) from None

    def page_load(theme="light"):
        shown, choices = dash.page_load(theme), dash.runs.choices()
        if shown is None:
            return [gr.skip()] * len(VIEW_SLOTS) + [gr.skip(), gr.update(choices=choices, value=[])]
        return [*shown.views, shown.status, gr.update(choices=choices, value=shown.selected)]

    return profile, compare, page_load


TRACE_MISSING = ("No trace among the runs shown: tick **Record a torch.profiler trace** and press Run, or "
                 "compare a run that has one; its top operations and timeline then appear here.")


def reveal(sweep=None, files=None, ops=None, timeline=None) -> list:
    """Show only the boxes that have something in them (an empty gr.Plot or gr.File is a box with an
    icon): the sweep, the downloads and the trace views, or, in the trace's place, what would appear.
    A separate step after each event, so that the API's outputs stay plain values."""
    has_trace = ops is not None and len(ops) > 0 and timeline is not None
    return [gr.update(visible=sweep is not None), gr.update(visible=bool(files)),
            gr.update(visible=has_trace), gr.update(visible=has_trace), gr.update(visible=not has_trace)]


def dashboard_tab(lm: LoadedModel, dash: Dashboard, theme):
    """The Dashboard tab: run a profile or compare runs; headline figures, charts and the trace."""
    with gr.Row():
        devices = gr.CheckboxGroup(device_choices(), value=[lm.device], label="Devices", min_width=240)
        dtype = gr.Dropdown(["auto", *options.DTYPE_NAMES], value="auto", min_width=240,
                            label="dtype (auto = the chat model's on its device)")
    with gr.Row():
        prompt_tokens = gr.Slider(8, min(4096, lm.context // 2), value=64, step=8, label="Prompt tokens",
                                  min_width=240)
        new_tokens = gr.Slider(2, min(256, lm.context // 4), value=16, step=1, label="New tokens", min_width=240)
    with gr.Row():
        # "profile-option": as wide as its label (ui/page.py), so that on a phone they wrap, never clip
        baseline = gr.Checkbox(False, label="transformers baseline", interactive=BASELINE_AVAILABLE,
                               info=None if BASELINE_AVAILABLE else BASELINE_MISSING,
                               elem_classes="profile-option")
        sweep = gr.Checkbox(False, label="Context sweep", elem_classes="profile-option")
        trace = gr.Checkbox(False, label="Record a torch.profiler trace", elem_classes="profile-option")
    run_btn = gr.Button("Run", variant="primary", elem_id="run-profile")
    status = gr.Markdown("Runs are saved in the app's runs folder (the oldest go first past its cap).",
                         elem_id="profile-status")
    kpi = gr.Dataframe(label="Headline figures (one row per run)", elem_id="kpi-table", interactive=False,
                       wrap=True)
    # The figures carry their own titles: no label badge over them.
    layer_plot = gr.Plot(label="Per-layer latency", show_label=False, elem_id="layer-plot")
    throughput_plot = gr.Plot(label="Throughput and roofline", show_label=False)
    baseline_md = gr.Markdown("", elem_id="baseline-note")  # right under the baseline bars
    memory_plot = gr.Plot(label="Memory", show_label=False)
    sweep_plot = gr.Plot(label="Context sweep", show_label=False, elem_id="sweep-plot", visible=False)
    with gr.Accordion("Trace: top operations and timeline (record a trace, or compare a traced run)",
                      open=True):
        trace_note = gr.Markdown(TRACE_MISSING, elem_id="trace-note")
        trace_ops = gr.Dataframe(label="Top operations", elem_id="trace-ops", interactive=False, visible=False)
        timeline = gr.Plot(label="Trace timeline", show_label=False, elem_id="trace-timeline", visible=False)
    serving_plot = gr.Plot(label="Serving: throughput and time to first token vs concurrent users",
                           show_label=False, elem_id="serving-plot")
    downloads = gr.File(label="Run JSON, HTML report and trace", file_count="multiple", interactive=False,
                        elem_id="run-downloads", visible=False)  # shown once a profile or comparison made some
    with gr.Accordion("Run JSON", open=False):
        run_json = gr.JSON(label="Runs")
    with gr.Accordion("Compare saved, shipped or uploaded runs", open=True):
        gr.Markdown(shipped_note())
        with gr.Row():
            saved = gr.Dropdown([], multiselect=True, label="Saved runs", scale=3, elem_id="saved-runs",
                                allow_custom_value=True, min_width=240)
            refresh = gr.Button("↻ Refresh", scale=0)
        uploads = gr.File(label="Upload run files (.json)", file_count="multiple", file_types=[".json"],
                          type="filepath")
        compare_btn = gr.Button("Compare", elem_id="compare-runs")

    views = [kpi, layer_plot, memory_plot, throughput_plot, sweep_plot, baseline_md, trace_ops, timeline]
    profile, compare, page_load = events(dash)

    def then_reveal(event):
        return event.then(reveal, [sweep_plot, downloads, trace_ops, timeline],
                          [sweep_plot, downloads, trace_ops, timeline, trace_note], queue=False,
                          api_visibility="undocumented", show_progress="hidden")

    # The progress shows in the status, not over a chart: the charts stay until the new ones arrive.
    then_reveal(run_btn.click(dash.starting, None, status, queue=False, api_visibility="undocumented").then(
        on_gpu(profile), [devices, dtype, prompt_tokens, new_tokens, baseline, sweep, trace, theme],
        [*views, run_json, downloads, status, saved], api_name="profile", show_progress_on=status,
        concurrency_id=COMPUTE_QUEUE, concurrency_limit=1))
    then_reveal(compare_btn.click(compare, [saved, uploads, theme], [*views, run_json, downloads, status, saved],
                                  api_name="compare", show_progress_on=status))
    refresh.click(lambda: gr.update(choices=dash.runs.choices()), None, saved, api_visibility="undocumented")
    return views, status, saved, serving_plot, page_load, then_reveal
