"""The names a user can pass — devices, dtypes, quantization schemes, fast-decode modes — parsed and
checked in one place, so the runtime, the profiler, the terminal chat and the app accept the same
words and refuse the same mistakes with the same message.
"""

from __future__ import annotations

import functools
import re

import torch

from . import cpu_kernels
from .errors import ConfigError

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
DTYPE_NAMES = ("float32", "bfloat16", "float16")

# Weight-only quantization (qwen2/quant.py): activations stay in the model's dtype.
QUANT_SCHEMES = ("int8", "int4")

# How decode steps run (qwen2/fast_path.py): "graphs" replays CUDA graphs, "compile" runs a compiled
# step (CUDA: compiled, then captured as a graph; CPU: Inductor), "auto" picks per device, "off" is
# plain module calls.
FAST_DECODE_MODES = ("auto", "graphs", "compile", "off")


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """"float32" | "bfloat16" | "float16" (or fp32/bf16/fp16/half, or the torch.dtype) -> torch.dtype."""
    if name is None:
        return None
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():  # e.g. torch.int8 or float64: the network is not built for them
            raise ConfigError(f"unsupported dtype {name}; expected one of {', '.join(DTYPE_NAMES)}")
        return name
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_NAMES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def check_quantize(scheme: str | None) -> str | None:
    if scheme is None or scheme == "none":
        return None
    if scheme not in QUANT_SCHEMES:
        raise ConfigError(f"quantize={scheme!r} is not supported; expected one of {QUANT_SCHEMES} or None")
    return scheme


def check_fast_decode(mode: str | None) -> str:
    mode = "off" if mode is None else mode
    if mode not in FAST_DECODE_MODES:
        raise ConfigError(f"fast_decode={mode!r} is unknown; expected one of {FAST_DECODE_MODES}")
    return mode


def resolve_device(name: str | torch.device) -> torch.device:
    """A torch.device that exists on this machine, or a ConfigError saying what is available."""
    text = str(name).strip().lower()
    match = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", text)
    if not match:
        raise ConfigError(f"device {str(name)!r} is not a device name; expected cpu, cuda, cuda:N or mps")
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)")
            raise ConfigError(f"device {text!r} is not available: CUDA is not available ({why}); use cpu")
        count = torch.cuda.device_count()
        i = int(index) if index is not None else torch.cuda.current_device()
        if i >= count:
            raise ConfigError(f"device {text!r} is not available: this machine has {count} "
                              f"CUDA device(s), cuda:0 to cuda:{count - 1}")
        return torch.device("cuda", i)
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        why = ("this torch build has no MPS support" if mps is None or not mps.is_built()
               else "MPS needs Apple silicon with macOS 12.3+")
        raise ConfigError(f"device {text!r} is not available: {why}")
    return torch.device("mps")


@functools.lru_cache(maxsize=1)
def cpu_has_bfloat16_math() -> bool:
    """Whether this CPU computes in bf16 natively (AVX-512 BF16 or AMX), read from its feature flags.

    Without them torch converts bf16 to fp32 on the fly and fp32 is the faster activation dtype.
    A feature check, not a timing: a busy machine must not flip the choice between two runs.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(getattr(torch.cpu, probe)() for probe in probes if hasattr(torch.cpu, probe))
    except RuntimeError:
        return False


def quantized_wants_bfloat16(device: torch.device, quantize: str | None) -> bool:
    """Whether `quantize`'s CPU kernels are fast with bf16 activations only: torch's int8 and int4
    kernels, used where ours are not built. Ours (blocks) sum in float32 whatever their input
    (qwen2/quant.py). Builds them on first use."""
    if device.type != "cpu" or not quantize:
        return False
    return not cpu_kernels.blocks_available(device)


def default_dtype(device: torch.device, config_dtype: str | None = None,
                  quantize: str | None = None) -> torch.dtype:
    """On CPU: fp32 for int8 and int4 in our blocks, which sum in float32 whatever x is: bf16
    activations cost them quality (int8's KL from the float32 reference 5.6e-5 -> 2.3e-4) and bought
    no speed, even where the CPU has bf16 math (docs/benchmarks.md, sixteenth round); else bf16 where
    the CPU has bf16 math or torch's quantized kernels want it (above); else fp32. On GPU the
    checkpoint's dtype."""
    if device.type == "cpu":
        if quantize:
            return torch.bfloat16 if quantized_wants_bfloat16(device, quantize) else torch.float32
        return torch.bfloat16 if cpu_has_bfloat16_math() else torch.float32
    return parse_dtype(config_dtype) or torch.bfloat16
