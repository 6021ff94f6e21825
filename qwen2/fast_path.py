"""Fast decode paths: a decode step with fixed shapes and fixed addresses, built once and reused.

A CUDA graph (qwen2/cuda_graphs.py) and an Inductor-compiled CPU step (qwen2/cpu_compile.py) both
need the step to look the same every token: the same tensors, the same sizes. So the KV caches they
decode into come from a pool, one per (batch size, length bucket), and attention reads the whole
cache under a mask instead of a growing slice. The math is the model's own forward; only how it is
launched changes.

A DecodeSession given a fast path borrows a cache with `fast_path.acquire(...)` (a CacheLease), runs each
step with `fast_path.step(lease, ...)` and gives the cache back with `close()`. When the bucket's caches
are all lent to live sessions (a fast path lends `leases_per_bucket` of them), `acquire` returns None and
that session runs eagerly on a cache of its own. qwen2/fast.py picks the fast_path for a device and mode.
"""

from __future__ import annotations

import torch

from .cache import KVCache


def cache_bucket(n: int, limit: int, minimum: int = 256) -> int:
    """Round a cache length up to a power of two (>= minimum), so few graphs or compiled steps serve all."""
    size = minimum
    while size < n:
        size *= 2
    return min(size, limit)


class CacheLease:
    """A pooled KV cache lent to one session, with the fast_path's state for it (graph, buffers)."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.state: dict = {}
        self.busy = False

    def release(self):
        self.busy = False


class FastPath:
    """Base of the fast decode paths: the cache pool and the warm-up; subclasses implement `step`."""

    name = "pooled"
    # The smallest cache the pool lends. Each bucket costs a capture or compile once; a larger
    # bucket costs every step (attention reads the whole cache under a mask).
    min_bucket = 256
    # How many caches of one (batch size, bucket) may be lent at once; a session beyond that runs
    # eagerly. One for CUDA graphs (each lease records its own graph into the shared memory pool).
    leases_per_bucket = 1

    def __init__(self, model):
        self.model = model
        self.pool: dict[tuple[int, int], list[CacheLease]] = {}

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache(self.model.config, batch_size, max_len, self.model.device, self.model.dtype)

    def acquire(self, batch_size: int, max_len: int) -> CacheLease | None:
        key = (batch_size, cache_bucket(max_len, self.model.config.max_position_embeddings, self.min_bucket))
        leases = self.pool.setdefault(key, [])
        lease = next((lease for lease in leases if not lease.busy), None)
        if lease is None:
            if len(leases) >= self.leases_per_bucket:
                return None
            lease = CacheLease(self.new_cache(*key))
            leases.append(lease)
        lease.busy = True
        lease.cache.reset()  # the last borrower's tokens and padding are not this session's
        return lease

    def step(self, lease: CacheLease, token_ids: torch.Tensor, slot: int, positions: torch.Tensor) -> torch.Tensor:
        """(B,) token ids written to `slot` at `positions` (B, 1) -> next logits (B, V), float32.

        Must equal model(token_ids[:, None], cache=lease.cache, slots=[slot], positions=positions,
        kv_len=None, last_only=True)[:, -1]."""
        raise NotImplementedError

    def warm_up(self, progress=None, prompt_len: int = 16, new_tokens: int = 4):
        """Run one short generation so first-use costs (capture, compilation) are paid now, not in
        the first reply. progress(fraction, message) is told before and after."""
        from .generate import generate

        if progress is not None:
            progress(0.0, f"preparing the {self.name} decode step")
        ids = torch.zeros(1, prompt_len, dtype=torch.long)
        for _ in generate(self.model, ids, max_new_tokens=new_tokens, stop_token_ids=[], fast_path=self):
            pass
        if progress is not None:
            progress(1.0, f"{self.name} decode step ready")
