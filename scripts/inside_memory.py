"""What the "Inside the model" view keeps per session: RSS and time of N live sessions.

    python scripts/inside_memory.py                                   # the checkout's model, 3 sessions
    python scripts/inside_memory.py --dtype bfloat16 --max-tokens 1024
    python scripts/inside_memory.py --model Qwen/Qwen2.5-0.5B-Instruct  # random weights of that shape
    python scripts/inside_memory.py --impl /tmp/old/inside.py --max-tokens 0 --prompt-tokens 1024
    python scripts/inside_memory.py --sweep 128,256,512,1024,2048     # prefill time per prompt length

Like the app (app.py's Inside keeps up to 4), each session stays alive after its start and its
steps, and so does its last view; RSS (psutil) is printed after the model is loaded and after every start/step, and the
tensor bytes each session holds (its attributes walked, each storage counted once). The prompt is
`--prompt` repeated and cut to the cap less the steps, so the steps fit. A session allocates its KV
cache for its cap at start, so `--max-tokens 0` (no cap: the model's context) measures a cache of
the whole context. `--impl FILE` imports another copy of inside/session.py (e.g. the version before
a change) to compare; it is loaded as part of the inside package, so its relative imports resolve.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402

import qwen2  # noqa: E402
from profiling.memory import held_tensor_bytes  # noqa: E402

DEFAULT_MODEL = ROOT / ".models" / "Qwen2.5-Coder-0.5B-Instruct"


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def load_impl(path: str | None):
    import inside

    if not path:
        return inside.session
    spec = importlib.util.spec_from_file_location("inside.session_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def new_session(module, model, tokenizer, max_tokens: int | None):
    from inside import InsideSettings

    return module.InsideSession(model, tokenizer, InsideSettings(max_tokens=max_tokens))


def load(args):
    """The model (real weights where the directory has them, else random ones of its shape) and its
    tokenizer (None without tokenizer files: prompts are then bytes taken as token ids)."""
    if args.model:
        source = args.model
    elif DEFAULT_MODEL.is_dir():
        source = str(DEFAULT_MODEL)
    else:
        source = "Qwen/Qwen2.5-0.5B-Instruct"  # the built-in table's shape, random weights
    directory = Path(source)
    real = directory.is_dir() and any(directory.glob("*.safetensors")) and not args.random_weights
    model = qwen2.load_model(source, dtype=args.dtype, random_weights=not real)
    tokenizer = None
    if directory.is_dir() and (directory / "tokenizer.json").exists():
        tokenizer = qwen2.Tokenizer.from_pretrained(source)
    return model, tokenizer, source, real


def prompt_ids(tokenizer, text: str, n: int, vocab: int) -> list[int]:
    if tokenizer is not None:
        reps = n
        ids = tokenizer.encode(text * reps)
        while len(ids) < n:
            reps *= 2
            ids = tokenizer.encode(text * reps)
        return ids[:n]
    raw = text.encode()
    return [b % vocab for b in (raw * (n // len(raw) + 1))[:n]]  # a byte "tokenizer"


def sweep(module, model, tokenizer, lengths, args):
    print(f"{'tokens':>7} {'start_s':>8} {'step_s':>7} {'rss_MB':>8}")
    for n in lengths:
        ids = prompt_ids(tokenizer, args.prompt, n, model.config.vocab_size)
        session = new_session(module, model, tokenizer, n + 1)  # the cap sizes the cache: the prompt and a step
        t0 = time.perf_counter()
        session.start(ids)
        t1 = time.perf_counter()
        session.step()
        t2 = time.perf_counter()
        print(f"{n:7d} {t1 - t0:8.2f} {t2 - t1:7.3f} {rss_mb():8.0f}", flush=True)
        session.close()
        del session


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a checkpoint directory (real weights when it has them) or an "
                   "official repo id (random weights of its shape); default: .models/Qwen2.5-Coder-0.5B-Instruct")
    p.add_argument("--random-weights", action="store_true", help="random weights even where a checkpoint is")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: load_model's choice)")
    p.add_argument("--impl", default=None, help="another copy of inside/session.py to measure (e.g. the old one)")
    p.add_argument("--sessions", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=1024, help="the session's cap (0: pass none)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="prompt length (default: the cap less the steps)")
    p.add_argument("--prompt", default="fox ", help="the text repeated into the prompt")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--sweep", default=None, help="comma-separated prompt lengths: time one start + step each")
    p.add_argument("--close", action="store_true", help="close every session at the end and print RSS")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    module = load_impl(args.impl)
    base = rss_mb()
    t0 = time.perf_counter()
    model, tokenizer, source, real = load(args)
    print(f"model {source} ({'real' if real else 'random'} weights, {str(model.dtype).removeprefix('torch.')}), "
          f"impl {args.impl or 'inside/session.py'}, torch threads {torch.get_num_threads()}, "
          f"loaded in {time.perf_counter() - t0:.1f} s")
    loaded = rss_mb()
    print(f"RSS before loading {base:.0f} MB, after loading {loaded:.0f} MB")

    if args.sweep:
        sweep(module, model, tokenizer, [int(x) for x in args.sweep.split(",")], args)
        return

    cap = args.max_tokens or None
    n_prompt = args.prompt_tokens or ((cap or 1024) - args.steps)
    ids = prompt_ids(tokenizer, args.prompt, n_prompt, model.config.vocab_size)
    print(f"prompt {len(ids)} tokens, cap {cap}, {args.sessions} sessions x {args.steps} steps")
    sessions, views = [], []
    for s in range(args.sessions):
        session = new_session(module, model, tokenizer, cap)
        sessions.append(session)  # kept alive, as the app keeps its last 4
        before = rss_mb()
        t = time.perf_counter()
        view = session.start(ids)
        start_s = time.perf_counter() - t
        after = rss_mb()
        held_start = held_tensor_bytes(session, skip=(model, tokenizer)) / 2**20
        step_s = []
        for _ in range(args.steps):
            t = time.perf_counter()
            view = session.step()
            step_s.append(time.perf_counter() - t)
        views.append(view)  # the app keeps the last view too (the attention slider redraws from it)
        stepped = rss_mb()
        held = held_tensor_bytes(session, skip=(model, tokenizer)) / 2**20
        steps = ", ".join(f"{x:.3f}" for x in step_s)
        print(f"session {s + 1}: RSS {before:.0f} -> {after:.0f} MB after start ({start_s:.2f} s), "
              f"{stepped:.0f} MB after {args.steps} steps ({steps} s); tensors held {held_start:.1f} MB after "
              f"start, {held:.1f} MB after the steps", flush=True)
    end = rss_mb()
    print(f"RSS after {args.sessions} sessions: {end:.0f} MB = loaded model + {end - loaded:.0f} MB")
    if args.close:
        for session in sessions:
            session.close()
        print(f"RSS after closing them: {rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
