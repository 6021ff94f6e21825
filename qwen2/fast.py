"""Which fast decode path serves single-stream decoding (qwen2.generate, ChatSession, the profiler):
CUDA graphs on CUDA (qwen2/cuda_graphs.py), an Inductor-compiled step on CPU (qwen2/cpu_compile.py),
or none. The caller holds the decoder and hands it to what decodes; the model knows nothing of it.
(The serving engine has its own batched step runners: qwen2/steps.py.)
"""

from __future__ import annotations

from .decoders import PooledDecoder
from .errors import ConfigError
from .options import check_fast_decode


def make_decoder(model, mode: str | None = "auto") -> PooledDecoder | None:
    """The decoder for fast_decode `mode` ("auto", "graphs", "compile", "off") on the model's device;
    None for "off" (and for "auto" where no fast path applies). Raises ConfigError for a mode the
    device cannot run."""
    mode = check_fast_decode(mode)
    device = model.device.type
    if mode == "auto":
        mode = {"cuda": "graphs", "cpu": "compile"}.get(device, "off")  # CPU: 2.5x decode, docs/benchmarks.md
    if mode == "off":
        return None
    if device == "cuda":
        from .cuda_graphs import CudaGraphDecoder

        return CudaGraphDecoder(model, compile=mode == "compile")
    if mode == "graphs":
        raise ConfigError(f"fast_decode='graphs' (CUDA graphs) needs a CUDA device; got {model.device}")
    if device == "cpu":
        from .cpu_compile import CompiledCpuDecoder

        return CompiledCpuDecoder(model)
    raise ConfigError(f"fast_decode={mode!r} is not available on {model.device}; use 'off'")


def warm_up_or_off(decoder: PooledDecoder | None, progress=None) -> tuple[PooledDecoder | None, Exception | None]:
    """Warm `decoder` up now, not in a first reply: (the decoder, None), or (None, the error) where
    that fails (no C++ compiler for Inductor, say) and decoding must run eagerly."""
    if decoder is None:
        return None, None
    try:
        decoder.warm_up(progress)
    except Exception as exc:  # noqa: BLE001 - any capture or compiler failure: the eager path still answers
        return None, exc
    return decoder, None
