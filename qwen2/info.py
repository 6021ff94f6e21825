"""ModelInfo: what load_model knows about a model beyond its weights, as one declared object.

Where the weights came from, how they are stored, and how decode steps run. It hangs off the model
as `model.info` so that one object travels through the runtime, the profiler and the app, and
nothing needs to guess at optional attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelInfo:
    source: str = ""  # the directory or hub id it was loaded from
    random_weights: bool = False  # built with random weights of the right shape (no checkpoint)
    generation_config: dict = field(default_factory=dict)  # generation_config.json ({} when absent)
    quantization: str | None = None  # a scheme of qwen2.options.QUANT_SCHEMES, or None
    # The fast decode path (a qwen2.decoders.PooledDecoder: CUDA graphs or a compiled step), or None
    # for plain module calls. DecodeSession uses it unless told to stay eager.
    decoder: Any = None

    @property
    def decode_path(self) -> str:
        return self.decoder.name if self.decoder is not None else "eager"
