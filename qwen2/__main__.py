"""Terminal chat: python -m qwen2 --model ID_OR_DIR [--device] [--dtype] [--prompt TEXT] [--tools FILE]
[--speculate auto|lookup|off] [--context N]

With --prompt: one reply, then exit. Without: a multi-turn chat (empty line or Ctrl-D quits).
After each reply: prompt tokens, time to first token and decode tokens/s. With --tools (a JSON list
of function specs), the template renders them; a reply's calls are printed as `[tool call] NAME
{ARGS}`, and a line starting with `tool:` answers them (a "tool" message).

On CPU (with --fast-decode auto or compile) the chat runs on the serving engine (qwen2/engine.py),
as the app does: its compiled steps, speculative decoding by prompt lookup (guesses verified only
where they pay; the reply is the same; a seeded sampled reply never speculates) and the
conversation's row kept between turns; --speculate lookup runs it anywhere (eagerly off the CPU).
Otherwise, or with --speculate off, it runs on ChatSession (qwen2/chat.py) and the single-stream
fast path (CUDA graphs on a GPU). Ctrl-C stops a reply and keeps the chat.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

from . import load_model
from .chat import ChatSession, EngineChat
from .engine import Engine, Limits
from .fast import make_fast_path, warm_up_or_off
from .errors import GenerationError, ModelNotFoundError, Qwen2Error, TokenizerError
from .generate import default_stop_ids
from .options import FAST_DECODE_MODES, QUANT_SCHEMES
from .sampling import SamplingSettings, check_seed
from .tokenizer import Tokenizer
from .tool_calls import parse_tool_calls, tool_names, validate_tools


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m qwen2", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Qwen/Qwen2-0.5B-Instruct", help="hub repo id or local directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: best for the device)")
    p.add_argument("--quantize", default=None, choices=QUANT_SCHEMES, help="weight-only quantized linear layers")
    p.add_argument("--fast-decode", default=os.environ.get("QWEN2_FAST_DECODE", "auto"),
                   choices=FAST_DECODE_MODES,
                   help="how decode steps run: CUDA graphs (graphs), a compiled step (compile: Inductor on "
                        "CPU, compiled + graphs on CUDA), the best for the device (auto, default) or plain (off); "
                        "also QWEN2_FAST_DECODE")
    p.add_argument("--prompt", default=None, help="one-shot: answer this and exit")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=None, help="default: generation_config.json (0 = greedy)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=seed_argument, default=None, help="an integer in [0, 2**63)")
    p.add_argument("--random-weights", action="store_true", help="official shape, random weights (no download)")
    p.add_argument("--speculate", default="auto", choices=("auto", "lookup", "off"),
                   help="speculative decoding on the serving engine (lookup: prompt-lookup guesses, verified in "
                        "one forward where they are likely to pay; the reply is the same, and the stats line "
                        "counts the guesses kept). auto (default): lookup where the engine's steps compile "
                        "(CPU), off elsewhere (a GPU's CUDA graphs decode one stream faster)")
    p.add_argument("--show-guesses", action="store_true",
                   help="on the engine: underline the reply's tokens that came from kept guesses (no decode "
                        "step of their own), with terminal escape codes")
    p.add_argument("--context", type=int, default=None, metavar="TOKENS",
                   help="on the engine: the tokens a conversation holds, prompts and replies (its KV-cache row, "
                        f"allocated whole; default: the model's context, at most {ENGINE_CONTEXT})")
    p.add_argument("--tools", default=None, metavar="FILE.json",
                   help="function calling: a JSON list of tool specs ({type: function, function: {name, ...}})")
    return p.parse_args(argv)


MIN_CONTEXT = 64  # the compiled steps' example shapes need a few dozen slots

# The engine's row is allocated whole: 8192 tokens (the app's default slot) is ~200 MB for the 0.5B
# model in float32; its whole 32768-token context would be four times that, for every chat.
ENGINE_CONTEXT = 8192


def seed_argument(text: str) -> int:
    try:
        return check_seed(int(text))
    except (ValueError, GenerationError) as exc:
        raise argparse.ArgumentTypeError(f"{text[:30]!r} is not an integer in [0, 2**63)") from exc


def sampling_kwargs(args, generation_config: dict) -> dict:
    """generate's sampling arguments: the checkpoint's generation_config.json, the flags over it."""
    settings = SamplingSettings.from_generation_config(
        generation_config, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty)
    return dict(dataclasses.asdict(settings), seed=args.seed)


def load_tools(path) -> list[dict] | None:
    """The tool specs in `path` (None without one), checked; TokenizerError naming the file otherwise."""
    if path is None:
        return None
    try:
        return validate_tools(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"--tools {path}: {exc}") from None


class GuessMarks:
    """--show-guesses: underlines each streamed piece whose token came from a kept guess. The engine
    records a token's index in `Reply.guessed` before streaming it, so it is known when the token
    arrives; the single-stream chat has no guesses, and nothing is marked."""

    UNDERLINE, PLAIN = "\x1b[4m", "\x1b[24m"

    def __init__(self, chat):
        self.chat, self.index, self.seen = chat, -1, 0

    def mark(self, piece: str) -> str:
        self.index += 1
        guessed = getattr(getattr(self.chat, "current", None), "guessed", ())
        while self.seen < len(guessed) and guessed[self.seen] < self.index:
            self.seen += 1
        if piece and self.seen < len(guessed) and guessed[self.seen] == self.index:
            return f"{self.UNDERLINE}{piece}{self.PLAIN}"
        return piece


def reply(chat: ChatSession, tok, messages, args, out=None, tools=None) -> dict:
    """Stream one reply to the conversation `messages` (to `out`, default: sys.stdout as it is at the
    call), then its statistics line; returns the assistant message (with its `tool_calls` when it
    made any)."""
    out = out or sys.stdout
    model = chat.model
    ids = tok.encode_chat(messages, tools=tools)
    budget = min(args.max_new_tokens, chat.limit - len(ids))
    if budget < 1:
        raise Qwen2Error(f"the conversation ({len(ids)} tokens) fills the context "
                         f"({chat.limit}, --context); start a new one")
    stream = tok.detokenizer()
    text = []
    kwargs = dict(max_new_tokens=budget, stop_token_ids=default_stop_ids(model, tok),
                  **sampling_kwargs(args, model.info.generation_config))
    guessed = GuessMarks(chat) if getattr(args, "show_guesses", False) else None
    for token in chat.reply(ids, **kwargs):
        piece = stream.push(token)
        text.append(piece)
        out.write(guessed.mark(piece) if guessed is not None else piece)
        out.flush()
    tail = stream.flush()
    text.append(tail)
    out.write(f"{tail}\n[{chat.stats.line()}]\n")
    content, calls = parse_tool_calls("".join(text), names=tool_names(tools))
    for call in calls:
        out.write(f"[tool call] {call.name} {json.dumps(call.arguments, ensure_ascii=False)}\n")
    message = {"role": "assistant", "content": content}
    return {**message, "tool_calls": [c.to_dict() for c in calls]} if calls else message


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        try:
            model = load_model(args.model, device=args.device, dtype=args.dtype,
                               random_weights=args.random_weights, quantize=args.quantize)
            tok = load_tokenizer(args.model, model)
        except ModelNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if model.info.random_weights:
            print("note: random weights: replies are noise", file=sys.stderr)
        tools = load_tools(args.tools)
        sampling_kwargs(args, model.info.generation_config)  # a bad flag is refused before minutes of compiling
        engine = make_engine(model, args) if on_engine(model, args) else None
        try:
            chat = EngineChat(engine) if engine is not None else ChatSession(
                model, max_len=context_tokens(model, args, model.config.max_position_embeddings),
                fast_path=warm_up(make_fast_path(model, args.fast_decode)))
            return converse(chat, tok, args, tools)
        finally:
            if engine is not None:
                engine.close()
    except Qwen2Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def on_engine(model, args) -> bool:
    """Whether the chat runs on the serving engine: --speculate lookup, or auto where its steps compile."""
    if args.speculate == "auto":
        return model.device.type == "cpu" and args.fast_decode in ("auto", "compile")
    return args.speculate == "lookup"


def context_tokens(model, args, default: int) -> int:
    """--context, checked against the model's context, or `default`."""
    most = model.config.max_position_embeddings
    context = default if args.context is None else args.context
    if not min(MIN_CONTEXT, most) <= context <= most:
        raise Qwen2Error(f"--context {context}: expected {min(MIN_CONTEXT, most)} to the model's context ({most} tokens)")
    return context


def make_engine(model, args) -> Engine:
    """A serving engine of one row for the terminal's one conversation, started, its steps compiled
    now with progress on stderr, not in the first reply (where compiling fails, it says so and
    decodes eagerly). The row is never given up while the chat lasts (the app's engine frees idle
    rows for other visitors; here there are none)."""
    context = context_tokens(model, args, min(model.config.max_position_embeddings, ENGINE_CONTEXT))
    fast_decode = args.fast_decode
    if model.device.type != "cpu" or fast_decode == "graphs":  # the engine compiles CPU steps only
        if fast_decode not in ("auto", "off"):
            print(f"note: --fast-decode {fast_decode}: the serving engine (--speculate {args.speculate}) compiles "
                  f"CPU steps only, and decodes eagerly here; --speculate off for the single-stream fast path",
                  file=sys.stderr)
        fast_decode = "off"
    engine = Engine(model, rows=1, row_tokens=context, fast_decode=fast_decode, speculate=True,
                    idle_release_s=float("inf"),
                    limits=Limits(prompt_tokens=context, new_tokens=context, wall_s=float("inf")))
    engine.compile_now(lambda fraction, message: print(message, file=sys.stderr, flush=True))
    return engine.start(compile_in_background=False)


def converse(chat, tok, args, tools) -> int:
    """One reply to --prompt, or the interactive chat until an empty line or end of input."""
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        reply(chat, tok, messages + [{"role": "user", "content": args.prompt}], args, tools=tools)
        return 0
    print(f"Chatting with {args.model} on {chat.model.device}. Empty line or Ctrl-D to quit.")
    while True:
        try:
            user = input("\n> ").strip()
        except EOFError:
            return 0
        if not user:
            return 0
        tool_result = user.startswith("tool:")
        messages.append({"role": "tool", "content": user[5:].strip()} if tool_result
                        else {"role": "user", "content": user})
        try:
            messages.append(reply(chat, tok, messages, args, tools=tools))
        except Qwen2Error as exc:
            messages.pop()
            print(f"error: {exc}", file=sys.stderr)
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat (twice quits)
            messages.pop()
            print("\n[stopped: the message and its partial reply are dropped]", file=sys.stderr)


def warm_up(fast_path):
    """Capture or compile the decode step now, with progress on stderr, not in the first reply;
    where that cannot work (no C++ compiler for Inductor, say) decode eagerly and say so. Returns
    the fast_path to use (None: eager)."""
    fast_path, exc = warm_up_or_off(fast_path, lambda fraction, message: print(message, file=sys.stderr, flush=True))
    if exc is not None:
        print(f"note: fast decode unavailable ({type(exc).__name__}: {str(exc)[:200]}); decoding eagerly",
              file=sys.stderr)
    return fast_path


def load_tokenizer(source, model) -> Tokenizer:
    """The checkpoint's tokenizer; with random weights and no tokenizer files, the byte fallback."""
    try:
        return Tokenizer.from_pretrained(source)
    except (ModelNotFoundError, TokenizerError):
        if not model.info.random_weights:
            raise
        return Tokenizer.byte_fallback(model.config.vocab_size)


if __name__ == "__main__":
    sys.exit(main())
