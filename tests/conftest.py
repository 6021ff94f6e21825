"""Shared fixtures: tiny Qwen2 checkpoints written by the oracle (transformers' save_pretrained)
with random weights, plus a byte-level BPE tokenizer built with `tokenizers`.

Nothing is downloaded: every checkpoint a test loads is made here, in a temporary directory.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qwen2.config import Qwen2Config
from qwen2.model import Qwen2ForCausalLM

# The app and `python -m qwen2` compile their CPU decode step at start-up by default (about a minute);
# the subprocesses the tests start decode eagerly unless a test asks otherwise
# (tests/test_cli.py and tests/test_cpu_compile.py cover the compiled start-up).
os.environ.setdefault("QWEN2_FAST_DECODE", "off")

TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def make_checkpoint(
    directory: Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    with_tokenizer: bool = True,
    **overrides,
) -> Path:
    """Write a random-weight Qwen2 checkpoint with the reference implementation; return its dir."""
    transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")
    cfg = dict(TINY, **overrides)
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(**cfg)
    ref = transformers.Qwen2ForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # the default init leaves biases at zero; give them values to test
        for name, param in ref.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.02)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    ref.save_pretrained(directory, **kwargs)
    if with_tokenizer:
        from tests.tokenizer_factory import save_tiny_tokenizer

        ids = save_tiny_tokenizer(directory)
        assert ids["vocab_size"] <= cfg["vocab_size"]
        gen = {"eos_token_id": [ids["im_end"], ids["endoftext"]], "bos_token_id": ids["endoftext"],
               "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
               "do_sample": True}
        (directory / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny GQA, tied-embedding checkpoint in float32 with tokenizer files."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty HF cache with HF_HUB_OFFLINE=1: nothing is downloaded, only what a test lays out loads."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both at import time into module constants; patch those too.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The real checkpoint, Qwen2.5-Coder-0.5B-Instruct in the Hugging Face layout, built by
    `python scripts/build_real_checkpoint.py` ($QWEN2_REAL_MODEL overrides where it lives).
    Skips, saying how to build it, when it is absent."""
    directory = Path(os.environ.get("QWEN2_REAL_MODEL")
                     or Path(__file__).resolve().parents[1] / ".models" / "Qwen2.5-Coder-0.5B-Instruct")
    needed = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    missing = [name for name in needed if not (directory / name).is_file()]
    if missing:
        pytest.skip(f"real checkpoint absent: {directory} has no {', '.join(missing)} "
                    "(build it with: python scripts/build_real_checkpoint.py)")
    return directory


def train_peaked_model(seconds_budget_steps: int = 120) -> Qwen2ForCausalLM:
    """A small Qwen2 trained on a noisy permutation chain (next = perm[token] 90 % of the time),
    so its predictions are peaked like a real LM's rather than the near-flat ones of random weights."""
    torch.manual_seed(0)
    vocab = 128
    config = Qwen2Config(vocab_size=vocab, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_theta=10000.0, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    model.model.rotary_emb.reset()
    perm = torch.randperm(vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)

    def batch(n, length=32):
        seq = torch.empty(n, length, dtype=torch.long)
        seq[:, 0] = torch.randint(0, vocab, (n,), generator=gen)
        for t in range(1, length):
            noise = torch.rand(n, generator=gen) < 0.1
            seq[:, t] = torch.where(noise, torch.randint(0, vocab, (n,), generator=gen), perm[seq[:, t - 1]])
        return seq

    for _ in range(seconds_budget_steps):
        seq = batch(32)
        loss = F.cross_entropy(model(seq[:, :-1]).reshape(-1, vocab), seq[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.final_loss = loss.item()
    model.eval_batch = batch(16)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def trained_model():
    """train_peaked_model(), trained once for the whole run; tests quantize copies of it."""
    return train_peaked_model()


def quantized_agreement(trained, scheme: str, **kwargs) -> tuple[float, float]:
    """(top-1 agreement, KL(bf16 || quantized) in nats per token) of `trained` in bf16 against a
    copy quantized with quantize_model(..., scheme, **kwargs), on its held-out batch."""
    from qwen2.quant import quantize_model

    model, ids = copy.deepcopy(trained).to(torch.bfloat16), trained.eval_batch
    with torch.inference_mode():
        reference = model(ids)
        quantized = quantize_model(model, scheme, **kwargs)(ids)  # in place: reference logits came first
    agreement = (reference.argmax(-1) == quantized.argmax(-1)).float().mean().item()
    kl = F.kl_div(quantized.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                  reduction="batchmean").item() / ids.shape[1]
    return agreement, kl


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the test item (`item.rep_call`), so a fixture's teardown can tell that
    the test failed and record what it saw (tests/test_browser.py)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
