"""A static KV cache: every layer's keys and values preallocated once, written in place.

Slot s of the cache holds the keys/values of the s-th token fed to the model (padding included),
so a left-padded batch shares one slot index per step. `key_valid` marks which slots hold real
tokens; `padded` says whether any slot is padding at all, so the common unpadded case skips the mask.
Fixed shapes are what lets a decode step be captured once as a CUDA graph and replayed.
"""

from __future__ import annotations

import torch

from .config import Qwen2Config


def kv_bytes_per_token(config: Qwen2Config, dtype: torch.dtype, batch_size: int = 1) -> int:
    """K and V bytes one token adds to the cache, all layers: 2 * L * Hkv * hd * bytes * B."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element * batch_size


class KVCache:
    def __init__(self, config: Qwen2Config, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)  # (B, Hkv, S, hd)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, S)
        self.bytes_per_token = kv_bytes_per_token(config, dtype, batch_size)
        self.padded = False
        self.batch_size, self.max_len = batch_size, max_len
        self.length = 0  # slots written so far (kept by the DecodeSession, on the host)

    def update(self, layer_idx: int, k, v, slots, kv_len):
        """Write k/v (B, Hkv, T, hd) into `slots` (T,); return slots [0, kv_len) (all when None)."""
        self.k[layer_idx].index_copy_(2, slots, k)
        self.v[layer_idx].index_copy_(2, slots, v)
        if kv_len is None:
            return self.k[layer_idx], self.v[layer_idx]
        return self.k[layer_idx][:, :, :kv_len], self.v[layer_idx][:, :, :kv_len]

    def rewind(self, length: int):
        """Forget every slot from `length` on (their stale k/v are overwritten before being read)."""
        self.key_valid[:, length:] = False
        self.length = min(self.length, length)

    @property
    def allocated_bytes(self) -> int:
        return self.bytes_per_token * self.max_len

    @property
    def used_bytes(self) -> int:
        return self.bytes_per_token * self.length
