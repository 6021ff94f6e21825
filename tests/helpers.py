"""What several test modules share: tiny random-weight checkpoints written by the oracle
(transformers' save_pretrained), random token ids, a small model trained to give peaked predictions
and the top-1 agreement / KL of a quantized copy of it, and `python app.py` as a subprocess on a
free loopback port (App) with the helpers its tests use.

Test modules import these from here, never from one another.
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qwen2 import cpu_kernels
from qwen2.config import Qwen2Config
from qwen2.model import Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parents[1]

# Our C++ CPU kernels (qwen2/csrc) build where a C++ compiler is; where not, their tests skip, saying why.
needs_kernel = pytest.mark.skipif(cpu_kernels.kernel_error() is not None,
                                  reason=f"our CPU kernels are not built here: {cpu_kernels.kernel_error()}")

# The tiny shape every random checkpoint starts from: GQA (4 query heads, 2 KV heads), tied embeddings.
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


def rand_ids(seed: int, shape, vocab: int = 512) -> torch.Tensor:
    """Token ids in [0, vocab) of `shape`, the same for the same seed."""
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def train_peaked_model(steps: int = 120) -> Qwen2ForCausalLM:
    """A small Qwen2 trained for `steps` AdamW steps (32 sequences each) on a noisy permutation chain
    (next = perm[token] 90 % of the time), so its predictions are peaked like a real LM's rather than
    the near-flat ones of random weights. Its last training loss is `final_loss`; `eval_batch` is a
    held-out batch of the same chain."""
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

    for _ in range(steps):
        seq = batch(32)
        loss = F.cross_entropy(model(seq[:, :-1]).reshape(-1, vocab), seq[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.final_loss = loss.item()
    model.eval_batch = batch(16)
    return model.eval().requires_grad_(False)


def agreement_and_kl(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, KL(reference || other) in nats per token) of two (batch, seq, vocab) logits."""
    agreement = (reference.argmax(-1) == other.argmax(-1)).float().mean().item()
    kl = F.kl_div(other.float().log_softmax(-1), reference.float().log_softmax(-1), log_target=True,
                  reduction="batchmean").item() / reference.shape[1]
    return agreement, kl


def float_model_holding_rounded_weights(directory: Path, quantize, **load_kwargs):
    """The float32 model of `directory` with every linear weight and the embedding (so a tied LM head
    too) put through int8 and back by `quantize` (qwen2.quant.quantize_rows or quantize_blocks):
    the quantized model's math in float32, so its logits."""
    import qwen2
    from qwen2.quant import dequantize

    model = qwen2.load_model(directory, dtype="float32", **load_kwargs)
    tied = model.config.tie_word_embeddings
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not (tied and name == "lm_head"):
                module.weight.copy_(dequantize(*quantize(module.weight), torch.float32))
        embedding = model.model.embed_tokens.weight
        embedding.copy_(dequantize(*quantize(embedding), torch.float32))
    return model


def quantized_agreement(trained, scheme: str, **kwargs) -> tuple[float, float]:
    """(top-1 agreement, KL(bf16 || quantized) in nats per token) of `trained` in bf16 against a
    copy quantized with quantize_model(..., scheme, **kwargs), on its held-out batch."""
    from qwen2.quant import quantize_model

    model, ids = copy.deepcopy(trained).to(torch.bfloat16), trained.eval_batch
    with torch.inference_mode():
        reference = model(ids)
        quantized = quantize_model(model, scheme, **kwargs)(ids)  # in place: reference logits came first
    return agreement_and_kl(reference, quantized)


# ---- the app as a subprocess (tests/test_app.py, test_browser.py, test_layout.py, test_tools_api.py) ----

NEVER = 10**6  # an end-of-sequence id no model here can sample: replies run to max_new_tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def endless_checkpoint(directory: Path, **overrides) -> Path:
    """A tiny checkpoint whose eos id never comes up, so a reply runs until max_new_tokens or Stop."""
    directory = make_checkpoint(directory, **overrides)
    gen_path = directory / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen["eos_token_id"] = [NEVER]
    gen_path.write_text(json.dumps(gen))
    return directory


class App:
    """`python app.py ...` on a free loopback port; stopped (by its own pid) on close()."""

    def __init__(self, workdir: Path, *args: str, env: dict | None = None, timeout: float = 240):
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.runs_dir = workdir / "runs"
        self.log_path = workdir / "app.log"
        full_env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1",
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env.pop("GRADIO_SERVER_PORT", None)
        full_env.pop("GRADIO_SERVER_NAME", None)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "app.py"), "--port", str(self.port),
                 "--runs-dir", str(self.runs_dir), *args],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=full_env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"app.py exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "config", timeout=5) as resp:
                    if resp.status == 200:
                        self.config = json.loads(resp.read())
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                pytest.fail(f"app.py did not serve within {timeout}s:\n{self.log()}")
            time.sleep(0.5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        """All the log written after `offset` (a log_size() taken earlier)."""
        with open(self.log_path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")

    def client(self, tmp_path: Path | None = None):
        from gradio_client import Client

        kwargs = {"download_files": str(tmp_path)} if tmp_path else {}
        return Client(self.url, verbose=False, **kwargs)

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def stats_numbers(stats: str) -> dict:
    """{"prompt tokens": n, "new tokens": m, "reused": r} from a stats line (qwen2.chat.ReplyStats.line)."""
    numbers = {name.rstrip("s") + "s": int(num)
               for num, name in re.findall(r"(\d+) (prompt tokens|new tokens?)", stats)}
    reused = re.search(r"prompt tokens \((\d+) reused\)", stats)
    numbers["reused"] = int(reused.group(1)) if reused else 0
    return numbers


def round_x_in_blocks(x: torch.Tensor, top: int):
    """Our kernels' rounding of x (M, K) to integers (top 127: int8, 32767: int16; qwen2/csrc/panels.h):
    per block of 32, scale top / max |x| in float32 (a division: torch's scalar / tensor multiplies by
    a reciprocal), levels half to even. Returns the levels (M, K / 32, 32) as floats, dx = max / top
    and the float32 sums of x (M, K / 32)."""
    from qwen2.quant import BLOCK

    blocks = x.float().view(x.shape[0], x.shape[1] // BLOCK, BLOCK)
    amax = blocks.abs().amax(-1)
    inverse = torch.where(amax > 0, torch.full_like(amax, float(top)) / amax, torch.zeros_like(amax))
    return torch.round(blocks * inverse[..., None]), amax / float(top), blocks.sum(-1)
