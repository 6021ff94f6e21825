"""Which fast decode path serves single-stream decoding (qwen2.generate, ChatSession, the profiler):
CUDA graphs on CUDA (qwen2/cuda_graphs.py), an Inductor-compiled step on CPU (qwen2/cpu_compile.py),
or none. The caller holds the fast path and hands it to what decodes; the model knows nothing of it.
(The serving engine has its own batched step runners: qwen2/steps.py.)
"""

from __future__ import annotations

from .fast_path import FastPath
from .errors import ConfigError
from .options import check_fast_decode


def make_fast_path(model, mode: str | None = "auto") -> FastPath | None:
    """The fast path for fast_decode `mode` ("auto", "graphs", "compile", "off") on the model's device;
    None for "off" (and for "auto" where no fast path applies). Raises ConfigError for a mode the
    device cannot run."""
    mode = check_fast_decode(mode)
    device = model.device.type
    if mode == "auto":
        mode = {"cuda": "graphs", "cpu": "compile"}.get(device, "off")  # speed-ups: docs/benchmarks.md
    if mode == "off":
        return None
    if device == "cuda":
        from .cuda_graphs import CudaGraphPath

        return CudaGraphPath(model, compile=mode == "compile")
    if mode == "graphs":
        raise ConfigError(f"fast_decode='graphs' (CUDA graphs) needs a CUDA device; got {model.device}")
    if device == "cpu":
        from .cpu_compile import CompiledCpuPath

        return CompiledCpuPath(model)
    raise ConfigError(f"fast_decode={mode!r} is not available on {model.device}; use 'off'")


def warm_up_or_off(fast_path: FastPath | None, progress=None) -> tuple[FastPath | None, Exception | None]:
    """Warm `fast_path` up now, not in a first reply: (the fast_path, None), or (None, the error) where
    that fails (no C++ compiler for Inductor, say) and decoding must run eagerly."""
    if fast_path is None:
        return None, None
    try:
        fast_path.warm_up(progress)
    except Exception as exc:  # noqa: BLE001 - any capture or compiler failure: the eager path still answers
        return None, exc
    return fast_path, None
