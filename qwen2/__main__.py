"""Terminal chat: python -m qwen2 --model ID_OR_DIR [--device] [--dtype] [--prompt TEXT]

With --prompt: one reply, then exit. Without: a multi-turn chat (empty line or Ctrl-D quits).
After each reply: prompt tokens, time to first token and decode tokens/s.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from . import generate, load_model
from .fast import warm_up
from .errors import ModelNotFoundError, Qwen2Error, TokenizerError
from .tokenizer import Tokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m qwen2", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Qwen/Qwen2-0.5B-Instruct", help="hub repo id or local directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: best for the device)")
    p.add_argument("--quantize", default=None, choices=["int8"], help="weight-only int8 linear layers")
    p.add_argument("--fast-decode", default="graphs", choices=["graphs", "compile", "off"],
                   help="CUDA only: replay decode steps as a CUDA graph (default), also torch.compile them, or not")
    p.add_argument("--prompt", default=None, help="one-shot: answer this and exit")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=None, help="default: generation_config.json (0 = greedy)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--random-weights", action="store_true", help="official shape, random weights (no download)")
    return p.parse_args(argv)


def sampling_kwargs(args, generation_config: dict) -> dict:
    def pick(value, key, default):
        return value if value is not None else generation_config.get(key, default)

    sample = generation_config.get("do_sample", False)
    return dict(
        temperature=pick(args.temperature, "temperature", 0.0) if (sample or args.temperature is not None) else 0.0,
        top_p=pick(args.top_p, "top_p", 1.0),
        top_k=pick(args.top_k, "top_k", 0),
        repetition_penalty=pick(args.repetition_penalty, "repetition_penalty", 1.0),
        seed=args.seed,
    )


def reply(model, tok, messages, args, out=sys.stdout) -> str:
    ids = torch.tensor([tok.encode_chat(messages)])
    stream = tok.stream_decoder()
    kwargs = sampling_kwargs(args, model.generation_config)
    budget = min(args.max_new_tokens, model.config.max_position_embeddings - ids.shape[1])
    if budget < 1:
        raise Qwen2Error(f"the conversation ({ids.shape[1]} tokens) fills the context "
                         f"({model.config.max_position_embeddings}); start a new one")
    start = time.perf_counter()
    first = None
    text, n = [], 0
    for token in generate(model, ids, max_new_tokens=budget, stop_token_ids=tok.eos_token_ids, **kwargs):
        first = first or time.perf_counter()
        n += 1
        piece = stream.push(token)
        text.append(piece)
        out.write(piece)
        out.flush()
    tail = stream.flush()
    text.append(tail)
    end = time.perf_counter()
    ttft = (first or end) - start
    rate = (n - 1) / (end - first) if first and n > 1 and end > first else 0.0
    out.write(f"{tail}\n[{ids.shape[1]} prompt tokens, {n} new, first token {ttft * 1000:.0f} ms, "
              f"{rate:.1f} tok/s, {model.device} {str(model.dtype).removeprefix('torch.')}]\n")
    return "".join(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        try:
            on_cuda = str(args.device).startswith("cuda")
            model = load_model(args.model, device=args.device, dtype=args.dtype,
                               random_weights=args.random_weights, quantize=args.quantize,
                               cuda_graphs=on_cuda and args.fast_decode != "off",
                               compile=on_cuda and args.fast_decode == "compile")
            tok = load_tokenizer(args.model, model)
        except ModelNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if model.random_weights:
            print("note: random weights: replies are noise", file=sys.stderr)
        if getattr(model, "decode_fn", None) is not None:
            compiling = " (compiling first: about a minute)" if args.fast_decode == "compile" else ""
            print(f"capturing the decode step as a CUDA graph{compiling}...", file=sys.stderr, flush=True)
            warm_up(model)
        messages = [{"role": "system", "content": args.system}] if args.system else []
        if args.prompt is not None:
            reply(model, tok, messages + [{"role": "user", "content": args.prompt}], args)
            return 0
        print(f"Chatting with {args.model} on {model.device}. Empty line or Ctrl-D to quit.")
        while True:
            try:
                user = input("\n> ").strip()
            except EOFError:
                return 0
            if not user:
                return 0
            messages.append({"role": "user", "content": user})
            try:
                messages.append({"role": "assistant", "content": reply(model, tok, messages, args)})
            except Qwen2Error as exc:
                messages.pop()
                print(f"error: {exc}", file=sys.stderr)
    except Qwen2Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def load_tokenizer(source, model) -> Tokenizer:
    """The checkpoint's tokenizer; with random weights and no tokenizer files, the byte fallback."""
    try:
        return Tokenizer.from_pretrained(source)
    except (ModelNotFoundError, TokenizerError):
        if not model.random_weights:
            raise
        return Tokenizer.byte_fallback(model.config.vocab_size)


if __name__ == "__main__":
    sys.exit(main())
