"""What the profiler's timing hooks cost an eager decode step: hooked and clean steps alternating on
one session (the hooks attached for every other step), medians of each.

    python scripts/hook_cost.py [--dtype bfloat16] [--quantize int8] [--steps 120] [--threads 2]

A profile measures the same thing call by call (profiling.steps.paired_runs); this is the plain
check beside it, without the profile's other stages.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qwen2  # noqa: E402
from profiling.hooks import ModuleHooks  # noqa: E402
from profiling.timers import CpuClock  # noqa: E402
from qwen2.generate import DecodeSession  # noqa: E402

WARM_STEPS = 10


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=".models/Qwen2.5-Coder-0.5B-Instruct")
    p.add_argument("--dtype", default=None)
    p.add_argument("--quantize", default=None)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = qwen2.load_model(args.model, dtype=args.dtype, quantize=args.quantize)
    clock = CpuClock()
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    clean, hooked = [], []
    with torch.inference_mode():
        session = DecodeSession(model, batch_size=1, max_len=ids.shape[1] + args.steps + 1)
        token = session.prefill(ids).argmax(-1)
        for i in range(args.steps):
            with_hooks = i % 2 == 1
            if with_hooks:
                with ModuleHooks(model, clock) as hooks:
                    hooks.start_step()
                    start = time.perf_counter()
                    token = session.step(token).argmax(-1)
                    seconds = time.perf_counter() - start
                    hooks.collect()
            else:
                start = time.perf_counter()
                token = session.step(token).argmax(-1)
                seconds = time.perf_counter() - start
            if i >= WARM_STEPS:
                (hooked if with_hooks else clean).append(seconds)
    c, h = statistics.median(clean), statistics.median(hooked)
    print(f"{model.dtype}, quantize={args.quantize}: clean {c * 1e3:.2f} ms  hooked {h * 1e3:.2f} ms  "
          f"overhead {100 * (h / c - 1):+.1f} %  ({len(clean)} steps each, alternating)")


if __name__ == "__main__":
    main()
