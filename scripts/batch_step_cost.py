"""What the engine's compiled decode step costs for a batch of rows (visitors decoding together)
against one row, on the real checkpoint: both steps alternate in one process, so the machine's
memory speed, which moves between processes, is the same for both.

    python scripts/batch_step_cost.py [--dtype bfloat16] [--quantize int8|int4] [--rows 4]
                                      [--pairs 30] [--compile-mode default] [--threads 2]

The steps run on rows of the engine's pool at position 64 (what they read does not depend on the
values in the cache). Prints the median of each and their ratio: 1.00x would be a batch for the
price of one row, `rows`x no gain from batching.
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
from qwen2.engine import Engine  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=".models/Qwen2.5-Coder-0.5B-Instruct")
    p.add_argument("--dtype", default=None)
    p.add_argument("--quantize", choices=["int8", "int4"], default=None)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--pairs", type=int, default=30)
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.rows < 2:
        p.error("--rows must be 2 or more (a batch against one row)")
    torch.set_num_threads(args.threads)
    model = qwen2.load_model(args.model, dtype=args.dtype, quantize=args.quantize)
    engine = Engine(model, rows=args.rows, fast_decode="compile", compile_mode=args.compile_mode)
    engine.compile_now()
    steps, cache = engine.steps, engine._pool()
    times = {1: [], args.rows: []}
    with torch.inference_mode():
        for _ in range(args.pairs):
            for batch in times:
                start = time.perf_counter()
                steps.decode(cache, list(range(batch)), [0] * batch, [64] * batch)
                times[batch].append(time.perf_counter() - start)
    engine.close()
    one, many = statistics.median(times[1]), statistics.median(times[args.rows])
    print(f"{args.model} {model.info.quantization or model.dtype} | torch {torch.__version__}, {args.threads} threads | "
          f"compiled ({args.compile_mode}), {args.pairs} alternating pairs")
    print(f"1 row {one * 1e3:.1f} ms, {args.rows} rows {many * 1e3:.1f} ms: {many / one:.2f}x one row "
          f"({args.rows * one / many:.2f}x the tokens a second)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
