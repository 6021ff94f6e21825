"""qwen2.cache.KVCache's own operations (copy a prefix, reset, rewind, advance): after each one the
cache decodes exactly as a cache filled from scratch, and the plain forward, would."""

from __future__ import annotations

import pytest
import torch

import qwen2
from qwen2.cache import KVCache
from qwen2.errors import GenerationError
from qwen2.generate import DecodeSession
from tests.helpers import rand_ids

ATOL = 1e-4  # fp32 logits


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return qwen2.load_model(tiny_model_dir, dtype="float32")


def new_cache(model, batch_size: int, max_len: int) -> KVCache:
    return KVCache(model.config, batch_size, max_len, model.device, model.dtype)


@torch.inference_mode()
def feed(model, cache: KVCache, ids, positions, attention_mask=None):
    """The forward DecodeSession runs: `ids` (B, T) into the next T slots; (B, V) logits of the last."""
    T = ids.shape[1]
    if attention_mask is not None and not bool(attention_mask.all()):
        cache.mark_padded()
    slots = torch.arange(cache.length, cache.length + T)
    logits = model(ids, attention_mask, cache=cache, slots=slots, positions=positions,
                   kv_len=cache.length + T, last_only=True)[:, -1]
    cache.advance(T)
    return logits


def test_copy_prefix_then_decode_equals_a_fresh_prefill(model):
    ids = rand_ids(0, (1, 20))
    full = model(ids)[0]  # (20, V)
    old = DecodeSession(model, 1, 16)
    old.prefill(ids[:, :12])
    new = DecodeSession(model, 1, 64)
    new.copy_prefix_from(old, 8)
    assert new.cache.length == 8 and new.cache.key_valid[0].tolist() == [True] * 8 + [False] * 56
    for a, b in zip(old.cache.k + old.cache.v, new.cache.k + new.cache.v):
        assert torch.equal(a[:, :, :8], b[:, :, :8])
    torch.testing.assert_close(new.prefill(ids[:, 8:12]), full[11][None], atol=ATOL, rtol=0)
    for t in range(12, 20):
        torch.testing.assert_close(new.step(ids[:, t]), full[t][None], atol=ATOL, rtol=0)


def test_copy_prefix_keeps_a_padded_batch_padded(model):
    ids = rand_ids(1, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    old = new_cache(model, 2, 8)
    feed(model, old, ids, positions, mask)
    new = new_cache(model, 2, 32)
    with torch.inference_mode():
        new.rewind(0)
        new.key_valid[:, 20:] = True  # stale validity past the prefix must not survive the copy
    new.copy_prefix_from(old, 7)
    assert new.padded and new.length == 7
    assert torch.equal(new.key_valid[:, :7], mask.bool()) and not new.key_valid[:, 7:].any()
    token, next_positions = rand_ids(2, (2, 1)), positions[:, -1:] + 1
    expected = feed(model, old, token, next_positions)
    torch.testing.assert_close(feed(model, new, token, next_positions), expected, atol=ATOL, rtol=0)


def test_reset_then_reuse_equals_a_new_cache(model):
    used = new_cache(model, 1, 16)
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    feed(model, used, rand_ids(3, (1, 5)), (mask.cumsum(-1) - 1).clamp(min=0), mask)
    assert used.padded
    used.reset()
    assert used.length == 0 and not used.padded and not used.key_valid.any()
    fresh = new_cache(model, 1, 16)
    ids = rand_ids(4, (1, 9))
    positions = torch.arange(9)[None]
    torch.testing.assert_close(feed(model, used, ids, positions), feed(model, fresh, ids, positions),
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(feed(model, used, ids[:, :1], positions[:, -1:] + 1),
                               feed(model, fresh, ids[:, :1], positions[:, -1:] + 1), atol=ATOL, rtol=0)


def test_rewind_forgets_the_tail_and_never_grows(model):
    session = DecodeSession(model, 1, 32)
    ids = rand_ids(5, (1, 14))
    session.prefill(ids)
    session.rewind(20)  # past the end: nothing to forget, and the length stays
    assert session.length == 14
    session.rewind(6)
    assert session.length == 6 and session.cache.key_valid[0].tolist() == [True] * 6 + [False] * 26
    other = torch.cat([ids[:, :6], rand_ids(6, (1, 5))], dim=1)  # a different continuation
    full = model(other)[0]
    torch.testing.assert_close(session.prefill(other[:, 6:10]), full[9][None], atol=ATOL, rtol=0)
    torch.testing.assert_close(session.step(other[:, 10]), full[10][None], atol=ATOL, rtol=0)


def test_bookkeeping_changes_only_through_the_methods(model):
    cache = new_cache(model, 1, 8)
    for name, value in (("length", 3), ("padded", True)):
        with pytest.raises(AttributeError):
            setattr(cache, name, value)
    cache.advance(8)
    with pytest.raises(GenerationError):
        cache.advance(1)
    with pytest.raises(GenerationError):  # more than the source holds
        new_cache(model, 1, 16).copy_prefix_from(new_cache(model, 1, 16), 1)
    with pytest.raises(GenerationError):  # another batch size
        new_cache(model, 2, 16).copy_prefix_from(cache, 4)
    padded = DecodeSession(model, 2, 8)
    padded.prefill(rand_ids(7, (2, 3)), torch.tensor([[1, 1, 1], [0, 1, 1]]))
    with pytest.raises(GenerationError, match="single unpadded row"):
        DecodeSession(model, 2, 16).copy_prefix_from(padded, 2)
