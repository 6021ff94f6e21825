"""One new token's attention in the compiled CPU decode steps, through our kernel.

The compiled steps read their whole cache bucket under a mask (fixed shapes). Inductor's fusion of
`single_query_attention` (qwen2/model.py) recomputed the query's bias and rotation for every key and
scored the masked keys too: ~2 ms of a 0.5B decode step at a 256-token bucket. The kernel
(qwen2/csrc/decode_attention.cpp) computes the same math, float32 sums, skipping masked keys, so
its cost follows the conversation's length rather than the bucket's (docs/benchmarks.md).

It is one more entry of the model's attention registry, "cpu_kernel"; `decode_backend(device)`
names it where our kernels build, else "single_query". CompiledCpuPath (qwen2/cpu_compile.py) and
the serving engine's compiled steps (qwen2/steps.py) use it. The engine's rows are read in place in
its cache pool (PooledRowBatch): a gather, which Inductor fused into its own attention loop, is a
copy of every key and value of the batch in front of an opaque kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import cpu_kernels
from .cache import RowBatch, gather_rows
from .model import ATTENTION_BACKENDS, CAUSAL, single_query_attention


class PooledRows(NamedTuple):
    """A batch's keys or values left where they are in the serving engine's cache pool: slots
    [0, n) of `rows` of `pool` (R, Hkv, L, hd). The kernel reads them in place; gathering them into
    (B, Hkv, n, hd), as RowBatch does for the model's math, copies the whole context twice a layer."""

    pool: torch.Tensor
    rows: torch.Tensor  # (B,) int64
    n: int

    def gathered(self) -> torch.Tensor:
        return gather_rows(self.pool, self.rows, self.n)


class PooledRowBatch(RowBatch):
    """RowBatch whose reads stay in the pool (PooledRows): for the "cpu_kernel" backend only."""

    def read(self, pool: torch.Tensor) -> PooledRows:
        return PooledRows(pool, self.rows, self.key_slots.shape[0])


def kernel_attention(q, k, v, mask, scale):
    """single_query_attention's math in one call of the kernel.  q (B, H, 1, hd); k/v (B, Hkv, S, hd)
    or PooledRows; mask None, CAUSAL or (B or 1, 1, 1, S) bool. Anything else (several query rows)
    goes to single_query_attention."""
    B, H, T, hd = q.shape
    pooled = isinstance(k, PooledRows)
    if T != 1 or (mask is not None and mask is not CAUSAL and mask.shape[-2] != 1):
        if pooled:
            k, v = k.gathered(), v.gathered()
        return single_query_attention(q, k, v, mask, scale)
    valid = None if mask is None or mask is CAUSAL else mask[:, 0, 0, :]  # (B or 1, S)
    if pooled:  # each entry's row where it lies in the pool
        k, v, rows, n = k.pool, v.pool, k.rows, k.n
    else:
        rows, n = None, k.shape[2]
    return torch.ops.qwen2.decode_attention(q.reshape(B, H, hd), k, v, rows, n, valid, scale).view(B, H, 1, hd)


ATTENTION_BACKENDS["cpu_kernel"] = kernel_attention


def decode_backend(device: torch.device) -> str:
    """The attention backend for compiled decode steps on `device`."""
    return "cpu_kernel" if cpu_kernels.blocks_available(device) else "single_query"
