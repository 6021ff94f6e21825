"""The engine's compiled one-row decode step against the eager one, on both sides of 4096 keys
(qwen2.steps.MAX_COMPILED_KEYS: on our attention kernel one compile serves them all; on Inductor's
attention, the first compile serves keys below it and the "long" one those above).

    python scripts/long_context_steps.py [--dtype float32] [--quantize int8] [--compile-mode max-autotune]
                                         [--attention cpu_kernel|single_query] [--rows 2]

Compiles the step runner as the engine does for rows of 8192 tokens (verification left out), fills
the cache with random keys and values, then at each key count alternates 5 compiled and 5 eager
steps (--rows N: one batched step of N rows, each at its own length) and prints their medians, the
ratio, the largest logit difference and whether anything was compiled anew. The logit difference
is a smoke check only: over random (or all-zero) keys the real model's large query-key products
make attention pick keys on rounding, and bf16 logits differ by whole units; on a real prefix the
compiled and eager bf16 steps are both within 0.1-0.3 of float32 (docs/benchmarks.md).
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
from qwen2.cache import RowCache  # noqa: E402
from qwen2.steps import CompiledCpuSteps, EagerSteps  # noqa: E402

KEYS = (101, 4001, 4096, 4097, 6001, 8001)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=".models/Qwen2.5-Coder-0.5B-Instruct")
    p.add_argument("--dtype", default=None)
    p.add_argument("--quantize", default=None)
    p.add_argument("--compile-mode", default="max-autotune")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=1, help="rows decoded in one batched step (default 1)")
    p.add_argument("--attention", choices=("cpu_kernel", "single_query"), default=None,
                   help="the compiled step's attention (default: the engine's, cpu_attention.decode_backend)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from torch._dynamo.utils import counters

    model = qwen2.load_model(args.model, dtype=args.dtype, quantize=args.quantize)
    cache = RowCache(model.config, args.rows, 8192, model.device, model.dtype)
    generator = torch.Generator().manual_seed(0)
    for tensor in cache.k + cache.v:
        tensor.normal_(generator=generator)
    steps = CompiledCpuSteps(model, args.rows, args.compile_mode, verify_width=0, row_tokens=cache.row_len,
                             attention=args.attention)
    rows = list(range(args.rows))
    steps.compile_now(lambda: cache, lambda fraction, message: print(f"  {message}", flush=True))
    print(f"{model.dtype}, quantize={args.quantize}, {args.compile_mode}, attention {steps.attention}, "
          f"{args.rows} row(s): compile s per job "
          f"{ {job: round(s) for job, s in steps.ready.items()} }")
    with torch.inference_mode():
        for keys in KEYS:
            graphs = counters["stats"]["unique_graphs"]
            compiled, eager, diff = [], [], 0.0
            for i in range(5):
                positions = [keys - 1 + i - 7 * row for row in rows]  # the first row reads `keys` keys
                start = time.perf_counter()
                a = steps.decode(cache, rows, [5] * len(rows), positions)
                compiled.append(time.perf_counter() - start)
                start = time.perf_counter()
                b = EagerSteps.decode(steps, cache, rows, [5] * len(rows), positions)
                eager.append(time.perf_counter() - start)
                diff = max(diff, (a.float() - b.float()).abs().max().item())
            c, e = statistics.median(compiled), statistics.median(eager)
            print(f"keys {keys:>5}: compiled {c * 1e3:6.1f} ms  eager {e * 1e3:6.1f} ms  {e / c:.2f}x  "
                  f"max |logit diff| {diff:.1e}  compiled anew: {counters['stats']['unique_graphs'] - graphs}",
                  flush=True)


if __name__ == "__main__":
    main()
