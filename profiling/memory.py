"""Memory figures: exact weight bytes from the parameters, and the peak during a run.

Peak on CUDA is torch.cuda.max_memory_allocated (reset at the start). On CPU it is the peak
resident set size: the kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs) where
Linux allows it, otherwise a psutil RSS sampler thread; both are the whole process (Python,
torch, libraries, an app). `profiling.assemble.memory_section` takes the model's own peak apart
from that process baseline.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import psutil
import torch


def _unique_bytes(tensors) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        if t.device.type == "meta":
            key = (id(t), 0)
        else:
            key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def weight_bytes(model: torch.nn.Module) -> dict:
    """Bytes of the parameters (tied ones counted once) and of the persistent buffers."""
    params = _unique_bytes(model.parameters())
    persistent = set(model.state_dict(keep_vars=True).keys())
    buffers = _unique_bytes(b for name, b in model.named_buffers() if name in persistent)
    return {"parameter_bytes": params, "buffer_bytes": buffers, "weights_bytes": params + buffers}


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _vm_hwm() -> int | None:
    try:
        match = re.search(r"VmHWM:\s+(\d+)\s*kB", _STATUS.read_text())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _vm_hwm() is not None


class PeakMemory:
    """Context manager: `.peak_bytes`, `.start_bytes` and `.source` after exit."""

    def __init__(self, device: torch.device, sample_interval_s: float = 0.005):
        self.device = device
        self.interval = sample_interval_s
        self.peak_bytes: int | None = None
        self.start_bytes: int | None = None
        self.source = ""
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled = 0

    def _sample(self, proc: psutil.Process) -> None:
        while not self._stop.wait(self.interval):
            self._sampled = max(self._sampled, proc.memory_info().rss)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            self.source = "torch.cuda.max_memory_allocated"
            return self
        if self.device.type == "mps":
            self.start_bytes = torch.mps.current_allocated_memory()
            self._sampled = self.start_bytes
            self.source = "torch.mps.driver_allocated_memory (end of run)"
            return self
        proc = psutil.Process()
        self.start_bytes = proc.memory_info().rss
        if _reset_hwm():
            self.source = "peak RSS (VmHWM, reset at start)"
        else:
            self.source = "peak RSS (psutil sampling)"
            self._sampled = self.start_bytes
            self._thread = threading.Thread(target=self._sample, args=(proc,), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        if self.device.type == "mps":
            torch.mps.synchronize()
            self.peak_bytes = int(max(self._sampled, torch.mps.driver_allocated_memory()))
            return
        rss = psutil.Process().memory_info().rss
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = int(max(self._sampled, rss))
        else:
            self.peak_bytes = int(max(_vm_hwm() or 0, rss))


def held_tensor_bytes(obj, skip=()) -> int:
    """Bytes of the tensors reachable from obj's attributes, lists, tuples and dicts, each storage
    counted once and whole (a view keeps its base alive); the objects in `skip` not entered."""
    seen = {id(s) for s in skip}
    storages: dict[int, int] = {}
    stack = [obj]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            st = x.untyped_storage()
            storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
        elif isinstance(x, torch.nn.Module):
            continue
        elif hasattr(x, "__dict__") and not isinstance(x, type):
            stack.extend(vars(x).values())
    return sum(storages.values())
