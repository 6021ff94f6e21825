"""What the Inside tests share: fused, unfused and sliding-window tiny models, their tokenizer,
and a session built from flat keywords. Imported as fixtures by tests/test_inside*.py."""

from __future__ import annotations

import pytest
import torch

import qwen2
from inside import InsideSession, InsideSettings
from tests.helpers import make_checkpoint

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def sliding_dir(tmp_path_factory):
    """Layer 0 full attention, layer 1 a sliding window of 4 tokens (shorter than the prompt)."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny-sliding"), use_sliding_window=True, sliding_window=4,
                           max_window_layers=1)


@pytest.fixture(scope="module")
def models(tiny_model_dir, sliding_dir):
    return {
        "fused": qwen2.load_model(tiny_model_dir, dtype="float32", fuse=True),
        "unfused": qwen2.load_model(tiny_model_dir, dtype="float32", fuse=False),
        "sliding": qwen2.load_model(sliding_dir, dtype="float32", fuse=True),
    }


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return qwen2.Tokenizer.from_pretrained(tiny_model_dir)


KINDS = ["fused", "unfused", "sliding"]


def session_of(model, tokenizer=None, **options) -> InsideSession:
    """A session from flat keywords (InsideSettings.of): the sampling ones, seed, max_tokens, ..."""
    return InsideSession(model, tokenizer, InsideSettings.of(**options))


@torch.inference_mode()
def full_logits(model, ids) -> torch.Tensor:
    return model(torch.tensor([ids]))[0, -1].float()


SETTINGS = dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3)  # every processor on
