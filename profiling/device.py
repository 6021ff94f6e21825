"""A device's synchronize and its memory-bandwidth limit (the "roofline" of a decode step).

`memory_bandwidth_limit` returns the peak bandwidth a decode step could reach: a published figure
for known GPUs, otherwise a short measured copy/read benchmark (always measured on CPU).
Device names and dtypes are qwen2.options' (`resolve_device`, `parse_dtype`, `dtype_name`).
"""

from __future__ import annotations

import functools
import re
import time

import torch

from qwen2 import huge_pages

# Published HBM/GDDR bandwidth of common inference GPUs, bytes/s. Matched against the CUDA device
# name (case-insensitive) in order, so the more specific patterns come first.
GPU_BANDWIDTH_TABLE: list[tuple[str, float, str]] = [
    (r"\bh200\b", 4.8e12, "H200"),
    (r"\bh100\b.*\bnvl\b", 3.9e12, "H100 NVL"),
    (r"\bh100\b.*\b(sxm|hbm3)", 3.35e12, "H100 SXM"),
    (r"\bh100\b", 2.0e12, "H100 PCIe"),
    (r"\ba100\b.*\b80\s?gb\b", 2.0e12, "A100 80GB"),
    (r"\ba100\b", 1.555e12, "A100 40GB"),
    (r"\bl40s?\b", 0.864e12, "L40/L40S"),
    (r"\bl4\b", 0.3e12, "L4"),
    (r"\bt4\b", 0.32e12, "T4"),
    (r"\ba10g?\b", 0.6e12, "A10G"),
]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def table_bandwidth(gpu_name: str) -> tuple[float, str] | None:
    """(bytes/s, table entry) for a known GPU name, or None."""
    lowered = gpu_name.lower()
    for pattern, bandwidth, label in GPU_BANDWIDTH_TABLE:
        if re.search(pattern, lowered):
            return bandwidth, label
    return None


def _best_time(fn, device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=None)
def _measure(device_str: str, nbytes: int, repeats: int) -> dict:
    device = torch.device(device_str)
    n = nbytes // 4
    # where the model keeps its weights: on CPU in 2 MB pages (qwen2/huge_pages.py)
    src = huge_pages.zeros((n,), device, torch.float32).fill_(1.0)
    dst = huge_pages.zeros((n,), device, torch.float32)
    dst.copy_(src)  # touch the pages once so the first timed pass does not page-fault
    src.sum()
    copy_s = _best_time(lambda: dst.copy_(src), device, repeats)
    read_s = _best_time(lambda: src.sum(), device, repeats)
    del src, dst
    copy_bw = 2 * n * 4 / copy_s  # a copy reads and writes every byte
    read_bw = n * 4 / read_s
    return {"copy_bytes_per_s": copy_bw, "read_bytes_per_s": read_bw,
            "bytes_per_s": max(copy_bw, read_bw), "buffer_bytes": n * 4}


def measure_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 5) -> dict:
    """A short copy + read benchmark over a buffer larger than the caches (result cached)."""
    if nbytes is None:
        nbytes = 256 * 2**20 if device.type == "cpu" else 1024 * 2**20
    return dict(_measure(str(device), int(nbytes), int(repeats)))


def memory_bandwidth_limit(device: torch.device | str) -> tuple[float, str]:
    """(bytes/s, source): source is "table" for a known GPU, else "measured"."""
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if device.type == "cuda":
        hit = table_bandwidth(torch.cuda.get_device_name(device))
        if hit is not None:
            return hit[0], "table"
    return measure_bandwidth(device)["bytes_per_s"], "measured"
