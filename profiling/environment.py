"""What the run ran on: device, CPU, GPU, torch, the project's git commit, a timestamp."""

from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from qwen2 import cpu_kernels
from qwen2.options import dtype_name

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                 text=True, timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info() -> dict:
    """{"commit": sha or None, "dirty": bool or None}; None outside a git checkout."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _load_average() -> list[float] | None:
    """The machine's 1/5/15-minute load averages: above the core count, other work competed."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cpus_usable() -> int | None:
    """The CPUs this process may run on: in a container or under taskset, fewer than the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    env = {
        "device": str(device),
        "device_type": device.type,
        "dtype": dtype_name(dtype),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": cpus_usable(),
        "torch_threads": torch.get_num_threads(),
        "cpu_kernels": cpu_kernels.instruction_set(build=False) if device.type == "cpu" else None,
        "gpu_name": None,
        "gpu_memory_bytes": None,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "git": git_info(),
        "load_average": _load_average(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_name"] = props.name
        env["gpu_memory_bytes"] = int(props.total_memory)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
    elif device.type == "mps":
        env["gpu_name"] = "Apple MPS"
    env["device_name"] = env["gpu_name"] or env["cpu_model"]
    return env
