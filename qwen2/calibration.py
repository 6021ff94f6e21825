"""How large each input of the decoder layers' products runs on real text: the importance int4
rounding gives each weight's error.

A block of 32 weights rounded to 16 levels trades error between its weights, and a weight's error
reaches the output multiplied by its input: where an input runs large, its weights' error costs more.
So, as llama.cpp's importance matrix (imatrix) and AWQ do, the int4 search weighs each weight's
squared error by its input's mean square on a calibration text (qwen2/csrc/int4_blocks.cpp):

    importance[layer][k] = mean over tokens of x[k]^2  +  its mean over the inputs k

The second term keeps every input in the count: an input quiet on this text may not be quiet on
another. The text is a chat of the kind the instruct models serve (calibration_chat.json: prose,
Python, shell, SQL, JavaScript), tokenized and rendered by the checkpoint's own tokenizer; it shares
no text with the replies that measure quality. On the real Qwen2.5-Coder-0.5B-Instruct, over 1800
reply tokens, it cut int4's KL from the float32 reference by 4 % (top-1 agreement +0.1 points) with
float32 activations, the default, and by 10 % (+0.4 points) with bf16 ones (docs/benchmarks.md,
sixteenth round): a small gain, for 1.5 s at load. The first CALIBRATION_TOKENS tokens are enough:
256, 512 and all 975 gave the same figures within their spread.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from .errors import TokenizerError
from .products import decoder_products
from .tokenizer import Tokenizer
from .upcast import float32_products, wants_upcast

CALIBRATION_CHAT = Path(__file__).with_name("calibration_chat.json")
CALIBRATION_TOKENS = 512


def calibration_ids(tokenizer: Tokenizer, limit: int = CALIBRATION_TOKENS) -> torch.Tensor:
    """The calibration chat rendered by `tokenizer`'s chat template, its first `limit` ids: (1, T)."""
    messages = json.loads(CALIBRATION_CHAT.read_text(encoding="utf-8"))["messages"]
    return torch.tensor([tokenizer.encode_chat(messages, add_generation_prompt=False)[:limit]])


@torch.inference_mode()
def input_importance(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """{qualified name: (in_features,) float32} for every product of decoder_products(model): the
    mean square of its inputs over `ids` (1, T), plus that mean over the inputs (module docstring)."""
    sums: dict[str, torch.Tensor] = {}

    def collect(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.square().sum(0)
        return hook

    handles = [module.register_forward_pre_hook(collect(name)) for name, module in decoder_products(model).items()]
    try:
        model(ids.to(model.device), last_only=True)
    finally:
        for handle in handles:
            handle.remove()
    tokens = ids.numel()
    importance = {}
    for name, total in sums.items():
        mean_square = (total / tokens).float().cpu()
        importance[name] = mean_square + mean_square.mean()
    return importance


def checkpoint_importance(model, directory: Path | None) -> dict[str, torch.Tensor] | None:
    """input_importance on the calibration chat as the checkpoint at `directory` tokenizes it; None
    where there is no tokenizer.json to read it with (a bare weights directory, random weights of an
    official shape), or, with a warning naming why, where it cannot be read: the weights load
    unweighed, as they did before calibration, and the tokenizer's own loader reports the file
    where the tokenizer is used (the app falls back to bytes). A bf16 model on a CPU without bf16
    math runs it on our bf16 panels first, as it would run a prompt (qwen2/upcast.py: plain bf16
    products there take ~10x longer)."""
    if directory is None or not (Path(directory) / "tokenizer.json").is_file():
        return None
    try:
        tokenizer = Tokenizer.from_pretrained(directory)
    except TokenizerError as exc:
        warnings.warn(f"int4 rounding not weighed by a calibration chat: {exc}", stacklevel=3)
        return None
    limit = min(CALIBRATION_TOKENS, model.config.max_position_embeddings)
    if wants_upcast(model):
        float32_products(model)
    return input_importance(model, calibration_ids(tokenizer, limit))
