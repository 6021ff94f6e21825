"""One decode's worth of weights through our CPU kernels, by rows of x: what 2-9 rows (a speculative
verification, a prompt's tiles) cost against one row once the weights come from memory.

    python scripts/kernel_stream.py [--kinds bf16-dot,bf16,int8,int4] [--rows 1,2,3,4] [--rounds 7]
                                    [--threads 2]

Each kind holds random weights of Qwen2-0.5B's products in its kernel's layout (24 layers of
q|k|v, o, gate|up and down, and the 151936-row head: 988 MB in bf16, 525 MB int8, 309 MB int4, far
more than the caches), each in 2 MB pages as load_model places them (qwen2/huge_pages.py), and a
pass runs every product once on `rows` rows of bf16 x, as a compiled step does. "bf16-dot" is a bf16
model's product on CPUs with bf16 math (qwen2/csrc/bf16_dot.cpp, plain weights), "bf16" the panels
of CPUs without it (qwen2/csrc/bf16_panels.cpp). Passes alternate between row counts; prints the median pass, the weights' GB/s, that as
a share of the machine's measured bandwidth (profiling.device), and its cost against one row. The
kernels' int16 / int8 sums are exact, so the time does not depend on the values.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from profiling.device import measure_bandwidth  # noqa: E402
from qwen2 import cpu_kernels, huge_pages  # noqa: E402
from qwen2.quant import quantize_blocks, to_panels  # noqa: E402
from qwen2.upcast import to_panels as bf16_panels  # noqa: E402

SHAPES = [(1152, 896), (896, 896), (9728, 896), (896, 4864)] * 24 + [(151936, 896)]  # (out, in)


def weights_of(kind: str, weight: torch.Tensor) -> tuple:
    """The kernel's operands for one (out, in) float weight, each in 2 MB pages where it fills one."""
    if kind == "bf16-dot":
        operands = (weight.bfloat16(),)
    elif kind == "bf16":
        operands = (bf16_panels(weight.bfloat16()),)
    elif kind == "int8":
        operands = to_panels(*quantize_blocks(weight))
    else:
        operands = tuple(torch.ops.qwen2.quantize_int4_blocks(weight))
    return tuple(huge_pages.zeros(t.shape, t.device, t.dtype).copy_(t) for t in operands)


def product_of(kind: str):
    return {"bf16-dot": torch.ops.qwen2.bf16_linear, "bf16": torch.ops.qwen2.bf16_panel_mm,
            "int8": torch.ops.qwen2.int8_block_mm, "int4": torch.ops.qwen2.int4_block_mm}[kind]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default="bf16-dot,bf16,int8,int4")
    p.add_argument("--rows", default="1,2,3,4")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if cpu_kernels.kernel_error():
        print(f"error: our kernels are not available: {cpu_kernels.kernel_error()}", file=sys.stderr)
        return 2
    if "bf16-dot" in args.kinds.split(",") and not torch.ops.qwen2.bf16_dot_available():
        print("error: our kernels are not built with AVX-512 BF16 on this CPU (kind bf16-dot)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    bandwidth = measure_bandwidth(torch.device("cpu"))["bytes_per_s"]
    print(f"machine bandwidth {bandwidth / 1e9:.1f} GB/s, {args.threads} threads")
    for kind in args.kinds.split(","):
        weights = [weights_of(kind, torch.randn(n, k) * 0.02) for n, k in SHAPES]
        nbytes = sum(t.numel() * t.element_size() for operands in weights for t in operands)
        xs = {r: {k: torch.randn(r, k, dtype=torch.bfloat16) for k in {k for _, k in SHAPES}} for r in rows}
        product = product_of(kind)

        def one_pass(r: int) -> float:
            start = time.perf_counter()
            for (_, k), operands in zip(SHAPES, weights):
                product(xs[r][k], *operands)
            return time.perf_counter() - start

        one_pass(rows[0])
        times = {r: [] for r in rows}
        for _ in range(args.rounds):
            for r in rows:
                times[r].append(one_pass(r))
        base = statistics.median(times[rows[0]])
        print(f"{kind}: {nbytes / 1e6:.0f} MB a pass")
        for r in rows:
            t = statistics.median(times[r])
            print(f"  rows {r}: {t * 1e3:6.1f} ms  {nbytes / t / 1e9:5.1f} GB/s ({nbytes / t / bandwidth:4.0%})  "
                  f"{t / base:.2f}x {rows[0]} row{'s' if rows[0] > 1 else ''}")
        del weights
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
