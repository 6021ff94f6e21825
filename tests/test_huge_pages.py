"""Weights and KV caches in 2 MB pages (qwen2/huge_pages.py): the same values at an aligned address
the kernel may back with huge pages; ties kept, views and small tensors left alone; the math unchanged."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import qwen2
from qwen2.cache import RowCache
from qwen2.huge_pages import HUGE_PAGE, huge_page_empty, place_in_huge_pages, zeros
from tests.helpers import make_checkpoint

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_HUGEPAGE) is Linux's")


def advised(tensor: torch.Tensor) -> bool:
    """Whether the mapping holding `tensor` may get transparent huge pages (/proc/self/smaps)."""
    address, inside = tensor.data_ptr(), False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split(maxsplit=1)[0] if line.strip() else ""
        if "-" in first and not first.endswith(":"):  # a mapping's header: "low-high perms ..."
            low, high = (int(part, 16) for part in first.split("-"))
            inside = low <= address < high
        elif inside and first == "THPeligible:":
            return line.split()[1] == "1"
    return False


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.big = nn.Parameter(torch.randn(1024, 1024), requires_grad=False)  # 4 MB
        self.tied = nn.Linear(1024, 1024, bias=False)
        self.tied.weight = self.big
        self.small = nn.Parameter(torch.randn(16, 16), requires_grad=False)
        whole = torch.randn(2048, 1024)
        self.register_buffer("first_half", whole[:1024])  # views of one storage: left where they are
        self.register_buffer("second_half", whole[1024:])
        self.register_buffer("cache", torch.randn(768, 1024))  # 3 MB: one whole huge page and a tail


@linux
def test_large_tensors_move_to_aligned_advised_memory_with_their_values_and_ties():
    holder = Holder()
    before = {name: t.clone() for name, t in holder.state_dict().items()}
    big, small_ptr, half_ptr = holder.big, holder.small.data_ptr(), holder.first_half.data_ptr()
    moved = place_in_huge_pages(holder)
    assert moved == (4 << 20) + (3 << 20)
    assert holder.big is big and holder.tied.weight is holder.big  # the same Parameter, still tied
    for tensor in (holder.big, holder.cache):
        assert tensor.data_ptr() % HUGE_PAGE == 0 and tensor.storage_offset() == 0 and advised(tensor)
    assert holder.small.data_ptr() == small_ptr and holder.first_half.data_ptr() == half_ptr
    for name, tensor in holder.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    x = torch.randn(3, 1024)
    torch.testing.assert_close(holder.tied(x), x @ before["big"].t(), rtol=0, atol=0)


@linux
def test_huge_page_memory_starts_as_zeros_and_is_refused_below_a_page():
    assert huge_page_empty((HUGE_PAGE - 1,), torch.uint8) is None
    cache = zeros((3, 2, 1024, 64), "cpu", torch.float32)  # 1.5 MB: ordinary zeros
    assert cache.shape == (3, 2, 1024, 64) and not cache.any()
    layer = zeros((4, 2, 4096, 64), "cpu", torch.bfloat16)  # 4 MB
    assert layer.dtype == torch.bfloat16 and layer.data_ptr() % HUGE_PAGE == 0 and not layer.any()
    layer[1, 0, 7] = 2.5  # writable, and only that row changes
    assert layer.sum().item() == 2.5 * 64
    cache = RowCache(qwen2.config.Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                               num_hidden_layers=2, intermediate_size=128, vocab_size=512,
                                               max_position_embeddings=8192), 4, 8192, "cpu", torch.float32)
    assert all(t.data_ptr() % HUGE_PAGE == 0 and not t.any() for t in cache.k + cache.v)


@linux
def test_the_loader_places_large_weights_in_huge_pages_and_the_logits_do_not_change(tmp_path):
    directory = make_checkpoint(tmp_path, vocab_size=16384, with_tokenizer=False)  # a 4 MB tied embedding
    model = qwen2.load_model(directory, dtype="float32")
    assert model.info.huge_page_bytes == 16384 * 64 * 4
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.data_ptr() % HUGE_PAGE == 0
    ids = torch.randint(0, 16384, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        placed = model(ids)
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()  # back in torch's own memory
        assert torch.equal(model(ids), placed)
