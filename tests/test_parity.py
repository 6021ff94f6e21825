"""Our network against transformers.Qwen2ForCausalLM on the same random weights.

Each config is saved with the oracle's save_pretrained and loaded back through qwen2.load_model.
"""

from __future__ import annotations

import pytest
import torch

import qwen2
from tests.helpers import make_checkpoint
from tests.helpers import rand_ids as ids_for

transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")

CONFIGS = {
    "gqa-tied": {},
    "mha-untied": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "mqa": dict(num_key_value_heads=1),
    "yarn": dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    "sliding-window": dict(use_sliding_window=True, sliding_window=6, max_window_layers=1, num_hidden_layers=3),
    "sharded": dict(tie_word_embeddings=False, _shard="40KB"),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    overrides = dict(CONFIGS[request.param])
    shard = overrides.pop("_shard", None)
    directory = make_checkpoint(tmp_path_factory.mktemp(request.param), with_tokenizer=False,
                                max_shard_size=shard, **overrides)
    if shard:
        assert (directory / "model.safetensors.index.json").is_file(), "the checkpoint was not sharded"
    ref = transformers.Qwen2ForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    return request.param, directory, ref


@pytest.mark.parametrize("fuse", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_fp32_logits_match_reference(pair, backend, fuse):
    name, directory, ref = pair
    ours = qwen2.load_model(directory, dtype="float32", attn_backend=backend, fuse=fuse)
    ids = ids_for(1, (2, 24))
    with torch.no_grad():
        expected = ref(ids).logits.float()
    got = ours(ids)
    assert got.shape == expected.shape == (2, 24, 512)
    delta = (got - expected).abs().max().item()
    print(f"[parity] {name} {backend} {'fused' if fuse else 'plain'} fp32 max|dlogits| = {delta:.3e}")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_bf16_logits_close_to_reference(pair):
    name, directory, _ = pair
    ref = transformers.Qwen2ForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    ours = qwen2.load_model(directory, dtype="bfloat16")
    assert ours.dtype == torch.bfloat16
    ids = ids_for(2, (1, 16))
    with torch.no_grad():
        expected = ref(ids).logits.float()
    got = ours(ids)
    delta = (got - expected).abs().max().item()
    print(f"[parity] {name} bf16 max|dlogits| = {delta:.3e}")
    # bf16 has ~3 significant digits; logits here are O(0.1): a wrong op would be off by far more.
    assert delta < 2e-2
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_greedy_tokens_equal_reference(pair):
    name, directory, ref = pair
    ours = qwen2.load_model(directory, dtype="float32")
    prompt = ids_for(3, (1, 7))
    with torch.no_grad():
        out = ref.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0,
                           min_new_tokens=20)
    expected = out[0, 7:].tolist()
    got = list(qwen2.generate(ours, prompt, max_new_tokens=20, stop_token_ids=[]))
    assert got == expected


def test_padded_batch_matches_reference_with_positions(pair):
    """The oracle, given the same mask and positions, agrees with our padded batch."""
    name, directory, ref = pair
    ours = qwen2.load_model(directory, dtype="float32")
    ids = ids_for(4, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, position_ids=positions).logits
    got = ours(ids, attention_mask=mask)
    torch.testing.assert_close(got[0, 5:], expected[0, 5:], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1], expected[1], atol=1e-4, rtol=0)
