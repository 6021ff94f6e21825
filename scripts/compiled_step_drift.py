"""How far the engine's compiled one-row decode step lands from the eager one and from float32, on
a real prefix (random or all-zero caches make the real model's attention pick keys on rounding:
scripts/long_context_steps.py's logit differences are a smoke check only).

    python scripts/compiled_step_drift.py [--dtype bfloat16] [--quantize int8] [--steps 16]

Prefills a chat asking to explain the first 6000 characters of qwen2/engine.py (about 1400 tokens)
into a row, then decodes greedily, each step both compiled and eager on the same cache (the eager
step's token is fed on), and again in float32 eager; prints per step the largest logit difference
of each against float32 and against each other, and the three top-1 tokens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import qwen2  # noqa: E402
from qwen2.cache import RowCache  # noqa: E402
from qwen2.steps import CompiledCpuSteps, EagerSteps  # noqa: E402


def decode(model, ids, steps_n, compiled_mode=None):
    """Per step {"eager": logits, "compiled": logits (with compiled_mode)} and the tokens fed."""
    cache = RowCache(model.config, 1, 8192, model.device, model.dtype)
    steps = CompiledCpuSteps(model, 1, compiled_mode or "default", verify_width=0, row_tokens=cache.row_len)
    out, tokens = [], []
    with torch.inference_mode():
        token = int(EagerSteps(model).prefill(cache, 0, torch.tensor([ids]), 0).argmax())
        if compiled_mode:
            steps.compile_now(lambda: cache)
        for i in range(steps_n):
            position = len(ids) + i
            row = {"eager": EagerSteps.decode(steps, cache, [0], [token], [position]).float()}
            if compiled_mode:
                row["compiled"] = steps.decode(cache, [0], [token], [position]).float()
            out.append(row)
            tokens.append(token)
            token = int(row["eager"].argmax())
    return out, tokens


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / ".models" / "Qwen2.5-Coder-0.5B-Instruct"))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantize", default=None)
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--steps", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(2)
    tok = qwen2.Tokenizer.from_pretrained(args.model)
    code = (ROOT / "qwen2" / "engine.py").read_text()[:6000]
    ids = tok.encode_chat([{"role": "user", "content": "Explain this code:\n" + code}])
    model = qwen2.load_model(args.model, dtype=args.dtype, quantize=args.quantize)
    ours, tokens = decode(model, ids, args.steps, args.compile_mode)
    del model
    reference, reference_tokens = decode(qwen2.load_model(args.model, dtype="float32"), ids, args.steps)
    print(f"{len(ids)}-token prompt; {args.dtype}, quantize={args.quantize}, against float32 eager:")
    for i, (a, f) in enumerate(zip(ours, reference)):
        if tokens[:i + 1] != reference_tokens[:i + 1]:
            print(f"step {i}: the greedy tokens parted; the comparison ends")
            break
        ref = f["eager"]
        eager, compiled = (a["eager"] - ref).abs().max(), (a["compiled"] - ref).abs().max()
        print(f"step {i:>2}: eager {eager:.3f}  compiled {compiled:.3f}  "
              f"compiled-eager {(a['compiled'] - a['eager']).abs().max():.3f}  top-1 "
              f"{int(a['eager'].argmax())} {int(a['compiled'].argmax())} {int(ref.argmax())}")


if __name__ == "__main__":
    main()
