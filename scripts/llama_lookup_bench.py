"""llama.cpp's own prompt-lookup decoding against its plain decoding, on the prompts of
scripts/speculative_bench.py: the figure to set beside ours (llama-cpp-python's
`LlamaPromptLookupDecoding`, greedy).

    python scripts/llama_lookup_bench.py GGUF [--prompts rename,explain] [--new-tokens 160] [--rounds 3]

One `Llama` per process (a second one in the same process crashed here), so each run is a child
process; plain and lookup alternate, round after round. decode tok/s = (tokens - 1) / (time of the
last token - time of the first). Prints each engine's rounds, the median speed-up, and whether the
two produced the same tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(gguf: str, ids: list[int], n: int, lookup: bool, threads: int) -> dict:
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    draft = LlamaPromptLookupDecoding(max_ngram_size=3, num_pred_tokens=8) if lookup else None
    llm = llama_cpp.Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=len(ids) + n + 16,
                          n_batch=len(ids) + n + 16, logits_all=lookup, draft_model=draft, verbose=False)
    tokens, first = [], None
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        tokens.append(int(token))
        if first is None:
            first = time.perf_counter()
        if len(tokens) == n or token == llm.token_eos():
            break
    rate = (len(tokens) - 1) / max(time.perf_counter() - first, 1e-9)
    return {"tokens": tokens, "rate": rate}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gguf")
    p.add_argument("--model", default=".models/Qwen2.5-Coder-0.5B-Instruct", help="for the tokenizer")
    p.add_argument("--prompts", default="rename,explain")
    p.add_argument("--new-tokens", type=int, default=160)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(args.gguf, spec["ids"], args.new_tokens, spec["lookup"], args.threads)))
        return 0
    import qwen2
    from scripts.speculative_bench import PROMPTS

    tok = qwen2.Tokenizer.from_pretrained(args.model)
    print(f"llama.cpp {args.gguf} | greedy, {args.new_tokens} new tokens, {args.rounds} alternating rounds, "
          f"{args.threads} threads | lookup: max_ngram_size=3, num_pred_tokens=8")
    for name in args.prompts.split(","):
        ids = tok.encode_chat([{"role": "user", "content": PROMPTS[name][1]}])
        runs = {False: [], True: []}
        for r in range(args.rounds):
            for lookup in ((False, True) if r % 2 == 0 else (True, False)):
                spec = json.dumps({"ids": ids, "lookup": lookup})
                out = subprocess.run([sys.executable, __file__, args.gguf, "--child", spec, "--new-tokens",
                                      str(args.new_tokens), "--threads", str(args.threads)],
                                     capture_output=True, text=True, check=True)
                runs[lookup].append(json.loads(out.stdout.strip().splitlines()[-1]))
        plain, spec_ = [x["rate"] for x in runs[False]], [x["rate"] for x in runs[True]]
        ratios = [b / a for a, b in zip(plain, spec_)]
        same = runs[False][-1]["tokens"] == runs[True][-1]["tokens"]
        print(f"{name:<8} ({len(runs[True][-1]['tokens'])} tokens) plain {' '.join(f'{x:.1f}' for x in plain)} | "
              f"lookup {' '.join(f'{x:.1f}' for x in spec_)} tok/s | speed-up {statistics.median(ratios):.2f}x "
              f"(median of rounds) | same tokens: {'yes' if same else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
