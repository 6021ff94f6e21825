"""What every tab does with a visitor's refused request: one line in the server's log and a readable
message on the page or to the API client, never a traceback (those are for bugs); and settings an
API client sends reach studio's checks, which name the parameter and the range the runtime takes."""

from __future__ import annotations

import gradio as gr


def checked_by_studio(component):
    """`component` (a slider or number box of a setting) passing its value on as sent: the browser
    keeps it in the page's range, and a value an API client sends reaches studio.chat's check, which
    names the parameter and the range the runtime takes ("top_p=0.0 is invalid; expected in (0, 1]
    (1 = off)"), where Gradio's own check would say "Value 0.0 is less than minimum value 0.01." and
    print a traceback (or, for a string in a number box, fail with a TypeError).

    Set on the instance: a subclass would do, but Gradio writes a .pyi stub beside every module that
    defines a component class."""
    info = component.api_info()
    if isinstance(component, gr.Slider):
        info["description"] = (f"the page's slider spans {component.minimum} to {component.maximum}; "
                               "the API takes any value the runtime accepts")
    component.preprocess = lambda payload: payload
    component.api_info = lambda: dict(info)
    return component


def refused(where: str, exc: Exception) -> str:
    """A request refused for the visitor (bad settings, an empty or too long message, a full server):
    one line in the server's log, no traceback; returns the message."""
    message = str(exc)
    print(f"[qwen2-studio] {where} refused: {' '.join(message.split())[:300]}", flush=True)
    return message


def api_error(where: str, exc: Exception) -> gr.Error:
    # Gradio prints the traceback of every gr.Error unless told not to: a refusal is not a bug.
    return gr.Error(refused(where, exc), print_exception=False)
