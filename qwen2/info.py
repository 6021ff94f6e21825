"""ModelInfo: what load_model knows about a model beyond its weights, as one declared object.

Where the weights came from and how they are stored (how decode steps run is not the model's
business: qwen2/fast.py, qwen2/engine.py). It hangs off the model
as `model.info` so that one object travels through the runtime, the profiler and the app, and
nothing needs to guess at optional attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelInfo:
    source: str = ""  # the directory or hub id it was loaded from
    random_weights: bool = False  # built with random weights of the right shape (no checkpoint)
    generation_config: dict = field(default_factory=dict)  # generation_config.json ({} when absent)
    quantization: str | None = None  # a scheme of qwen2.options.QUANT_SCHEMES, or None
    # how quantized weights are laid out (qwen2/quant.py): int8 "blocks of 32" or "per channel",
    # int4 "blocks of 32, x in int8" (our kernel) or "groups of N" (torch's)
    quant_layout: str | None = None
    # int4 blocks rounded with each input's error weighed by its size on a calibration text
    # (qwen2/calibration.py), rather than every input alike
    quant_weighed: bool = False
    huge_page_bytes: int = 0  # weights held in 2 MB pages (qwen2/huge_pages.py)
