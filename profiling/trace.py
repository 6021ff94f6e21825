"""A few prefill/decode steps under torch.profiler, labelled per layer and per block, in ONE file.

Writes DIR/<run>.pt.trace.json.gz: a gzipped Chrome trace that
  - https://ui.perfetto.dev opens directly ("Open trace file"; chrome://tracing too),
  - TensorBoard's PyTorch Profiler tab reads (`tensorboard --logdir DIR`, needs torch-tb-profiler),
  - `top_ops(path)` and `profiling.trace_chart.trace_timeline(path)` summarise and draw.
The labels come from record_function ranges opened and closed by forward hooks (ModuleHooks with
labels=True), so the model itself carries no profiling code.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

from qwen2.options import dtype_name

from .hooks import ModuleHooks
from .steps import new_session

TRACE_SUFFIX = ".pt.trace.json.gz"
STEP_LABELS = ("qwen2.prefill", "qwen2.decode_step")


def run_name_for(model) -> str:
    device = str(model.device).replace(":", "")
    name = f"qwen2-{device}-{dtype_name(model.dtype)}"
    if model.info.quantization:
        name += f"-{model.info.quantization}"
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


def start_profiler_here() -> None:
    """Start and stop torch.profiler once, recording nothing, on the calling thread.

    Kineto, torch.profiler's engine, registers itself on the thread that imported torch and must
    initialise on that same thread: when its first use is on another one (a Gradio worker running a
    trace), it logs "ERROR: External init callback must run in same thread as registerClient". A
    server calls this from its main thread at start-up, so later traces on any thread find it ready.
    The first start also pays torch.profiler's one-time imports."""
    with profile(activities=[ProfilerActivity.CPU]):
        pass


def _profile_steps(model, ids: torch.Tensor, steps: int, prof, on_step=None) -> None:
    """An unrecorded warm-up step, then ProfilerStep#1 = prefill and #2.. = decode steps."""
    with ModuleHooks(model, clock=None, labels=True), torch.inference_mode():
        warm = new_session(model, ids.shape[1] + 1)
        warm.step(warm.prefill(ids).argmax(dim=-1))
        del warm
        prof.step()
        session = new_session(model, ids.shape[1] + steps)
        with record_function(STEP_LABELS[0]):
            token = session.prefill(ids).argmax(dim=-1)
        prof.step()
        if on_step:
            on_step()
        for _ in range(steps):
            with record_function(STEP_LABELS[1]):
                token = session.step(token).argmax(dim=-1)
            prof.step()
            if on_step:
                on_step()


def run_trace(model, ids: torch.Tensor, steps: int, trace_dir, run_name: str | None = None,
              on_step=None) -> dict:
    """Profile one prefill and `steps` decode steps into one trace file; say where it went."""
    trace_dir = Path(trace_dir)
    try:
        trace_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create trace directory {trace_dir}: {exc.strerror or exc}") from None
    path = trace_dir / f"{run_name or run_name_for(model)}{TRACE_SUFFIX}"
    activities = [ProfilerActivity.CPU]
    if model.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    sched = schedule(wait=0, warmup=1, active=1 + steps, repeat=1)
    with profile(activities=activities, schedule=sched, record_shapes=True,
                 on_trace_ready=lambda prof: prof.export_chrome_trace(str(path))) as prof:
        _profile_steps(model, ids, steps, prof, on_step)
    if not path.is_file():
        raise RuntimeError(f"torch.profiler wrote no trace at {path}")
    return {
        "file": str(path),
        "bytes": path.stat().st_size,
        "steps": {"prefill": 1, "decode": steps},
        "activities": [a.name for a in activities],
        "open": {
            "perfetto": f"open {path} at https://ui.perfetto.dev (or chrome://tracing)",
            "tensorboard": f"tensorboard --logdir {trace_dir}  (PyTorch Profiler tab; needs "
                           f"pip install tensorboard torch-tb-profiler)",
        },
    }


def load_trace_events(trace_path) -> tuple[dict, ...]:
    """The complete ("X") events of a Chrome trace file (.json or .json.gz), read-only.

    Parsed once per version of the file: a shipped trace is slow to parse, and the dashboard
    reads it for its top operations and again for its timeline, on every page load."""
    path = Path(trace_path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise OSError(f"cannot read trace {path}: {exc}") from None
    return _parse_trace_events(path.resolve(), stat.st_mtime_ns, stat.st_size)


MAX_TRACE_BYTES = 64 * 2**20   # decompressed; a 24-layer, 4-step CPU trace is 12 MB
MAX_TRACE_OBJECTS = 1_000_000  # JSON objects; that trace has 56 thousand


class _TooManyObjects(Exception):
    pass


@functools.lru_cache(maxsize=4)
def _parse_trace_events(path: Path, mtime_ns: int, size: int) -> tuple[dict, ...]:
    # A trace may come with a visitor's run: a few hundred KB of gzip can inflate to gigabytes, and
    # a few MB of "{}," to millions of dicts, so both the text and the objects parsed are capped.
    opener = gzip.open if path.suffix == ".gz" else open
    objects = 0

    def count(obj):
        nonlocal objects
        objects += 1
        if objects > MAX_TRACE_OBJECTS:
            raise _TooManyObjects
        return obj

    try:
        with opener(path, "rb") as fh:
            raw = fh.read(MAX_TRACE_BYTES + 1)
        if len(raw) > MAX_TRACE_BYTES:
            raise OSError(f"it holds more than {MAX_TRACE_BYTES // 2**20} MB of JSON, the most a trace "
                          f"may hold here")
        data = json.loads(raw, object_hook=count)
    except _TooManyObjects:
        raise OSError(f"cannot read trace {path.name}: more than {MAX_TRACE_OBJECTS:,} JSON objects, "
                      f"the most a trace may hold here") from None
    except (OSError, ValueError, EOFError) as exc:
        raise OSError(f"cannot read trace {path.name}: {exc}") from None
    events = data.get("traceEvents", []) if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise OSError(f"cannot read trace {path.name}: traceEvents is not a list")
    return tuple(e for e in events if isinstance(e, dict) and e.get("ph") == "X" and "dur" in e)


def cpu_op_parents(events: list[dict]) -> list[int | None]:
    """For each event, the index of the event it runs directly inside on the same thread (None
    for a top-level one)."""
    parents: list[int | None] = [None] * len(events)
    by_thread: dict = {}
    for i, e in enumerate(events):
        by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(i)
    for indices in by_thread.values():
        indices.sort(key=lambda i: (events[i]["ts"], -events[i]["dur"]))
        stack: list[int] = []
        for i in indices:
            while stack and events[stack[-1]]["ts"] + events[stack[-1]]["dur"] <= events[i]["ts"]:
                stack.pop()
            parents[i] = stack[-1] if stack else None
            stack.append(i)
    return parents


def _self_times(events: list[dict]) -> list[float]:
    """Each event's self time (us): its duration less that of the events directly inside it."""
    selfs = [float(e["dur"]) for e in events]
    for i, parent in enumerate(cpu_op_parents(events)):
        if parent is not None:
            selfs[parent] -= float(events[i]["dur"])
    return selfs


def top_ops(trace_path, n: int = 15) -> list[dict]:
    """The `n` operators that take the most time in the trace's profiled steps.

    On a GPU trace these are the GPU kernels; otherwise the CPU operators (aten::*), by self time
    (time in the operator itself, not in operators it calls). Each row: name, calls, total_ms
    (self time summed over calls), mean_ms, percent (of the profiled steps' time).
    """
    events = load_trace_events(trace_path)
    kernels = [e for e in events if e.get("cat") == "kernel"]
    ops = kernels or [e for e in events if e.get("cat") == "cpu_op"]
    times = [float(e["dur"]) for e in ops] if kernels else _self_times(ops)
    steps_us = sum(float(e["dur"]) for e in events if e.get("name") in STEP_LABELS) or \
        sum(float(e["dur"]) for e in events if str(e.get("name", "")).startswith("ProfilerStep"))
    totals: dict[str, list] = {}
    for event, us in zip(ops, times):
        row = totals.setdefault(str(event.get("name")), [0, 0.0])
        row[0] += 1
        row[1] += max(us, 0.0)
    ranked = sorted(totals.items(), key=lambda kv: kv[1][1], reverse=True)[:n]
    return [{"name": name, "calls": calls, "total_ms": us / 1e3, "mean_ms": us / 1e3 / calls,
             "percent": 100 * us / steps_us if steps_us else None}
            for name, (calls, us) in ranked]
