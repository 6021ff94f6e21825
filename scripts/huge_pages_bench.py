"""The compiled decode step with its weights in 2 MB pages (as load_model places them,
qwen2/huge_pages.py) against the same weights copied into ordinary torch tensors (4 KB pages), in
one process, alternating: the placement is the only difference.

    python scripts/huge_pages_bench.py [--quantize int8] [--dtype float32] [--rounds 5] [--new-tokens 64]

Prints each round's decode tok/s of both, their medians and the ratio, and how much of the process
the kernel holds in huge pages (AnonHugePages). Two models of the same checkpoint are in memory at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qwen2  # noqa: E402
from profiling.alternate import decode_rounds, print_speeds  # noqa: E402
from qwen2.fast import make_fast_path  # noqa: E402

PROMPT = "Write a Python function that checks whether a string is a palindrome, ignoring case and punctuation."


def in_small_pages(model) -> None:
    """Every parameter and buffer of the model copied into a fresh torch tensor, in place."""
    with torch.no_grad():
        for module in model.modules():
            for name, tensor in module._parameters.items():
                if tensor is not None:
                    tensor.data = tensor.data.clone()
            for name, tensor in module._buffers.items():
                if tensor is not None:
                    module._buffers[name] = tensor.clone()
    model.info.huge_page_bytes = 0


def anon_huge_pages() -> str:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return line.split(":", 1)[1].strip()
    return "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=".models/Qwen2.5-Coder-0.5B-Instruct")
    p.add_argument("--quantize", default="int8")
    p.add_argument("--dtype", default=None)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    quantize = None if args.quantize in ("", "none") else args.quantize
    tokenizer = qwen2.Tokenizer.from_pretrained(args.model)
    ids = torch.tensor([tokenizer.encode_chat([{"role": "user", "content": PROMPT}])])
    runs = {}
    for name in ("4 KB pages", "2 MB pages"):
        model = qwen2.load_model(args.model, quantize=quantize, dtype=args.dtype)
        if name == "4 KB pages":
            in_small_pages(model)
        fast_path = make_fast_path(model, "compile")
        list(qwen2.generate(model, ids, max_new_tokens=8, fast_path=fast_path, stop_token_ids=[]))  # compile
        runs[name] = (model, fast_path)
    print(f"{model.dtype}, quantize={quantize}: {runs['2 MB pages'][0].info.huge_page_bytes / 1e6:.0f} MB of "
          f"weights placed in huge pages; AnonHugePages {anon_huge_pages()}")
    speeds = decode_rounds(runs, ids, args.rounds, args.new_tokens)
    print_speeds(speeds, "2 MB pages", "4 KB pages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
