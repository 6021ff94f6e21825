#!/usr/bin/env python
"""Qwen2 Studio: chat with the from-scratch Qwen2 runtime and profile it, in one Gradio app.

    python app.py [--model ID_OR_DIR] [--device cpu|cuda|cuda:N|mps] [--dtype float32|bfloat16|float16]
                  [--quantize int8|int4] [--fast-decode auto|compile|off] [--slots 4] [--slot-tokens 8192]
                  [--runs-dir runs] [--host 127.0.0.1] [--port 7860]

The model loads once, at start-up, into a serving engine (qwen2.engine): every visitor's reply decodes
in one batched step with the others', and each browser session keeps its conversation's row of the KV
cache between turns, so a turn only prefills what is new. The page opens at once; the CPU decode step
compiles in the background and the header shows how far it is. A profile or the Inside view holds the
model alone: it waits for the live replies, and new ones wait for it. A hub id that can be neither
downloaded nor found in the cache falls back to random weights of the same official shape and a
byte-level tokenizer, so the app always starts, and the page says so (and how to get real weights).

This file is the entry point only (arguments, start-up, launch): the app's logic is in studio/ (no
Gradio there) and the page in ui/ (a module per tab).
"""

from __future__ import annotations

import os

# ZeroGPU Spaces: `spaces` must be imported before torch initialises CUDA; elsewhere it is not needed.
spaces = None
if os.environ.get("SPACES_ZERO_GPU"):
    try:
        import spaces
    except ImportError:
        spaces = None

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402

import profiling.runfile  # noqa: E402
import profiling.trace  # noqa: E402
from qwen2 import options  # noqa: E402
from qwen2.engine import Limits  # noqa: E402
from qwen2.errors import Qwen2Error  # noqa: E402
from studio.hosting import DEFAULT_MODEL, LoadedModel  # noqa: E402
from studio.runs import MAX_RUN_BYTES, RunStore  # noqa: E402
from ui.page import CSS, build_demo  # noqa: E402

DEFAULT_COMPILE_CACHE = Path("~/.cache/qwen2-studio/inductor")


def parse_args(argv=None):
    env = os.environ.get
    p = argparse.ArgumentParser(description="Qwen2 Studio: chat + profiling dashboard")
    p.add_argument("--model", default=env("QWEN2_STUDIO_MODEL", DEFAULT_MODEL),
                   help="hub repo id or local checkpoint directory (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: CUDA if present)")
    p.add_argument("--dtype", default=None, choices=options.DTYPE_NAMES)
    p.add_argument("--quantize", default=None, choices=options.QUANT_SCHEMES,
                   help="weight-only quantized linear layers")
    p.add_argument("--fast-decode", default=env("QWEN2_FAST_DECODE") or None, choices=("auto", "compile", "off"),
                   help="how decode steps run: default 'auto' = the Inductor-compiled step on CPU (compiled in "
                        "the background while replies decode eagerly; the header shows its progress), eager "
                        "elsewhere; 'compile'; 'off' (plain module calls); also QWEN2_FAST_DECODE")
    p.add_argument("--speculate", default=env("QWEN2_STUDIO_SPECULATE", "on"), choices=("on", "off"),
                   help="speculative decoding for a reply decoding alone: prompt-lookup guesses checked in one "
                        "forward, only as many as pay (greedy replies keep their tokens; default: %(default)s)")
    p.add_argument("--slots", type=int, default=int(env("QWEN2_STUDIO_SLOTS", "4")),
                   help="conversations served at once, each with its own row of the KV cache (default: %(default)s)")
    p.add_argument("--slot-tokens", type=int, default=int(env("QWEN2_STUDIO_SLOT_TOKENS", "8192")),
                   help="each conversation's context, prompt and reply (default: %(default)s, at most the model's)")
    p.add_argument("--max-new-tokens", type=int, default=int(env("QWEN2_STUDIO_MAX_NEW_TOKENS", "2048")),
                   help="the most new tokens one request may ask for (default: %(default)s)")
    p.add_argument("--reply-time-limit", type=float, default=float(env("QWEN2_STUDIO_REPLY_TIME_LIMIT", "120")),
                   help="seconds after which a reply ends, whatever its settings (default: %(default)s)")
    p.add_argument("--compile-mode", default=env("QWEN2_STUDIO_COMPILE_MODE", "max-autotune"),
                   choices=("default", "max-autotune"),
                   help="Inductor's effort: max-autotune (default) times its GEMM kernels for the fastest "
                        "step, slower to compile; default compiles quickly (times: docs/benchmarks.md)")
    p.add_argument("--compile-cache", default=env("QWEN2_STUDIO_COMPILE_CACHE", str(DEFAULT_COMPILE_CACHE)),
                   help="where compiled steps are kept across restarts (TORCHINDUCTOR_CACHE_DIR; default: "
                        "%(default)s)")
    p.add_argument("--runs-dir", default=env("QWEN2_STUDIO_RUNS_DIR", "runs"), help="profiling runs")
    p.add_argument("--runs-max-files", type=int, default=int(env("QWEN2_STUDIO_RUNS_MAX_FILES", "200")),
                   help="the runs folder's cap in files (a profile's trace folder counts as one); past it, "
                        "the oldest go first (default: %(default)s)")
    p.add_argument("--runs-max-mb", type=int, default=int(env("QWEN2_STUDIO_RUNS_MAX_MB", "500")),
                   help="the runs folder's cap in MB (default: %(default)s)")
    p.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")))
    # Testing aid: the random-weights fallback builds this config.json's shape instead of the hub id's.
    p.add_argument("--fallback-config", default=env("QWEN2_STUDIO_FALLBACK_CONFIG"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def fail(message: str):
    """Stop start-up with one `error:` line and exit status 2 (argparse's and `python -m qwen2`'s)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def main(argv=None):
    args = parse_args(argv)
    # Inductor reads its cache directory when it first compiles: set before the engine starts.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(args.compile_cache).expanduser()))
    for name, value in (("--slots", args.slots), ("--slot-tokens", args.slot_tokens),
                        ("--max-new-tokens", args.max_new_tokens), ("--reply-time-limit", args.reply_time_limit),
                        ("--runs-max-files", args.runs_max_files), ("--runs-max-mb", args.runs_max_mb)):
        if value <= 0:
            fail(f"{name} must be positive, not {value}")
    limits = Limits(new_tokens=args.max_new_tokens, wall_s=args.reply_time_limit)
    # Traces run on Gradio's worker threads, and torch.profiler must first start on this one
    # (profiling.trace); before the engine's threads, so the empty session sees none of their work.
    try:
        profiling.trace.start_profiler_here()
    except RuntimeError as exc:  # a torch built without the profiler: chat and profiles work, traces may not
        print(f"[qwen2-studio] torch.profiler did not start: {exc}", flush=True)
    try:
        lm = LoadedModel(args.model, args.device, args.dtype, args.quantize, args.fallback_config, args.fast_decode,
                         slots=args.slots, slot_tokens=args.slot_tokens, limits=limits,
                         compile_mode=args.compile_mode, zero_gpu=spaces is not None,
                         speculate=args.speculate == "on").start()
    except (Qwen2Error, OSError, ValueError) as exc:  # a broken checkpoint, a bad device: one line, like the CLI
        fail(str(exc))
    runs = RunStore(Path(args.runs_dir).resolve(), args.runs_max_files, args.runs_max_mb * 2**20)
    demo = build_demo(lm, runs)
    demo.queue(default_concurrency_limit=1)
    # Uploads are run files (RunStore refuses any over MAX_RUN_BYTES); Gradio refuses bigger ones
    # before they reach the disk.
    demo.launch(server_name=args.host, server_port=args.port, show_error=True,
                max_file_size=MAX_RUN_BYTES,
                allowed_paths=[str(runs.folder), str(profiling.runfile.SHIPPED_RUNS_DIR)],
                theme=gr.themes.Soft(), css=CSS)


if __name__ == "__main__":
    main()
