"""Speculative decoding in the serving engine (what a chat reply runs), against the same engine's
plain decoding, on the real checkpoint, greedy.

    python scripts/engine_speculation_bench.py [--model .models/Qwen2.5-Coder-0.5B-Instruct]
        [--dtype bfloat16] [--quantize int8] [--fast-decode compile] [--compile-mode max-autotune]
        [--prompts rename,hints,explain] [--new-tokens 160] [--rounds 3]

One engine (one row) with its steps compiled first (decode step and verification); each round
submits every prompt twice, plain (`speculate=False`) and speculating, the order reversed every
other round. Decode tok/s is the reply's own statistic ((new tokens - 1) / time from the first token
to the last): the prefill, the same for both, is left out. Prints the median tok/s of each, the
speed-up (median of the per-round ratios), the guesses kept and whether the tokens were identical,
and the speed-up the reply's statistics line estimated (ReplyStats.speculation_speedup; 1.00 where it
did not speculate).
On a shared machine absolute speeds are noise: the ratios, taken round by round, are the result.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qwen2  # noqa: E402
from qwen2.engine import Engine  # noqa: E402
from qwen2.generate import default_stop_ids  # noqa: E402
from qwen2.sampling import SamplingSettings  # noqa: E402
from scripts.speculative_bench import PROMPTS, first_difference  # noqa: E402


def verify_prices(costs) -> str:
    """"of 2-4 tokens at 1.24 steps, 5-9 at 1.64": each run of tokens with one price (a compiled width)."""
    spans, start = [], 1
    for tokens in range(2, len(costs) + 1):
        if tokens == len(costs) or costs[tokens] != costs[tokens - 1]:
            spans.append(f"{start + 1}-{tokens} tokens at {costs[tokens - 1]:.2f} steps")
            start = tokens
    return "of " + ", ".join(spans)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=".models/Qwen2.5-Coder-0.5B-Instruct")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantize", default=None, choices=(None, "int8", "int4"))
    p.add_argument("--fast-decode", default="compile", choices=("compile", "off"))
    p.add_argument("--compile-mode", default="max-autotune")
    p.add_argument("--prompts", default="rename,hints,explain")
    p.add_argument("--new-tokens", type=int, default=160)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = qwen2.Tokenizer.from_pretrained(args.model)
    model = qwen2.load_model(args.model, dtype=args.dtype, quantize=args.quantize)
    stop = default_stop_ids(model, tok)
    engine = Engine(model, rows=1, row_tokens=2048, fast_decode=args.fast_decode, compile_mode=args.compile_mode)
    started = time.perf_counter()
    engine.compile_now(lambda fraction, message: print(f"  {message}", file=sys.stderr, flush=True))
    engine.start(compile_in_background=False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f} | {args.model} "
          f"{args.quantize or args.dtype} | engine steps: {engine.state} ({args.compile_mode}, "
          f"{time.perf_counter() - started:.0f} s) | verification {verify_prices(engine.steps.verify_cost)} | greedy, "
          f"{args.new_tokens} new tokens, {args.rounds} rounds")
    greedy = SamplingSettings()
    encoded = {name: tok.encode_chat([{"role": "user", "content": PROMPTS[name][1]}]) for name in args.prompts.split(",")}
    for prompt in encoded.values():  # warm-up: both ways, once
        engine.generate(prompt[:64], settings=greedy, max_new_tokens=8, stop_ids=stop, speculate=False)
        engine.generate(prompt[:64], settings=greedy, max_new_tokens=8, stop_ids=stop)
    print(f"{'prompt':<26}{'tokens':>7}{'plain tok/s':>12}{'spec tok/s':>11}{'speed-up':>9}{'kept':>14}  same")
    for name, prompt in encoded.items():
        rates = {"plain": [], "spec": []}
        outs, kept, estimates = {}, [], []
        for r in range(args.rounds):
            for which in ("plain", "spec") if r % 2 == 0 else ("spec", "plain"):
                reply = engine.submit(prompt, greedy, args.new_tokens, stop, speculate=which == "spec")
                outs[which] = list(reply)
                rates[which].append(reply.stats.decode_tok_s or float("nan"))
                if which == "spec":
                    kept.append((reply.stats.accepted, reply.stats.drafted))
                    estimates.append(reply.stats.speculation_speedup or 1.0)
        ratios = [s / p for s, p in zip(rates["spec"], rates["plain"])]
        diff = first_difference(outs["plain"], outs["spec"])
        accepted, drafted = kept[-1]
        print(f"{name + ' (' + PROMPTS[name][0] + ')':<26.25}{len(outs['spec']):>7}{statistics.median(rates['plain']):>12.2f}"
              f"{statistics.median(rates['spec']):>11.2f}{statistics.median(ratios):>8.2f}x"
              f"{accepted:>7}/{drafted:<4}{accepted / drafted if drafted else 0:>3.0%}  "
              f"{'yes' if diff is None else f'no (first difference at token {diff})'}")
        print(f"{'':<26}rounds tok/s: plain {' '.join(f'{x:.2f}' for x in rates['plain'])} | "
              f"spec {' '.join(f'{x:.2f}' for x in rates['spec'])} | prompt {len(prompt)} tokens | the "
              f"statistics line's estimate {statistics.median(estimates):.2f}x", flush=True)
    engine.close()


if __name__ == "__main__":
    main()
