"""Quality at fewer bits over several real replies: top-1 agreement and KL from the float32 reference
(profiling/agreement.py), teacher-forced on the reference's own greedy replies to six prompts (code,
shell, prose, two code edits), for our quantized models and, where given, llama.cpp's GGUFs.

    python scripts/quant_quality.py [--model DIR] [--schemes int4,int4-plain,int8] [--tokens 300]
                                    [--against Q4_0.gguf,Q8_0.gguf] [--cache /tmp/quant-quality]

"int4" is the model as load_model makes it (rounding weighed on the calibration chat,
qwen2/calibration.py); "int4-plain" is the same scheme with every input counted alike; a suffix
":float32" or ":bfloat16" sets the activations' dtype (default: load_model's). The
reference's replies and logits are kept in --cache (JSON and safetensors) for the next run. One
llama.cpp model per process (a second `Llama` in one process crashed here): each GGUF runs in a
child. Prints each prompt's top-1 / KL and all positions together.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qwen2  # noqa: E402
from profiling.agreement import agreement, llama_logits, ours_logits, reference_reply  # noqa: E402
from qwen2.quant import quantize_model  # noqa: E402

PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome, ignoring case and punctuation.",
    "Explain how a hash map handles collisions, with a short example in C.",
    "Add type hints and a docstring to this function:\n\ndef merge(a, b):\n    out = []\n    i = j = 0\n"
    "    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n"
    "        else:\n            out.append(b[j]); j += 1\n    out.extend(a[i:]); out.extend(b[j:])\n    return out\n",
    "Write a bash script that finds the ten largest files under a directory and prints their sizes in a "
    "human-readable form.",
    "What is the difference between a process and a thread? Answer for a beginner.",
    "Rename the variable `tmp` to `total` in this code:\n\ndef score(items):\n    tmp = 0\n    for item in items:\n"
    "        if item.valid:\n            tmp += item.weight * item.value\n    return tmp / max(1, len(items))\n",
]


def reference(model_dir: str, tokens: int, cache: Path) -> tuple[list[dict], list[torch.Tensor]]:
    """[{prompt ids, reply}] and the float32 reference's logits for each, from the cache or made."""
    from safetensors.torch import load_file, save_file

    replies, logits_file = cache / f"replies-{tokens}.json", cache / f"reference-{tokens}.safetensors"
    if replies.is_file() and logits_file.is_file():
        logits = load_file(logits_file)
        return json.loads(replies.read_text()), [logits[str(i)] for i in range(len(PROMPTS))]
    tokenizer = qwen2.Tokenizer.from_pretrained(model_dir)
    model = qwen2.load_model(model_dir, dtype=torch.float32)
    cases, logits = [], []
    for prompt in PROMPTS:
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
        reply = reference_reply(model, torch.tensor([ids]), tokens)
        cases.append({"prompt": ids, "reply": reply})
        logits.append(ours_logits(model, ids, reply))
    cache.mkdir(parents=True, exist_ok=True)
    save_file({str(i): t.contiguous() for i, t in enumerate(logits)}, logits_file)
    replies.write_text(json.dumps(cases))
    return cases, logits


def ours(model_dir: str, scheme: str):
    """scheme[-plain][:dtype] as load_model makes it (dtype: of the activations; default load_model's)."""
    scheme, _, dtype = scheme.partition(":")
    if scheme.endswith("-plain"):  # the same scheme, every input's error counted alike
        model = qwen2.load_model(model_dir, dtype=dtype or None)
        return quantize_model(model, scheme.removesuffix("-plain"))
    return qwen2.load_model(model_dir, quantize=scheme, dtype=dtype or None)


def report(name: str, rows: list[torch.Tensor], reference_rows: list[torch.Tensor]) -> None:
    each = [agreement(r, ref) for r, ref in zip(rows, reference_rows)]
    vocab = min(reference_rows[0].shape[-1], rows[0].shape[-1])
    total = agreement(torch.cat([r[:, :vocab] for r in rows]), torch.cat([r[:, :vocab] for r in reference_rows]))
    print(f"{name:>14}  " + "  ".join(f"{a['top1_agreement']:6.1%} {a['kl_nats_per_token']:.2e}" for a in each)
          + f"  | all {total['top1_agreement']:.2%}  KL {total['kl_nats_per_token']:.3e}  ({total['positions']} tokens)",
          flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=".models/Qwen2.5-Coder-0.5B-Instruct")
    p.add_argument("--schemes", default="int4,int4-plain")
    p.add_argument("--against", default="", help="GGUF files, comma-separated")
    p.add_argument("--tokens", type=int, default=300, help="reply tokens per prompt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default="/tmp/quant-quality")
    p.add_argument("--llama-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases, reference_rows = reference(args.model, args.tokens, Path(args.cache))
    if args.llama_child:
        from llama_cpp import Llama

        llm = Llama(model_path=args.llama_child, n_threads=args.threads, n_ctx=2048, verbose=False)
        report(Path(args.llama_child).stem.rsplit("-", 1)[-1],
               [llama_logits(llm, c["prompt"], c["reply"]) for c in cases], reference_rows)
        return 0
    print(f"{len(PROMPTS)} replies of {args.tokens} tokens; per prompt: top-1, KL (nats/token)")
    for scheme in filter(None, args.schemes.split(",")):
        model = ours(args.model, scheme)
        report(scheme, [ours_logits(model, c["prompt"], c["reply"]) for c in cases], reference_rows)
        del model
    for gguf in filter(None, args.against.split(",")):
        subprocess.run([sys.executable, __file__, "--model", args.model, "--tokens", str(args.tokens),
                        "--threads", str(args.threads), "--cache", args.cache, "--llama-child", gguf], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
