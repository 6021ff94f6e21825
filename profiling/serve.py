"""Serving benchmark: 1, 2, 4, 8 visitors chatting at once, through the engine or a running app.

    python -m profiling.serve --model DIR [--dtype bfloat16] [--users 1,2,4,8] [--new-tokens 64] \\
        [--fast-decode auto|off] [--out serve.json]
    python -m profiling.serve --app http://127.0.0.1:7860/ --users 1,2,4,8 --new-tokens 64

Each visitor sends one real chat prompt (rendered by the checkpoint's chat template) at the same
moment and reads its reply to the end (stop tokens ignored, so every reply is --new-tokens long).
Per concurrency it reports the throughput (all new tokens over the wall time, prefills included),
the aggregate decode speed (the streams' decode speeds added up: each from its first token to its
last), each stream's own decode speed, the time to first token from the request (p50 / p95) and
the queue wait.
Through the engine every compile happens before the timing starts; through the app, the figures are
what a visitor meets (the app's header says whether its step was compiled yet).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import threading
import time
from pathlib import Path

from .environment import cpu_model, git_info

CHAT_PROMPTS = [
    "Explain what a KV cache is, in three sentences.",
    "Write a Python function that checks whether a string is a palindrome, with a test.",
    "What is the difference between a list and a tuple in Python?",
    "Summarise how quicksort works and give its complexity.",
    "Write a SQL query that returns the ten most recent orders with their customer names.",
    "Why does attention scale quadratically with the sequence length?",
    "Write a bash one-liner that counts the lines of every .py file under a folder.",
    "Explain grouped-query attention to a new engineer.",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarise(users: int, streams: list[dict], wall_s: float) -> dict:
    """One row of the table from each stream's {new_tokens, ttft_s, queue_wait_s, decode_tok_s}."""
    ttft = [s["ttft_s"] for s in streams]
    return {
        "users": users,
        "aggregate_tok_s": sum(s["new_tokens"] for s in streams) / wall_s,
        "aggregate_decode_tok_s": sum(s["decode_tok_s"] for s in streams),
        "stream_tok_s_mean": statistics.mean(s["decode_tok_s"] for s in streams),
        "stream_tok_s_min": min(s["decode_tok_s"] for s in streams),
        "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
        "queue_wait_p95_s": percentile([s["queue_wait_s"] for s in streams], 0.95),
        "wall_s": wall_s, "errors": sum(1 for s in streams if s.get("error")),
    }


def run_concurrently(users: int, one) -> tuple[list[dict], float]:
    """one(i) -> stream dict, called from `users` threads released at the same moment."""
    results: list[dict] = [{} for _ in range(users)]
    gate = threading.Barrier(users)

    def visitor(i):
        gate.wait()
        try:
            results[i] = one(i)
        except Exception as exc:  # noqa: BLE001 - counted as an error of this run, reported
            results[i] = {"error": f"{type(exc).__name__}: {exc}", "new_tokens": 0, "ttft_s": float("nan"),
                          "queue_wait_s": float("nan"), "decode_tok_s": 0.0}

    threads = [threading.Thread(target=visitor, args=(i,)) for i in range(users)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def engine_streams(args):
    """A function per concurrency that runs it through a qwen2 Engine built here."""
    import qwen2
    from qwen2.engine import Engine

    model = qwen2.load_model(args.model, dtype=args.dtype, quantize=args.quantize)
    tokenizer = qwen2.Tokenizer.from_pretrained(args.model)
    prompts = [tokenizer.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True)
               for p in CHAT_PROMPTS]
    engine = Engine(model, rows=max(args.users), row_tokens=1024, fast_decode=args.fast_decode,
                    speculate=args.speculate == "on")
    engine.compile_now(lambda fraction, message: print(message, file=sys.stderr, flush=True))
    engine.start(compile_in_background=False)

    def one(i):
        reply = engine.submit(prompts[i % len(prompts)], max_new_tokens=args.new_tokens)
        for _ in reply:
            pass
        stats = reply.stats
        return {"new_tokens": stats.new_tokens, "ttft_s": stats.queue_wait_s + stats.ttft_s,
                "queue_wait_s": stats.queue_wait_s, "decode_tok_s": stats.decode_tok_s or 0.0}

    # warm the eager prefill and each batch size once, untimed
    for users in args.users:
        run_concurrently(users, one)
    info = {"path": "engine", "decode": engine.state, "model": str(args.model), "dtype": args.dtype,
            "quantize": args.quantize, "speculate": args.speculate}
    return one, info, engine.close


STATS_NUMBER = re.compile(r"(\d+) new tokens.*?(?:waited ([\d.]+) s · )?first token (\d+) ms · ([\d.]+) tok/s")


def app_streams(args):
    """A function per concurrency that sends real /chat requests to a running app."""
    from gradio_client import Client

    def one(i):
        client = Client(args.app, verbose=False)
        started = time.perf_counter()
        first = None
        job = client.submit(CHAT_PROMPTS[i % len(CHAT_PROMPTS)], temperature=0, max_new_tokens=args.new_tokens,
                            api_name="/chat")
        while not job.done():
            if first is None and job.outputs():
                first = time.perf_counter()
            time.sleep(0.005)
        _, stats = job.result()
        match = STATS_NUMBER.search(stats)
        if match is None:
            raise RuntimeError(f"no statistics in the reply: {stats!r}")
        new, waited, _, rate = match.groups()
        return {"new_tokens": int(new), "ttft_s": (first or time.perf_counter()) - started,
                "queue_wait_s": float(waited or 0), "decode_tok_s": float(rate)}

    return one, {"path": "app", "url": args.app}, lambda: None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m profiling.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory or hub id (engine mode)")
    p.add_argument("--app", help="URL of a running app (app mode), e.g. http://127.0.0.1:7860/")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantize", default=None)
    p.add_argument("--fast-decode", default="auto", choices=("auto", "compile", "off"))
    p.add_argument("--speculate", default="on", choices=("on", "off"),
                   help="engine mode: speculative decoding for a reply decoding alone, as the app does (default: on)")
    p.add_argument("--users", default="1,2,4,8", help="comma list of concurrent visitors (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    args.users = [int(u) for u in args.users.split(",")]
    if bool(args.model) == bool(args.app):
        p.exit(2, "error: give --model (through the engine) or --app (through a running app)\n")
    one, info, done = engine_streams(args) if args.model else app_streams(args)
    rows = []
    try:
        for users in args.users:
            streams, wall = run_concurrently(users, one)
            rows.append(summarise(users, streams, wall))
            r = rows[-1]
            print(f"{users} users: {r['aggregate_tok_s']:6.1f} tok/s over the wall · decode {r['aggregate_decode_tok_s']:6.1f} "
                  f"tok/s together, per stream {r['stream_tok_s_mean']:5.1f} "
                  f"(min {r['stream_tok_s_min']:5.1f}) · TTFT p50 {r['ttft_p50_s'] * 1000:5.0f} ms "
                  f"p95 {r['ttft_p95_s'] * 1000:5.0f} ms · queue wait p95 {r['queue_wait_p95_s']:.2f} s · "
                  f"errors {r['errors']}", flush=True)
    finally:
        done()
    one_user = next((r for r in rows if r["users"] == 1), None)
    if one_user:
        for r in rows:
            r["vs_one_user"] = {"aggregate": r["aggregate_tok_s"] / one_user["aggregate_tok_s"],
                                "aggregate_decode": r["aggregate_decode_tok_s"] / one_user["aggregate_decode_tok_s"],
                                "per_stream": r["stream_tok_s_mean"] / one_user["stream_tok_s_mean"],
                                "ttft_p95": r["ttft_p95_s"] / one_user["ttft_p95_s"]}
            print(f"{r['users']} users vs 1: over the wall {r['vs_one_user']['aggregate']:.2f}x, decode together "
                  f"{r['vs_one_user']['aggregate_decode']:.2f}x, per stream "
                  f"{r['vs_one_user']['per_stream']:.2f}x, TTFT p95 {r['vs_one_user']['ttft_p95']:.2f}x")
    if args.out:
        import torch

        result = {"kind": "serving", **info, "new_tokens": args.new_tokens, "rows": rows,
                  "environment": {"cpu": cpu_model(), "threads": torch.get_num_threads(), "git": git_info()}}
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
