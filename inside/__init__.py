"""Inside the model: one prompt's path through the network, a token at a time, for the app's
"Inside the model" tab and its API. An explainer, not a measurement: it shows the shapes every
stage produced, the candidates before and after each sampling processor, the logit lens and the
attention maps, each checked against the model itself (tests/test_inside.py).

    settings.py   InsideSettings: the sampling, the token cap and what the views include
    capture.py    Capture: forward hooks that copy out shapes, q and the residual stream
    session.py    InsideSession: prefill, step, what is kept between clicks; inside_view
    views.py      the JSON view: path table rows, KV cache, candidates, logit lens, attention
    charts.py     Plotly figures of a view, light or dark (imported on its own: it needs plotly)

It drives the runtime through its public interfaces only: qwen2.generate.DecodeSession (eager, so
the hooks fire), qwen2.sampling.Sampler (draw / mark) and processor_stages, and qwen2.model's
apply_rope and visibility_mask to recompute the attention probabilities SDPA does not expose.
"""

from qwen2.config import parameter_counts

from .session import Forward, InsideSession, inside_view
from .settings import InsideSettings

__all__ = ["Forward", "InsideSession", "InsideSettings", "inside_view", "parameter_counts"]
