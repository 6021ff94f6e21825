"""A few prefill/decode steps under torch.profiler, labelled per layer and per block.

Writes, under DIR:
  DIR/<run>/<worker>.<ts>.pt.trace.json   via tensorboard_trace_handler: `tensorboard --logdir DIR`
                                           -> PyTorch Profiler tab (needs torch-tb-profiler)
  DIR/<run>.chrome_trace.json             the same trace for https://ui.perfetto.dev or
                                           chrome://tracing ("Open trace file")
The labels come from record_function ranges opened and closed by forward hooks (ModuleHooks with
labels=True), so the model itself carries no profiling code.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule
from torch.profiler import tensorboard_trace_handler

from .device import dtype_name
from .hooks import ModuleHooks
from .steps import new_session, quantization


def run_name_for(model) -> str:
    device = str(model.device).replace(":", "")
    name = f"qwen2-{device}-{dtype_name(model.dtype)}"
    quantize = quantization(model)
    if quantize:
        name += f"-{quantize}"
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


def run_trace(model, ids: torch.Tensor, steps: int, trace_dir, run_name: str | None = None,
              on_step=None) -> dict:
    """Profile one prefill and `steps` decode steps; return where the files went."""
    trace_dir = Path(trace_dir)
    run_name = run_name or run_name_for(model)
    run_dir = trace_dir / run_name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create trace directory {run_dir}: {exc.strerror or exc}") from None
    before = set(run_dir.glob("*.pt.trace.json"))

    device = model.device
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    worker = run_name
    # step 0 warms the profiler up (not recorded); then ProfilerStep#1 = prefill, #2.. = decode
    sched = schedule(wait=0, warmup=1, active=1 + steps, repeat=1)
    with profile(activities=activities, schedule=sched, record_shapes=True, profile_memory=True,
                 on_trace_ready=tensorboard_trace_handler(str(run_dir), worker_name=worker)) as prof:
        with ModuleHooks(model, clock=None, labels=True), torch.inference_mode():
            warm = new_session(model, ids.shape[1] + 1)
            warm.step(warm.prefill(ids).argmax(dim=-1))
            del warm
            prof.step()
            session = new_session(model, ids.shape[1] + steps)
            with record_function("qwen2.prefill"):
                token = session.prefill(ids).argmax(dim=-1)
            prof.step()
            if on_step:
                on_step()
            for i in range(steps):
                with record_function("qwen2.decode_step"):
                    token = session.step(token).argmax(dim=-1)
                prof.step()
                if on_step:
                    on_step()
            del session
    new_files = sorted(set(run_dir.glob("*.pt.trace.json")) - before)
    if not new_files:
        raise RuntimeError(f"torch.profiler wrote no *.pt.trace.json under {run_dir}")
    chrome = trace_dir / f"{run_name}.chrome_trace.json"
    shutil.copyfile(new_files[-1], chrome)  # the handler's file is a Chrome trace already
    return {
        "dir": str(trace_dir),
        "run_dir": str(run_dir),
        "tensorboard_files": [str(p) for p in new_files],
        "chrome_trace": str(chrome),
        "steps": {"prefill": 1, "decode": steps},
        "activities": [a.name for a in activities],
        "open": {
            "tensorboard": f"tensorboard --logdir {trace_dir}  (PyTorch Profiler tab)",
            "perfetto": f"open {chrome} at https://ui.perfetto.dev (or chrome://tracing)",
        },
    }
