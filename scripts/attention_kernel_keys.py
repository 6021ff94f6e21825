"""Our decode attention kernel alone (torch.ops.qwen2.decode_attention) at 100 to 8000 keys.

    python scripts/attention_kernel_keys.py [--threads 2]

One query row of the 0.5B shape (14 query heads, 2 KV heads, head_dim 64) reading one row of a
(4, 2, 8192, 64) pool in place, float32 and bf16 caches: the median of 15 calls after 3 warm-ups,
and the keys' and values' bytes over that time.
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

ROWS, KV_HEADS, SLOTS, HEAD_DIM, HEADS = 4, 2, 8192, 64, 14


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if cpu_kernels.kernel_error() is not None:
        sys.exit(f"our CPU kernels are not built here: {cpu_kernels.kernel_error()}")
    torch.set_num_threads(args.threads)
    for dtype in (torch.float32, torch.bfloat16):
        pool_k = torch.randn(ROWS, KV_HEADS, SLOTS, HEAD_DIM).to(dtype)
        pool_v = torch.randn(ROWS, KV_HEADS, SLOTS, HEAD_DIM).to(dtype)
        q, rows = torch.randn(1, HEADS, HEAD_DIM), torch.tensor([2])
        for keys in (100, 1000, 4000, 8000):
            def call():
                return torch.ops.qwen2.decode_attention(q, pool_k, pool_v, rows, keys, None, HEAD_DIM ** -0.5)

            for _ in range(3):
                call()
            times = []
            for _ in range(15):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            read = 2 * KV_HEADS * keys * HEAD_DIM * pool_k.element_size()
            print(f"{str(dtype):15s} keys {keys:5d}: {seconds * 1e6:8.1f} us  {read / seconds / 1e9:5.1f} GB/s of keys "
                  f"and values", flush=True)


if __name__ == "__main__":
    main()
