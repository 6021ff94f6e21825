"""Speculative decoding (prompt lookup) against plain decoding, on the real checkpoint, greedy.

    python scripts/speculative_bench.py [--model .models/Qwen2.5-Coder-0.5B-Instruct] [--dtypes float32,bfloat16]
                                        [--prompts rename,hints,story] [--new-tokens 192] [--rounds 3]
                                        [--drafters "3,1,8;3,1,8,all"]

Both engines decode eagerly (qwen2.generate with fast_path=None against qwen2.speculative.
speculative_generate with a PromptLookupDrafter, gated by a DraftGate unless the drafter's
settings end in ",all"), alternately, round after round (which goes first
alternates too); decode tok/s = (new tokens - 1) / (time of the last token - time of the first), so
the prefill (the same for both) is left out. Prints best and median tok/s of each engine, the
speed-up (median of the per-round ratios, and best over best), the drafter's acceptance rate and the
tokens each target forward yields, and asserts the two engines' tokens are identical (in float32; in
bfloat16 a k-row forward may round differently from a one-row step, so a first difference is shown
instead). Then the verification's cost: one forward of T tokens against a one-token step.

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
from qwen2.generate import DecodeSession, default_stop_ids  # noqa: E402
from qwen2.speculative import PromptLookupDrafter, speculative_generate  # noqa: E402

RENAME_CODE = '''def summarize_orders(orders, tax_rate=0.08, discount_codes=None):
    """Summarize a list of orders: totals per customer, tax, discounts and the grand total."""
    discount_codes = discount_codes or {}
    total = 0.0
    per_customer = {}
    skipped = []
    for order in orders:
        if order.get("status") == "cancelled":
            skipped.append(order["id"])
            continue
        customer = order["customer"]
        subtotal = 0.0
        for item in order["items"]:
            price = item["price"] * item["quantity"]
            if item.get("taxable", True):
                price += price * tax_rate
            subtotal += price
        code = order.get("discount_code")
        if code in discount_codes:
            discount = discount_codes[code]
            if discount < 1:
                subtotal -= subtotal * discount
            else:
                subtotal -= discount
        subtotal = max(subtotal, 0.0)
        per_customer[customer] = per_customer.get(customer, 0.0) + subtotal
        total += subtotal
        if total > 1_000_000:
            print("warning: the total passed one million")
    average = total / len(per_customer) if per_customer else 0.0
    biggest = max(per_customer.items(), key=lambda kv: kv[1]) if per_customer else None
    report = []
    report.append(f"orders: {len(orders)} ({len(skipped)} cancelled)")
    report.append(f"customers: {len(per_customer)}")
    for customer, amount in sorted(per_customer.items()):
        share = amount / total if total else 0.0
        report.append(f"  {customer}: {amount:.2f} ({share:.1%})")
    report.append(f"average per customer: {average:.2f}")
    if biggest is not None:
        report.append(f"biggest customer: {biggest[0]} ({biggest[1]:.2f})")
    report.append(f"total: {total:.2f}")
    return {
        "total": round(total, 2),
        "average": round(average, 2),
        "per_customer": per_customer,
        "skipped": skipped,
        "report": "\\n".join(report),
    }
'''

HINTS_CODE = '''import json
import os


def load_config(path, defaults=None):
    defaults = defaults or {}
    if not os.path.exists(path):
        return dict(defaults)
    with open(path) as f:
        data = json.load(f)
    merged = dict(defaults)
    merged.update(data)
    return merged


def parse_size(text):
    units = {"k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}
    text = text.strip().lower()
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


class Cache:
    def __init__(self, capacity):
        self.capacity = capacity
        self.items = {}
        self.order = []

    def get(self, key, default=None):
        if key in self.items:
            self.order.remove(key)
            self.order.append(key)
            return self.items[key]
        return default

    def put(self, key, value):
        if key in self.items:
            self.order.remove(key)
        elif len(self.items) >= self.capacity:
            oldest = self.order.pop(0)
            del self.items[oldest]
        self.items[key] = value
        self.order.append(key)
'''

PROMPTS = {
    "rename": ("code edit: rename a variable",
               "Rename the variable `total` to `running_sum` in this function:\n\n```python\n"
               f"{RENAME_CODE}```"),
    "hints": ("code edit: add type hints", f"Add type hints to this code:\n\n```python\n{HINTS_CODE}```"),
    "story": ("open chat", "Tell me a short story about a robot."),  # the Coder model declines in 12 tokens
    "explain": ("open chat: explain", "Explain how a hash table works, in a few paragraphs."),
}


def timed(tokens):
    """Run a token stream; (ids, decode tok/s over tokens 2..n)."""
    ids, first = [], None
    for token in tokens:
        ids.append(token)
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    rate = (len(ids) - 1) / (end - first) if len(ids) > 1 and end > first else float("nan")
    return ids, rate


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def bench_prompt(model, ids, stop, args, configs):
    """Per round: plain, then each drafter configuration (the order reversed every other round).
    Returns the plain tokens and rates, and per configuration (tokens, rates, per-round ratios, stats)."""
    plain_rates, results = [], {c: ([], [], [], None) for c in configs}
    plain = None
    for r in range(args.rounds):
        engines = ["plain", *configs]
        for which in engines if r % 2 == 0 else engines[::-1]:
            if which == "plain":
                plain, rate = timed(qwen2.generate(model, ids, max_new_tokens=args.new_tokens, stop_token_ids=stop))
                plain_rates.append(rate)
            else:
                settings, gated = parse_drafter(which)
                stream = speculative_generate(model, ids, PromptLookupDrafter(*settings), max_new_tokens=args.new_tokens,
                                              stop_token_ids=stop, gated=gated)
                spec, rate = timed(stream)
                tokens, rates, ratios, _ = results[which]
                rates.append(rate)
                results[which] = (spec, rates, ratios, stream.stats)
        for c in configs:
            results[c][2].append(results[c][1][-1] / plain_rates[-1])
    return plain, plain_rates, results


def parse_drafter(text):
    """"3,1,8" -> ((3, 1, 8), gated); "3,1,8,all" -> verify every draft in full (no DraftGate)."""
    fields = text.split(",")
    gated = fields[-1] != "all"
    return tuple(int(x) for x in fields[:3]), gated


def verification_cost(model, ids, sizes=(1, 2, 4, 8, 9, 16), repeats=5):
    """ms of a step and of extend(T) at the prompt's length (best of `repeats`), and their ratio."""
    session = DecodeSession(model, 1, ids.shape[1] + max(sizes) + 1)
    session.prefill(ids)
    base = session.length
    token = ids[:, -1]

    def best(fn):
        times = []
        for _ in range(repeats):
            session.rewind(base)
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times) * 1000

    step = best(lambda: session.step(token))
    rows = [(t, best(lambda t=t: session.extend(ids[:, -t:] if t <= ids.shape[1] else token[None].repeat(1, t))))
            for t in sizes]
    return step, rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=".models/Qwen2.5-Coder-0.5B-Instruct")
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--prompts", default="rename,hints,story,explain")
    p.add_argument("--new-tokens", type=int, default=192)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--drafters", default="3,1,8",
                   help="PromptLookupDrafter settings max_ngram,min_ngram,max_draft (gated by DraftGate; add ',all' "
                        "to verify every draft in full); several joined by ';'")
    p.add_argument("--no-cost", action="store_true", help="skip the extend(T) / step cost table")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = [c.strip() for c in args.drafters.split(";")]
    tok = qwen2.Tokenizer.from_pretrained(args.model)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f} | "
          f"{args.model} | greedy, {args.new_tokens} new tokens, {args.rounds} alternating rounds | "
          f"lookup drafters (max_ngram,min_ngram,max_draft[,all: ungated]): {configs}")
    failures = []
    for dtype in args.dtypes.split(","):
        model = qwen2.load_model(args.model, device="cpu", dtype=dtype)
        stop = default_stop_ids(model, tok)
        encoded = {name: torch.tensor([tok.encode_chat([{"role": "user", "content": PROMPTS[name][1]}])])
                   for name in args.prompts.split(",")}
        # warm-up: both engines over a short reply
        first = next(iter(encoded.values()))
        list(qwen2.generate(model, first, max_new_tokens=8, stop_token_ids=stop))
        list(speculative_generate(model, first, max_new_tokens=8, stop_token_ids=stop))
        print(f"\n{dtype}")
        print(f"{'prompt':<24}{'drafter':>8}{'tokens':>7}{'plain tok/s':>12}{'spec tok/s':>11}{'speed-up':>9}"
              f"{'best/best':>10}{'accepted':>15}{'tok/fwd':>8}  same")
        for name, ids in encoded.items():
            plain, pr, results = bench_prompt(model, ids, stop, args, configs)
            label = f"{name} ({PROMPTS[name][0]})"[:23]
            for config, (spec, sr, ratios, stats) in results.items():
                diff = first_difference(plain, spec)
                same = "yes" if diff is None else f"no (first difference at token {diff})"
                if diff is not None and dtype == "float32":
                    failures.append(f"{dtype} {name} {config}: {same}")
                print(f"{label:<24}{config:>8}{len(spec):>7}{statistics.median(pr):>12.2f}"
                      f"{statistics.median(sr):>11.2f}{statistics.median(ratios):>8.2f}x{max(sr) / max(pr):>9.2f}x"
                      f"{stats.accepted:>6}/{stats.drafted:<4}{stats.acceptance or 0:>4.0%}"
                      f"{stats.tokens_per_forward:>8.2f}  {same}")
                print(f"{'':<24}rounds tok/s: plain {' '.join(f'{x:.2f}' for x in pr)} | "
                      f"spec {' '.join(f'{x:.2f}' for x in sr)} | prompt {ids.shape[1]} tokens")
        if not args.no_cost:
            ids = next(iter(encoded.values()))
            step, rows = verification_cost(model, ids)
            print(f"verification cost at {ids.shape[1]} tokens of context: step {step:.1f} ms; extend(T): " +
                  ", ".join(f"T={t} {ms:.1f} ms ({ms / step:.2f}x)" for t, ms in rows))
        del model
    if failures:
        print("\nNOT IDENTICAL: " + "; ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
