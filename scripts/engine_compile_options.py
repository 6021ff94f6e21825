#!/usr/bin/env python
"""How the engine's compiled decode step pays off under different Inductor options: compile time,
step time at 1 and 4 rows (and eager beside it), peak RSS, and whether Inductor's FX graph cache
was hit, missed or bypassed. One configuration per process; run it twice with the same
TORCHINDUCTOR_CACHE_DIR for the cold and the warm compile (docs/benchmarks.md, "Serving").

    TORCHINDUCTOR_CACHE_DIR=/tmp/ic python scripts/engine_compile_options.py MODEL [--no-freezing]
        [--no-weight-prepack] [--mode max-autotune|default] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qwen2  # noqa: E402
from qwen2.engine import Engine  # noqa: E402
from qwen2.steps import EagerSteps  # noqa: E402


def step_ms(decode, cache, batch: int, n: int = 15) -> float:
    rows, ids, positions = list(range(batch)), [1] * batch, [100] * batch
    for _ in range(3):
        decode(cache, rows, ids, positions)
    start = time.perf_counter()
    for _ in range(n):
        decode(cache, rows, ids, positions)
    return round((time.perf_counter() - start) / n * 1e3, 1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--mode", default="max-autotune", choices=("max-autotune", "default"))
    p.add_argument("--no-freezing", action="store_true")
    p.add_argument("--no-weight-prepack", action="store_true")
    args = p.parse_args()
    model = qwen2.load_model(args.model, dtype=args.dtype)
    engine = Engine(model, rows=4, row_tokens=1024, fast_decode="compile", compile_mode=args.mode)
    engine.steps.inductor_config["freezing"] = not args.no_freezing
    if args.no_weight_prepack:
        engine.steps.inductor_config["cpp.weight_prepack"] = False
    start = time.perf_counter()
    engine.compile_now()
    result = {"freezing": not args.no_freezing, "weight_prepack": not args.no_weight_prepack, "mode": args.mode,
              "dtype": args.dtype, "compile_s": round(time.perf_counter() - start, 1)}
    cache = engine._pool()
    with torch.inference_mode():
        for batch in (1, 4):
            result[f"step_ms_{batch}_rows"] = step_ms(engine.steps.decode, cache, batch)
            result[f"eager_ms_{batch}_rows"] = step_ms(lambda *a: EagerSteps.decode(engine.steps, *a), cache, batch, 5)
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    result["fx_graph_cache"] = {k: v for k, v in torch._dynamo.utils.counters["inductor"].items() if "cache" in k}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
