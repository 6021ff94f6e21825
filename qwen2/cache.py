"""A static KV cache: every layer's keys and values preallocated once, written in place.

Slot s of the cache holds the keys/values of the s-th token fed to the model (padding included),
so a left-padded batch shares one slot index per step. `key_valid` marks which slots hold real
tokens; `padded` says whether any slot is padding at all, so the common unpadded case skips the mask.
Fixed shapes are what lets a decode step be captured once as a CUDA graph and replayed.

The cache's bookkeeping (`length`, `padded`, `key_valid`) changes through its own methods only:
the model writes k/v and validity per forward (`update`, `mark_valid`), its user says how far that
got (`mark_padded`, `advance`) and moves it (`rewind`, `reset`, `copy_prefix_from`).
"""

from __future__ import annotations

import torch

from . import huge_pages
from .config import Qwen2Config
from .errors import GenerationError


def kv_bytes_per_token(config: Qwen2Config, dtype: torch.dtype, batch_size: int = 1) -> int:
    """K and V bytes one token adds to the cache, all layers: 2 * L * Hkv * hd * bytes * B."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element * batch_size


class KVCache:
    def __init__(self, config: Qwen2Config, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)  # (B, Hkv, S, hd)
        self.k = [huge_pages.zeros(shape, device, dtype) for _ in range(config.num_hidden_layers)]
        self.v = [huge_pages.zeros(shape, device, dtype) for _ in range(config.num_hidden_layers)]
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, S)
        self.bytes_per_token = kv_bytes_per_token(config, dtype, batch_size)
        self.batch_size, self.max_len = batch_size, max_len
        self._length = 0  # slots written so far, on the host: reading it never syncs a device
        self._padded = False

    @property
    def length(self) -> int:
        return self._length

    @property
    def padded(self) -> bool:
        return self._padded

    # -- what the model calls during a forward ---------------------------------------------------
    def update(self, layer_idx: int, k, v, slots, kv_len):
        """Write k/v (B, Hkv, T, hd) into `slots` (T,); return slots [0, kv_len) (all when None)."""
        self.k[layer_idx].index_copy_(2, slots, k)
        self.v[layer_idx].index_copy_(2, slots, v)
        if kv_len is None:
            return self.k[layer_idx], self.v[layer_idx]
        return self.k[layer_idx][:, :, :kv_len], self.v[layer_idx][:, :, :kv_len]

    def mark_valid(self, slots, valid):
        """Record which of the new `slots` (T,) hold real tokens: valid (B, T), False = padding."""
        self.key_valid.index_copy_(1, slots, valid)

    # -- what the cache's user calls around the forwards ------------------------------------------
    def mark_padded(self):
        """Some slot holds padding: from now on the mask must read key_valid (until reset)."""
        self._padded = True

    def advance(self, n: int):
        """`n` more slots were written (by the forward that just ran)."""
        if self._length + n > self.max_len:
            raise GenerationError(f"{self._length} + {n} slots exceed the cache's {self.max_len}")
        self._length += n

    @torch.inference_mode()
    def rewind(self, length: int):
        """Forget every slot from `length` on (their stale k/v are overwritten before being read)."""
        self.key_valid[:, length:] = False
        self._length = min(self._length, length)

    def reset(self):
        """Empty, as new: no slot written, no padding (the k/v memory is kept, not cleared)."""
        self.rewind(0)
        self._padded = False

    @torch.inference_mode()
    def copy_prefix_from(self, other: KVCache, n: int):
        """Hold exactly `other`'s first `n` slots (k, v, validity, padding): to move a sequence into
        a cache of another size. Both caches must have the same batch size, layers and heads."""
        if other.batch_size != self.batch_size or not 0 <= n <= min(other.length, self.max_len):
            raise GenerationError(f"cannot copy {n} slots of a {other.batch_size}-row cache holding "
                                  f"{other.length} into a {self.batch_size}-row cache of {self.max_len}")
        for src, dst in ((other.k, self.k), (other.v, self.v)):
            for a, b in zip(src, dst):
                b[:, :, :n].copy_(a[:, :, :n])  # (B, Hkv, n, hd)
        self.key_valid[:, :n].copy_(other.key_valid[:, :n])
        self.key_valid[:, n:] = False
        self._length, self._padded = n, other.padded

    @property
    def allocated_bytes(self) -> int:
        return self.bytes_per_token * self.max_len

    @property
    def used_bytes(self) -> int:
        return self.bytes_per_token * self.length


class RowCache:
    """The serving engine's KV cache: `rows` sequences side by side, each at its own length.

    Row r holds one conversation: slot s of the row is that conversation's token s, so a row's
    slot is its token's position and no row is ever padded. One extra row at the end is scratch:
    the compile's trial steps (qwen2/steps.py) write there, never into a live conversation's row.
    """

    def __init__(self, config: Qwen2Config, rows: int, row_len: int, device, dtype):
        shape = (rows + 1, config.num_key_value_heads, row_len, config.head_dim)  # (R+1, Hkv, S, hd)
        self.k = [huge_pages.zeros(shape, device, dtype) for _ in range(config.num_hidden_layers)]
        self.v = [huge_pages.zeros(shape, device, dtype) for _ in range(config.num_hidden_layers)]
        self.rows, self.row_len, self.scratch = rows, row_len, rows
        self.bytes_per_token = kv_bytes_per_token(config, dtype)

    @property
    def allocated_bytes(self) -> int:
        return self.bytes_per_token * self.row_len * (self.rows + 1)


class RowBatch:
    """What one forward reads and writes in a RowCache, in the interface Attention calls (`update`).

    rows (B,): the row of each batch entry; slots (B, T): where each entry's new tokens go (their
    positions); key_slots (S,): attention reads slots [0, S) of each row, under a mask that hides
    what lies past each row's own length.
    """

    def __init__(self, cache: RowCache, rows: torch.Tensor, slots: torch.Tensor, key_slots: torch.Tensor):
        self.cache, self.rows, self.slots, self.key_slots = cache, rows, slots, key_slots

    def update(self, layer_idx: int, k, v, slots=None, kv_len=None):
        """Write k/v (B, Hkv, T, hd) into each entry's row and slots; return (B, Hkv, S, hd) each."""
        keys, values = self.cache.k[layer_idx], self.cache.v[layer_idx]
        keys[self.rows[:, None], :, self.slots] = k.transpose(1, 2)  # (B, T, Hkv, hd) into (row, slot)
        values[self.rows[:, None], :, self.slots] = v.transpose(1, 2)
        return self.read(keys), self.read(values)

    def read(self, pool: torch.Tensor):
        """(B, Hkv, S, hd): each entry's row of `pool` (R, Hkv, L, hd), slots [0, S)."""
        return gather_rows(pool, self.rows, self.key_slots.shape[0])


def gather_rows(pool: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """(B, Hkv, n, hd): slots [0, n) of `rows` (B,) of `pool` (R, Hkv, L, hd), copied together."""
    return pool[rows, :, :n]
