"""The Inside-the-model tab: one token being made, with the shapes, candidates, logit lens and attention."""

from __future__ import annotations

import gradio as gr

from studio.errors import VisitorError
from studio.hosting import LoadedModel
from studio.inside import Inside

from .queues import COMPUTE_QUEUE, on_gpu
from .refusals import api_error, checked_by_studio


PLACEHOLDER = ("*Run* draws here, for the token the model makes next: the attention maps of each layer, the "
               "candidates before and after each sampling setting, the logit lens and the path with its "
               "tensor shapes.")


def with_page_theme(n_inputs: int) -> str:
    """An event's js: its last input (a hidden theme box) becomes the page's theme at the click, so the
    charts are drawn for the theme shown now. Gradio passes the inputs' values, then the outputs'."""
    return (f"(...values) => [...values.slice(0, {n_inputs - 1}), "
            "document.querySelector('.dark') ? 'dark' : 'light']")


def events(inside: Inside):
    """(start, step, attention): the Inside logic as Gradio event functions, keyed by the browser session."""

    def start(prompt, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=-1, layer=0,
              theme="light", request: gr.Request = None):
        try:
            return inside.start(request.session_hash if request else "", prompt, temperature, top_k, top_p, min_p,
                                repetition_penalty, seed, layer, theme)
        except VisitorError as exc:
            raise api_error("/inside", exc) from None

    def step(layer=0, theme="light", request: gr.Request = None):
        try:
            return inside.step(request.session_hash if request else "", layer, theme)
        except VisitorError as exc:
            raise api_error("/inside_step", exc) from None

    def attention(view, layer, theme="light"):
        figure = inside.attention(view, layer, theme)
        return gr.skip() if figure is None else figure

    return start, step, attention


def inside_tab(lm: LoadedModel, inside: Inside):
    """The Inside-the-model tab: one token being made, with the shapes, candidates, lens and attention."""
    gr.Markdown("Watch one token being made by the loaded model: the path with the real tensor shapes, "
                "the next-token candidates before and after each sampling setting, the logit lens (what "
                "each layer would predict) and the attention maps. *Next token* takes one decode step.")
    with gr.Row():
        prompt = gr.Textbox("The capital of France is", label="Prompt", elem_id="inside-prompt", scale=4,
                            min_width=240)
        run = gr.Button("Run", variant="primary", elem_id="inside-run", scale=1, min_width=100)
        step = gr.Button("Next token", elem_id="inside-step", scale=1, min_width=100)
    with gr.Accordion("Sampling settings (temperature 0 = greedy)", open=False):
        with gr.Row():
            temperature = checked_by_studio(gr.Slider(0, 2, value=0.0, step=0.05, label="Temperature", min_width=160))
            top_k = checked_by_studio(gr.Slider(0, 200, value=0, step=1, label="Top-k (0 = off)", min_width=160))
            top_p = checked_by_studio(gr.Slider(0.01, 1, value=1.0, step=0.01, label="Top-p (1 = off)", min_width=160))
            min_p = checked_by_studio(gr.Slider(0, 0.99, value=0.0, step=0.01, label="Min-p (0 = off)", min_width=160))
            penalty = checked_by_studio(gr.Slider(0.5, 2, value=1.0, step=0.01, min_width=160,
                                                  label="Repetition penalty (1 = off)"))
            seed = checked_by_studio(gr.Number(0, precision=0, label="Seed (-1 = random)", min_width=160))
    summary = gr.Markdown(PLACEHOLDER, elem_id="inside-summary")
    theme = gr.Textbox("light", visible=False, label="Chart theme (light or dark)")
    # Hidden until a run has drawn them: before, each would be an empty box with an icon.
    with gr.Column(visible=False) as views:
        layer = gr.Slider(0, lm.model.config.num_hidden_layers - 1, value=0, step=1, label="Attention: layer",
                          elem_id="inside-layer")
        attention = gr.Plot(label="Attention", show_label=False, elem_id="inside-attention")
        with gr.Row(equal_height=False):
            candidates = gr.Plot(label="Next-token candidates", show_label=False, elem_id="inside-candidates",
                                 min_width=320)
            lens = gr.Plot(label="Logit lens", show_label=False, elem_id="inside-lens", min_width=320)
        path = gr.Plot(label="The path", show_label=False, elem_id="inside-path")
        with gr.Accordion("The view as JSON", open=False):
            view = gr.JSON(label="View")
    outputs = [summary, path, candidates, lens, attention, view]
    queued = dict(concurrency_id=COMPUTE_QUEUE, concurrency_limit=1, show_progress_on=[summary])
    inputs = [prompt, temperature, top_k, top_p, min_p, penalty, seed, layer, theme]
    start, step_one, attention_of = events(inside)

    def show_views():
        return gr.Column(visible=True)

    revealed = dict(fn=show_views, inputs=None, outputs=views, queue=False, api_visibility="undocumented",
                    show_progress="hidden")
    run.click(on_gpu(start), inputs, outputs, api_name="inside", js=with_page_theme(len(inputs)),
              **queued).success(**revealed)
    prompt.submit(on_gpu(start), inputs, outputs, api_visibility="undocumented", js=with_page_theme(len(inputs)),
                  **queued).success(**revealed)
    step.click(on_gpu(step_one), [layer, theme], outputs, api_name="inside_step", js=with_page_theme(2), **queued)
    layer.release(attention_of, [view, layer, theme], attention, api_visibility="undocumented",
                  js=with_page_theme(3))
