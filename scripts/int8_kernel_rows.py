"""Our int8 block kernel against the alternatives, per product of Qwen2-0.5B's layers, by rows of x.

    python scripts/int8_kernel_rows.py [--rows 1,8,47,128,512] [--threads 2] [--rounds 5]

For each shape (q|k|v, o, gate|up, down of the 0.5B model) and row count, alternating in one
process, median of `--rounds` (each the mean of several calls):
- blocks: `torch.ops.qwen2.int8_block_mm` (int8 in blocks of 32, x rounded to int16; qwen2/quant.py);
- per channel: torch's `_weight_int8pack_mm` with bf16 x (what int8 ran before the block kernel);
- dequantised: the weight turned into float32 on the call, then a float32 GEMM.
Weights are random (the time does not depend on the values). A single product's weights (1-9 MB)
may sit in the last-level cache here, so decode rows read faster than a whole step's weights can.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen2 import cpu_kernels  # noqa: E402
from qwen2.quant import Int8BlockLinear, Int8Linear, dequantize, quantize_blocks  # noqa: E402

SHAPES = {"q|k|v": (1152, 896), "o": (896, 896), "gate|up": (9728, 896), "down": (896, 4864)}


def mean_ms(fn, calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,8,47,128,512")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    if cpu_kernels.kernel_error():
        print(f"error: the block kernel is not available: {cpu_kernels.kernel_error()}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{'product':<9}{'rows':>6}{'blocks ms':>11}{'per channel':>13}{'dequantised':>13}")
    for name, (n, k) in SHAPES.items():
        linear = torch.nn.Linear(k, n, bias=False)
        blocks = Int8BlockLinear.from_linear(linear)
        rows_q, rows_scales = quantize_blocks(linear.weight.data)  # plain rows, as a dequantising caller holds them
        channel = Int8Linear.from_linear(linear, fused_kernel=True, max_fused_rows=None)
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k)
            x16 = x.bfloat16()
            calls = max(2, 200 // rows)
            runs = {"blocks": lambda: blocks(x), "channel": lambda: channel(x16),
                    "dequantised": lambda: x @ dequantize(rows_q, rows_scales, torch.float32).t()}
            times = {key: [] for key in runs}
            for _ in range(args.rounds):
                for key, fn in runs.items():
                    times[key].append(mean_ms(fn, calls))
            med = {key: statistics.median(v) for key, v in times.items()}
            print(f"{name:<9}{rows:>6}{med['blocks']:>11.3f}{med['channel']:>13.3f}{med['dequantised']:>13.3f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
