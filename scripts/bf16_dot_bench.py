"""A bf16 model's compiled decode step with our dot products (qwen2/bf16_dot.py, as load_model sets
it up on a CPU with bf16 math) against the same model with torch's product (oneDNN, which Inductor's
frozen step pre-packs), in one process, alternating; what each compiled step added to the process's
memory, and whether both produce the same greedy tokens.

    python scripts/bf16_dot_bench.py [--rounds 5] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qwen2  # noqa: E402
from profiling.alternate import decode_rounds, print_speeds  # noqa: E402
from qwen2.bf16_dot import Bf16DotLinear, wants_bf16_dot  # noqa: E402
from qwen2.fast import make_fast_path  # noqa: E402

PROMPT = "Write a Python function that checks whether a string is a palindrome, ignoring case and punctuation."


def resident_mb() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) // 1024


def with_torchs_product(model):
    """Every Bf16DotLinear back to nn.Linear (the same Parameters), in place."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Bf16DotLinear):
                linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                         device="meta")
                linear.weight, linear.bias = child.weight, child.bias
                setattr(module, name, linear)
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=".models/Qwen2.5-Coder-0.5B-Instruct")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = qwen2.Tokenizer.from_pretrained(args.model)
    ids = torch.tensor([tokenizer.encode_chat([{"role": "user", "content": PROMPT}])])
    runs, tokens = {}, {}
    for name in ("torch's product", "our dot products"):
        model = qwen2.load_model(args.model, dtype="bfloat16")
        if not wants_bf16_dot(model):
            print("error: this CPU or build has no bf16 dot products (qwen2/bf16_dot.py)", file=sys.stderr)
            return 2
        if name == "torch's product":
            with_torchs_product(model)
        before = resident_mb()
        fast_path = make_fast_path(model, "compile")
        tokens[name] = list(qwen2.generate(model, ids, max_new_tokens=32, fast_path=fast_path, stop_token_ids=[]))
        print(f"{name}: the compiled step added {resident_mb() - before} MB to the process")
        runs[name] = (model, fast_path)
    print("same 32 greedy tokens:", tokens["torch's product"] == tokens["our dot products"])
    speeds = decode_rounds(runs, ids, args.rounds, args.new_tokens)
    print_speeds(speeds, "our dot products", "torch's product")
    return 0


if __name__ == "__main__":
    sys.exit(main())
