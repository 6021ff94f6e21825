"""Terminal chat: python -m qwen2 --model ID_OR_DIR [--device] [--dtype] [--prompt TEXT] [--tools FILE]
[--speculate lookup]

With --prompt: one reply, then exit. Without: a multi-turn chat (empty line or Ctrl-D quits).
After each reply: prompt tokens, time to first token and decode tokens/s. With --tools (a JSON list
of function specs), the template renders them; a reply's calls are printed as `[tool call] NAME
{ARGS}`, and a line starting with `tool:` answers them (a "tool" message).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import load_model
from .chat import ChatSession
from .fast import make_fast_path, warm_up_or_off
from .errors import GenerationError, ModelNotFoundError, Qwen2Error, TokenizerError
from .generate import default_stop_ids
from .options import FAST_DECODE_MODES, QUANT_SCHEMES, dtype_name
from .sampling import SamplingSettings, check_seed
from .speculative import PromptLookupDrafter, speculative_generate
from .stats import ReplyStats
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
    p.add_argument("--speculate", default="off", choices=("off", "lookup"),
                   help="speculative decoding (lookup: prompt-lookup drafts, verified in one forward when "
                        "they are likely to pay; the reply is the same, drafted/accepted counts join the stats "
                        "line). Decodes eagerly, "
                        "and prefills the whole conversation each turn. Default: off")
    p.add_argument("--tools", default=None, metavar="FILE.json",
                   help="function calling: a JSON list of tool specs ({type: function, function: {name, ...}})")
    return p.parse_args(argv)


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
                         f"({chat.limit}); start a new one")
    stream = tok.detokenizer()
    text = []
    kwargs = dict(max_new_tokens=budget, stop_token_ids=default_stop_ids(model, tok),
                  **sampling_kwargs(args, model.info.generation_config))
    speculation = None
    if getattr(args, "speculate", "off") == "lookup":
        speculation = speculative_generate(model, torch.tensor([ids]), PromptLookupDrafter(), **kwargs)
        tokens = timed_reply(chat, len(ids), budget, speculation)
    else:
        tokens = chat.reply(ids, **kwargs)
    for token in tokens:
        piece = stream.push(token)
        text.append(piece)
        out.write(piece)
        out.flush()
    tail = stream.flush()
    text.append(tail)
    line = chat.stats.line() + (f" · {speculation.stats.line()}" if speculation is not None else "")
    out.write(f"{tail}\n[{line}]\n")
    content, calls = parse_tool_calls("".join(text), names=tool_names(tools))
    for call in calls:
        out.write(f"[tool call] {call.name} {json.dumps(call.arguments, ensure_ascii=False)}\n")
    message = {"role": "assistant", "content": content}
    return {**message, "tool_calls": [c.to_dict() for c in calls]} if calls else message


def timed_reply(chat: ChatSession, prompt_tokens: int, budget: int, tokens):
    """Stream `tokens` (a reply made outside the chat's cache: --speculate), filling chat.stats as
    ChatSession.reply does. The chat's kept cache is dropped: the next turn prefills from scratch."""
    chat.reset()
    chat.stats = stats = ReplyStats(prompt_tokens=prompt_tokens, device=str(chat.model.device),
                                    dtype=dtype_name(chat.model.dtype), stopped=True,
                                    context_used=prompt_tokens, context_limit=chat.limit)
    started, first, count = time.perf_counter(), None, 0
    for token in tokens:
        now = time.perf_counter()
        first = first or now
        count += 1
        stats.new_tokens, stats.context_used = count, prompt_tokens + count
        stats.ttft_s, stats.decode_s = first - started, now - first
        yield token
    stats.stopped = False
    stats.end = "length" if count >= budget else "stop"
    stats.ttft_s = stats.ttft_s if first else time.perf_counter() - started


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        try:
            model = load_model(args.model, device=args.device, dtype=args.dtype,
                               random_weights=args.random_weights, quantize=args.quantize)
            # speculation runs eagerly (DecodeSession.extend): no decode step to compile or capture
            fast_path = None if args.speculate != "off" else make_fast_path(model, args.fast_decode)
            tok = load_tokenizer(args.model, model)
        except ModelNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if model.info.random_weights:
            print("note: random weights: replies are noise", file=sys.stderr)
        tools = load_tools(args.tools)
        chat = ChatSession(model, fast_path=warm_up(fast_path))
        messages = [{"role": "system", "content": args.system}] if args.system else []
        if args.prompt is not None:
            reply(chat, tok, messages + [{"role": "user", "content": args.prompt}], args, tools=tools)
            return 0
        print(f"Chatting with {args.model} on {model.device}. Empty line or Ctrl-D to quit.")
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
    except Qwen2Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


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
