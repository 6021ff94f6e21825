"""Quality at fewer bits: how often a model's next-token choice is the reference's, and how far its
distribution is from the reference's (KL), teacher-forced on the same real tokens.

The reference is our model holding the checkpoint's (bf16) weights and computing in float32: what
the weights mean, without the rounding of bf16 activations (which alone costs ~2e-4 nats/token
here: a run in bf16 is itself an approximation, and llama.cpp computes in float32 whatever the
weights). The tokens are a prompt and the reference's own greedy reply to it (`reference_reply`).
Every engine is fed those tokens and its next-token logits at each reply position are compared with
the reference's, fed the same way:

- ours: `DecodeSession` prefill of the prompt, then the reply in chunks of 16 tokens (the int8
  kernel's decode path serves up to 32 rows: what a decode step computes);
- llama.cpp: one `eval([token])` at a time, reading the last row of logits (`llama_get_logits_ith`);
  llama.cpp keeps no other row without `logits_all`, which crashed here.

top-1 agreement = share of positions whose argmax is the reference's; KL = mean over positions of
KL(reference || engine) in nats.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

import qwen2
from qwen2.generate import DecodeSession

CHUNK = 16  # reply tokens per teacher-forced forward of ours


def reference_reply(model, ids: torch.Tensor, n: int) -> list[int]:
    """Our model's greedy reply of exactly n tokens (stop tokens do not end it)."""
    return list(qwen2.generate(model, ids, max_new_tokens=n, stop_token_ids=[]))


def saved_reply(path, prompt: list[int], n: int, make) -> list[int]:
    """The reply kept at `path` (JSON) for this prompt and length, else make() (and keep it there)."""
    if path and Path(path).is_file():
        try:
            saved = json.loads(Path(path).read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a saved reply (expected JSON with 'prompt' and 'reply'): {exc}") from None
        if isinstance(saved, dict) and saved.get("prompt") == prompt and len(saved.get("reply", [])) == n:
            return saved["reply"]
    reply = make()
    if path:
        Path(path).write_text(json.dumps({"prompt": prompt, "reply": reply}))
    return reply


@torch.inference_mode()
def ours_logits(model, prompt: list[int], reply: list[int]) -> torch.Tensor:
    """(len(reply), V) float32: row i is the model's next-token logits before reply[i]."""
    device = model.device
    rows = []
    with DecodeSession(model, 1, len(prompt) + len(reply)) as session:
        rows.append(session.prefill(torch.tensor([prompt], device=device)).float())
        for start in range(0, len(reply) - 1, CHUNK):
            chunk = reply[start:min(start + CHUNK, len(reply) - 1)]
            rows.append(session.extend(torch.tensor([chunk], device=device))[0].float())
    return torch.cat(rows)[:len(reply)].cpu()


def llama_last_row(llm) -> torch.Tensor:
    """llama.cpp's logits after the last evaluated token, (V,) float32."""
    import llama_cpp
    import numpy as np

    view = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    return torch.from_numpy(view.astype(np.float32))


def llama_logits(llm, prompt: list[int], reply: list[int]) -> torch.Tensor:
    """(len(reply), V) float32 from llama.cpp, fed one token at a time after the prompt."""
    llm.reset()
    llm.eval(prompt)
    rows = [llama_last_row(llm)]
    for token in reply[:-1]:
        llm.eval([token])
        rows.append(llama_last_row(llm))
    return torch.stack(rows)


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    """Top-1 agreement with `reference` and the mean KL(reference || logits) in nats per token, over
    the vocabulary both have (a GGUF may pad its vocabulary)."""
    vocab = min(logits.shape[-1], reference.shape[-1])
    logits, reference = logits[:, :vocab].float(), reference[:, :vocab].float()
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    kl = F.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean").item()
    return {"top1_agreement": top1, "kl_nats_per_token": kl, "positions": int(logits.shape[0])}
