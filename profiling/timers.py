"""Clocks for timing steps and blocks without a sync per block, plus summary statistics.

A clock hands out opaque marks; `seconds(a, b)` is valid after `finish()`. On CPU a mark is a
time.perf_counter() reading. On CUDA (and MPS) a mark is a timing event recorded on the device's
stream, so the hooks cost only an event record each; `finish()` is the one synchronize per step.
"""

from __future__ import annotations

import statistics
import time

import torch

from .device import synchronize


class CpuClock:
    kind = "perf_counter"

    def reset(self) -> None:
        pass

    def mark(self) -> float:
        return time.perf_counter()

    def finish(self) -> None:
        pass

    @staticmethod
    def seconds(start: float, end: float) -> float:
        return end - start


class EventClock:
    """Timing events from a reusable pool; call reset() before a step and finish() after it."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_events"
            self._stream = torch.cuda.current_stream(device)
            self._new = lambda: torch.cuda.Event(enable_timing=True)
        else:
            self.kind = "mps_events"
            self._stream = None
            self._new = lambda: torch.mps.Event(enable_timing=True)
        self._pool: list = []
        self._used = 0

    def reset(self) -> None:
        self._used = 0

    def mark(self):
        if self._used == len(self._pool):
            self._pool.append(self._new())
        event = self._pool[self._used]
        self._used += 1
        if self._stream is not None:
            event.record(self._stream)
        else:
            event.record()
        return event

    def finish(self) -> None:
        synchronize(self.device)

    @staticmethod
    def seconds(start, end) -> float:
        return start.elapsed_time(end) / 1000.0


def make_clock(device: torch.device):
    if device.type in ("cuda", "mps"):
        return EventClock(device)
    return CpuClock()


def _quantile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(values: list[float], scale: float = 1.0) -> dict | None:
    """median / mean / min / max / p10 / p90 / stdev of `values` times `scale` (None if empty)."""
    if not values:
        return None
    ordered = sorted(v * scale for v in values)
    return {
        "n": len(ordered),
        "median": statistics.median(ordered),
        "mean": statistics.fmean(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "p10": _quantile(ordered, 0.10),
        "p90": _quantile(ordered, 0.90),
        "stdev": statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
    }
