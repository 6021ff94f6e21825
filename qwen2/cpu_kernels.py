"""Our own CPU kernels (qwen2/csrc/), compiled on first use by the machine's C++ compiler (the one
Inductor needs for the compiled decode step) and kept compiled in a cache directory.

`int8_block_mm` (csrc/int8_blocks.cpp): x @ W^T with W int8 in blocks of 32 along the input, one
float16 scale per block (llama.cpp's Q8_0 layout), summed in float32. torch 2.13 has no CPU kernel
for it: its int8 kernel takes one scale per output channel, and sums in float32 at decode speed only
for bf16 inputs (docs/benchmarks.md).

`int4_block_mm` (csrc/int4_blocks.cpp): W int4 in blocks of 32 with a float16 scale and minimum
(llama.cpp's Q4_1 layout), x rounded to int8 per block and each block's products summed as integers,
as llama.cpp does; torch's int4 kernel converts every level to float and was slower (docs/benchmarks.md).

`bf16_panel_mm` (csrc/bf16_panels.cpp): bf16 W widened to float32 in registers, float32 sums, for
CPUs without bf16 math, where torch converts bf16 products as it goes (qwen2/upcast.py).

`decode_attention` (csrc/decode_attention.cpp): one query row's attention over a fixed-size cache
or rows of the engine's pool, its masked keys skipped, for the compiled CPU decode steps
(qwen2/cpu_attention.py).

All are one library and registered as operators (torch.ops.qwen2.*), so that compiled steps call
them like any aten kernel. The products take x and give y in the model's dtype (float32 or bf16)
and keep their small working memory per calling thread between calls (csrc/panels.h).

The build takes ~15 s once per machine (torch's extension builder, with the `ninja` of
requirements.txt, found beside the interpreter where a virtual environment is not activated);
`QWEN2_KERNEL_CACHE` moves the cache (default ~/.cache/qwen2-studio/kernels), a damaged library in
it is built anew, and `QWEN2_NO_KERNELS=1` turns the kernels off. Where the CPU has AVX-512 with
VNNI, the quantized kernels use it (`instruction_set()` says which were built);
`QWEN2_KERNEL_AVX512=0` builds the AVX2 ones instead, which is how the tests check both on one CPU.
Where the build fails, int8 falls back to torch's per-channel kernel, int4 to torch's int4 kernel,
bf16 prompts to float32 copies (qwen2/upcast.py), decode attention to Inductor's fusion of the
model's math, and `kernel_error()` says why.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name("csrc") / name for name in ("int8_blocks.cpp", "int4_blocks.cpp", "bf16_panels.cpp",
                                                                      "bf16_dot.cpp", "decode_attention.cpp")]
HEADERS = [Path(__file__).with_name("csrc") / "panels.h"]
BLOCK = 32  # weights per scale, fixed by the kernels
PANEL = 8  # output channels the kernels take at once (csrc/panels.h): weights' outputs come in multiples
# -march=native: the kernel is built on the machine that runs it (its cache key holds the CPU's flags).
# -falign-functions=64: a kernel's loops then sit where its own code puts them, whatever comes before
# it in the library; shifted by 16 bytes, identical int8 code for four rows ran 12 % slower on an AMD
# EPYC with AVX-512 (docs/benchmarks.md, fourteenth round).
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-falign-functions=64"]  # OpenMP for at::parallel_for, resolved to torch's own runtime


def _cflags() -> list[str]:
    if os.environ.get("QWEN2_KERNEL_AVX512", "").strip() == "0":
        return CFLAGS + ["-mno-avx512f"]  # off with every AVX-512 extension
    return CFLAGS

_lock = threading.Lock()
_error: list[str | None] = []  # [] before the first try; then [None] or [why not]


def cache_dir() -> Path:
    return Path(os.environ.get("QWEN2_KERNEL_CACHE") or Path.home() / ".cache" / "qwen2-studio" / "kernels")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def _build_key() -> str:
    text = "\n".join([*(source.read_text() for source in SOURCES + HEADERS), torch.__version__, " ".join(_cflags()), _cpu_flags()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _ninja_dir() -> str | None:
    """Where the `ninja` that requirements.txt installs lives, when it is not on PATH (a virtual
    environment used without activating it): torch's extension builder runs plain `ninja`."""
    if shutil.which("ninja"):
        return None
    try:
        import ninja
        return ninja.BIN_DIR
    except ImportError:
        return str(Path(sys.executable).parent)


def _build_and_load() -> None:
    from torch.utils import cpp_extension

    key = _build_key()
    name = f"qwen2_kernels_{key}"
    library = cache_dir() / key / f"{name}.so"
    if library.is_file():
        try:
            torch.ops.load_library(str(library))
        except OSError:  # a damaged file in the cache: build it anew
            library.unlink(missing_ok=True)
    if not library.is_file():
        library.parent.mkdir(parents=True, exist_ok=True)
        # A fresh directory per build: cpp_extension's lock file, left behind by a killed build,
        # would make every later start wait on it forever.
        build = Path(tempfile.mkdtemp(prefix="build-", dir=library.parent))
        path = os.environ.get("PATH", "")
        try:
            if _ninja_dir():
                os.environ["PATH"] = os.pathsep.join([_ninja_dir(), path])
            cpp_extension.load(name=name, sources=[str(source) for source in SOURCES], extra_cflags=_cflags(), build_directory=str(build),
                               is_python_module=False, verbose=False)
            os.replace(build / f"{name}.so", library)  # whole or absent: another process may be reading it
        finally:
            os.environ["PATH"] = path
            shutil.rmtree(build, ignore_errors=True)

    @torch.library.register_fake("qwen2::int8_block_mm")
    def _(x, q, scales):
        return x.new_empty(x.shape[0], q.shape[0])

    @torch.library.register_fake("qwen2::int4_block_mm")
    def _(x, q, scales, mins):
        return x.new_empty(x.shape[0], q.shape[0])

    @torch.library.register_fake("qwen2::bf16_linear")
    def _(x, w, bias=None):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("qwen2::bf16_panel_mm")
    def _(x, w):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("qwen2::decode_attention")
    def _(q, k, v, rows, keys, valid, scale):
        return q.new_empty(q.shape, dtype=v.dtype)


def kernel_error() -> str | None:
    """None when our kernels (torch.ops.qwen2.*) are ready in this process, else why they are not.
    The first call builds (or loads) them; a failure is warned about once."""
    with _lock:
        if not _error:
            if os.environ.get("QWEN2_NO_KERNELS", "").strip() not in ("", "0"):
                _error.append("turned off by QWEN2_NO_KERNELS")
            else:
                try:
                    _build_and_load()
                    _error.append(None)
                except Exception as exc:  # noqa: BLE001 - any failure to build means: use torch's kernels
                    _error.append(f"building {', '.join(source.name for source in SOURCES)} failed: {type(exc).__name__}: {str(exc).strip()[-400:]}")
                    warnings.warn(f"int8 falls back to per-channel scales, int4 to torch's kernel, bf16 prompts to "
                                  f"float32 copies, decode attention to the model's math: {_error[0]}",
                                  stacklevel=2)
        return _error[0]


def instruction_set(build: bool = True) -> str | None:
    """The instructions our kernels were built for ("avx512-vnni", "avx2" or "scalar"); None without
    them, or, with build=False, before this process first needed them (a run file's note)."""
    if not build and not _error:
        return None
    return None if kernel_error() else torch.ops.qwen2.instruction_set()


def blocks_available(device: torch.device) -> bool:
    """Whether weights can be stored in blocks on `device`: a CPU, with the kernels built (or buildable)."""
    return device.type == "cpu" and kernel_error() is None
