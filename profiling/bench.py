"""Command line: profile a qwen2 model on one or more devices/dtypes and write run files.

    python -m profiling.bench --model Qwen/Qwen2-0.5B-Instruct --device cpu --dtype float32 \\
        --prompt-tokens 32 --new-tokens 8 --out run.json [--trace-dir traces] \\
        [--baseline transformers] [--sweep 128,512,2048] [--quantize int8] [--fast-decode auto]

Several devices or dtypes (`--device cpu,cuda --dtype float32,bfloat16`) write one file per
combination: run.json -> run.cpu.float32.json, run.cuda0.bfloat16.json, ...
Bad input gives one "error: ..." line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import gc
import re
import sys
from pathlib import Path

import torch

from qwen2.options import FAST_DECODE_MODES, QUANT_SCHEMES, dtype_name, parse_dtype, resolve_device

from .errors import ProfilingError
from .measure import profile_model
from .progress import TqdmProgress
from .runfile import save_run
from .settings import parse_sweep


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class _DefaultsShown(argparse.HelpFormatter):
    """--help says each option's default, where it has one worth saying (not None, not a flag's False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _int_at_least(minimum: int):
    """An argparse type: a whole number >= minimum, with a one-line message otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


_positive, _non_negative = _int_at_least(1), _int_at_least(0)


def build_parser(prog: str = "python -m profiling.bench") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, formatter_class=_DefaultsShown,
                description="Profile a qwen2 model: speed, per-layer time, memory; write JSON.")
    p.add_argument("--model", required=True, help="hub id or local checkpoint directory")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights in the checkpoint's shape (no weight download)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps; comma list allowed")
    p.add_argument("--dtype", default="float32",
                   help="float32, bfloat16 or float16; comma list allowed")
    p.add_argument("--prompt-tokens", type=_positive, default=32, help="prompt length (seeded random token ids)")
    p.add_argument("--new-tokens", type=_positive, default=8, help="timed decode steps")
    p.add_argument("--warmup", type=_non_negative, default=1, help="untimed warm-up runs")
    p.add_argument("--out", default="run.json", help="run file (one per device/dtype if several)")
    p.add_argument("--trace-dir", default=None,
                   help="also write one torch.profiler trace file per run here (Perfetto, "
                        "TensorBoard)")
    p.add_argument("--baseline", default=None, choices=["transformers"],
                   help="also time transformers' generate on the same model and prompt")
    p.add_argument("--sweep", default=None, help="context lengths, e.g. 128,512,2048")
    p.add_argument("--quantize", default=None, choices=list(QUANT_SCHEMES), help="weight-only quantized linear layers")
    p.add_argument("--fast-decode", default="off", choices=list(FAST_DECODE_MODES),
                   help="load with qwen2's fast decode path (CUDA graphs / compiled CPU step); "
                        "its speed is recorded as fast_decode, with per-block figures for a "
                        "compiled CPU step (its trace cut at the matrix products)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt ids and random weights")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def output_paths(out: str, combos: list[tuple[torch.device, torch.dtype]]) -> list[Path]:
    path = Path(out)
    if len(combos) == 1:
        return [path]
    suffix = path.suffix or ".json"
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return [path.with_name(f"{stem}.{re.sub(r'[^a-z0-9]', '', str(d))}.{dtype_name(t)}{suffix}")
            for d, t in combos]


def _split(text: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ProfilingError(f"empty list {text!r}")
    return list(dict.fromkeys(items))


def summary_line(run: dict, path: Path) -> str:
    bw = run.get("bandwidth") or {}
    roof = bw.get("roofline_fraction")
    limit = bw.get("limit_bytes_per_s")
    roof_text = (f" ({100 * roof:.1f}% of {limit / 1e9:.0f} GB/s {bw.get('limit_source')} roofline)"
                 if roof is not None and limit else "")
    line = (f"{run['device']} {run['dtype']}: TTFT {run['ttft_s'] * 1e3:.1f} ms, prefill "
            f"{run['prefill_tokens_per_s']:.1f} tok/s, decode {run['decode_tokens_per_s']:.1f} "
            f"tok/s{roof_text}")
    if run.get("fast_decode"):
        line += f"; fast-path decode {run['fast_decode']['decode_tokens_per_s']:.1f} tok/s"
    if run.get("baseline"):
        line += f"; transformers decode {run['baseline']['decode_tokens_per_s']:.1f} tok/s"
    return f"{line} -> {path}"


def profile_one(args, device: torch.device, dtype: torch.dtype, path: Path) -> dict:
    """Load the model on one device/dtype, profile it, write the run file; return the run."""
    import qwen2

    torch.manual_seed(args.seed)
    from qwen2.fast import make_fast_path

    model = qwen2.load_model(args.model, device=str(device), dtype=dtype,
                             random_weights=args.random_weights, quantize=args.quantize)
    bar = TqdmProgress(desc=f"{device} {dtype_name(dtype)}", disable=args.no_progress or None)
    try:
        run = profile_model(model, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                            warmup=args.warmup, baseline=args.baseline, sweep=args.sweep,
                            trace_dir=args.trace_dir, progress=bar, seed=args.seed,
                            fast_path=make_fast_path(model, args.fast_decode))
    finally:
        bar.close()
    save_run(run, path)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return run


def run_cli(args) -> int:
    devices = [resolve_device(d) for d in _split(args.device)]
    dtypes = [parse_dtype(d) for d in _split(args.dtype)]
    parse_sweep(args.sweep)  # refuse a bad list before loading anything
    if args.baseline:
        from .baseline import check_baseline

        check_baseline(args.baseline)
    combos = [(d, t) for d in devices for t in dtypes]
    for (device, dtype), path in zip(combos, output_paths(args.out, combos)):
        run = profile_one(args, device, dtype, path)
        print(summary_line(run, path))
        if run.get("trace"):
            print(f"  trace: {run['trace']['open']['perfetto']}")
            print(f"  trace: {run['trace']['open']['tensorboard']}")
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m profiling.bench") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return run_cli(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except torch.OutOfMemoryError as exc:
        if args.debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
        print(f"error: out of memory: {first}", file=sys.stderr)
        return 1
    except (ValueError, OSError, ImportError) as exc:  # our errors, qwen2's errors, bad files
        if args.debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
