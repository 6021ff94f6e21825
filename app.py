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
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections import OrderedDict  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import profiling  # noqa: E402
import profiling.charts  # noqa: E402
import profiling.inside  # noqa: E402
import profiling.inside_charts  # noqa: E402
import profiling.report  # noqa: E402
import profiling.trace  # noqa: E402
import qwen2  # noqa: E402
from profiling.errors import RunFileError  # noqa: E402
from profiling.runfile import run_label, shipped_runs, shipped_serving_runs, trace_file  # noqa: E402
from qwen2 import options  # noqa: E402
from qwen2.chat import message_text  # noqa: E402
from qwen2.engine import Conversation, Engine, Limits, Reply  # noqa: E402
from qwen2.errors import ConfigError, ModelNotFoundError, Qwen2Error, TokenizerError  # noqa: E402
from qwen2.generate import default_stop_ids  # noqa: E402
from qwen2.sampling import SamplingSettings, check_seed  # noqa: E402
from studio.runs import MAX_RUN_BYTES, TRACES, RunStore  # noqa: E402
from studio.text import hide_paths, plain  # noqa: E402

DEFAULT_MODEL = "Qwen/Qwen2-0.5B-Instruct"
DEFAULT_COMPILE_CACHE = Path("~/.cache/qwen2-studio/inductor")
RANDOM_NOTICE = "random weights: replies are noise; the profiling figures are real"
RANDOM_MAX_NEW_TOKENS = 48  # the default reply length with random weights: noise, so keep it short
REAL_WEIGHTS_HOWTO = (
    "To chat with real weights, start the app with `python app.py --model DIR_OR_ID` (a checkpoint "
    "directory, or a hub id such as `Qwen/Qwen2-0.5B-Instruct`) on a machine that can download it, "
    "or put it in the Hugging Face cache first (`huggingface-cli download Qwen/Qwen2-0.5B-Instruct`; "
    "`HF_HOME` / `HF_HUB_CACHE` say where the cache is). With `HF_HUB_OFFLINE=1` only the cache is read.")
# Qwen2-Instruct's generation_config.json, for checkpoints that ship none.
SAMPLING_DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
COMPUTE_QUEUE = "compute"  # the concurrency group of the events that hold the model alone (profile, Inside)
CHAT_QUEUE = "chat"  # chat replies: they decode together in the engine, so many run at once
CHAT_CONCURRENCY = 16  # replies in flight at once (the engine's rows, and a queue behind them)
CHARS_PER_TOKEN_BOUND = 8  # no real text averages more characters a token (code indentation: about 4)
EMPTY_HINT = "Type a message first: the message box is empty."
# The page gets at most 20 updates a second: each update re-renders the reply in the browser, so one per
# token only loads the page (and its Stop click) at a few hundred tokens per second.
STREAM_INTERVAL_S = 0.05
STATS_TITLE = "📊 "  # per-reply statistics are "thought" messages whose title starts with this
EXAMPLES = [
    "Explain what a KV cache is, in three sentences.",
    "用三句话介绍一下长城。",
    "Write a Python function that checks whether a string is a palindrome, with a test.",
]
CSS = """
#notice { border-left: 4px solid #f59e0b; padding: 0.25rem 0.75rem; background: #f59e0b14; }
#busy-note:not(:empty) { border-left: 4px solid #3b82f6; padding: 0 0.75rem; }
#kpi-table, #trace-ops { overflow-x: auto; }
@media (max-width: 720px) { .gradio-container { padding: 0 4px !important; } }
"""


def on_gpu(fn):
    """Run `fn` under spaces.GPU on ZeroGPU hardware; leave it unchanged everywhere else."""
    return spaces.GPU(duration=120)(fn) if spaces is not None else fn


def device_choices() -> list[tuple[str, str]]:
    """(label, value) for each device this machine has: CPU, every CUDA device, MPS."""
    choices = [("CPU", "cpu")]
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        try:
            choices.append((f"CUDA {i}: {torch.cuda.get_device_name(i)}", f"cuda:{i}"))
        except RuntimeError:  # e.g. ZeroGPU before a GPU is attached
            choices.append((f"CUDA {i}", f"cuda:{i}"))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        choices.append(("MPS", "mps"))
    return choices


class Busy:
    """The model held alone (a profile, the Inside view: their hooks must see no one else's forward)
    and what holds it, in words, for the "busy" note. Chat replies decode together in the engine."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.what: str | None = None
        self.lock = threading.Lock()  # one holder at a time (a profile, an Inside step)

    @contextlib.contextmanager
    def hold(self, what: str):
        """Wait for the engine's live replies to end, then hold the model; new replies wait meanwhile."""
        with self.lock, self.engine.exclusive():
            self.what = what
            try:
                yield
            finally:
                self.what = None

    def note(self) -> str:
        if self.what:
            return f"⏳ Busy: {self.what}. Your request waits in line and starts as soon as it is done."
        load = self.engine.load
        if load["live"] >= load["rows"]:
            return (f"⏳ {load['live']} replies are being written and {load['waiting']} wait; yours starts "
                    "as soon as one ends.")
        return ""


# ---------------------------------------------------------------------------------------------
# The loaded model


class LoadedModel:
    """The chat model and its tokenizer (loaded once), plus models loaded for profiling others."""

    def __init__(self, source: str, device: str | None, dtype: str | None, quantize: str | None,
                 fallback_config: str | None = None, fast_decode: str | None = None, slots: int = 4,
                 slot_tokens: int = 8192, limits: Limits | None = None, compile_mode: str | None = None):
        self.source, self.quantize = source, options.check_quantize(quantize)
        device = options.resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.shape_source = self._load(device, dtype, fallback_config)
        self.tokenizer_problem = None  # why the byte-level fallback tokenizer is used, when it is
        try:
            self.tokenizer = qwen2.Tokenizer.from_pretrained(source)
        except (ModelNotFoundError, TokenizerError) as exc:
            print(f"[qwen2-studio] {exc}\n[qwen2-studio] using the byte-level fallback tokenizer", flush=True)
            self.tokenizer = qwen2.Tokenizer.byte_fallback(self.model.config.vocab_size)
            self.tokenizer_problem = exc
        self.stop_ids = default_stop_ids(self.model, self.tokenizer)
        self._extra: dict = {}
        # The compiled CPU decode step by default (about twice the eager speed, docs/benchmarks.md),
        # compiled in the background while the engine serves eagerly. ZeroGPU attaches a GPU per call.
        if fast_decode is None:
            fast_decode = "off" if spaces else "auto"
        limits = limits or Limits()
        self.engine = Engine(self.model, rows=slots, row_tokens=slot_tokens, fast_decode=fast_decode,
                             limits=dataclasses.replace(limits, prompt_tokens=min(limits.prompt_tokens, slot_tokens)),
                             compile_mode=compile_mode)

    def start(self) -> LoadedModel:
        """Start serving; the decode step compiles beside the replies, its progress printed."""
        self.engine.start(progress=lambda fraction, message: print(
            f"[qwen2-studio] {fraction:4.0%} {message}", flush=True))
        return self

    def _load(self, device, dtype, fallback_config):
        """(model, the source of its shape): the checkpoint, else random weights of its shape."""
        print(f"[qwen2-studio] loading {self.source} on {device} (a first download shows its progress "
              "here)", flush=True)
        kwargs = dict(device=device, dtype=dtype, quantize=self.quantize)
        try:
            return qwen2.load_model(self.source, **kwargs), self.source
        except ModelNotFoundError as exc:
            print(f"[qwen2-studio] {exc}\n[qwen2-studio] starting with RANDOM WEIGHTS instead", flush=True)
        for shape_source in (fallback_config or self.source, DEFAULT_MODEL):
            try:
                return qwen2.load_model(shape_source, random_weights=True, **kwargs), shape_source
            except ConfigError:  # a hub id with no built-in shape: use the default model's
                continue
        raise ConfigError(f"no model shape for {self.source}")

    @property
    def device(self) -> str:
        return str(self.model.device)

    @property
    def dtype(self) -> str:
        return options.dtype_name(self.model.dtype)

    @property
    def context(self) -> int:
        """A conversation's context: the engine's row (prompt + reply)."""
        return self.engine.row_tokens

    @property
    def random_weights(self) -> bool:
        return self.model.info.random_weights

    def notice(self) -> str:
        if self.random_weights:
            return (f"⚠ **{RANDOM_NOTICE}.** `{self.source}` could be neither downloaded nor found in "
                    f"the local cache, so the model has the same shape with random weights"
                    + (" and a byte-level fallback tokenizer" if self.tokenizer.is_fallback else "")
                    + f"; replies stop after {RANDOM_MAX_NEW_TOKENS} new tokens by default.  \n"
                    + REAL_WEIGHTS_HOWTO)
        if isinstance(self.tokenizer_problem, TokenizerError):
            return (f"⚠ **The checkpoint's tokenizer could not be loaded**, so a byte-level fallback tokenizer "
                    f"is used and replies will not read as text: {plain(hide_paths(str(self.tokenizer_problem)))}")
        if self.tokenizer.is_fallback:
            return "⚠ No tokenizer files were found: a byte-level fallback tokenizer is used."
        return ""

    def summary(self) -> str:
        cfg = self.model.config
        params = sum(p.numel() for p in self.model.parameters())
        return (f"**Model** `{self.source}` · {params / 1e6:,.1f} M parameters · {cfg.num_hidden_layers} "
                f"layers · context {cfg.max_position_embeddings:,} · **device** {self.device} · {self.dtype}"
                + (f" · {self.quantize}" if self.quantize else ""))

    def serving(self) -> str:
        """The engine's state for the page header: decode path, rows, live replies."""
        engine, load = self.engine, self.engine.load
        return (f"**Serving** {load['rows']} conversations at once, {engine.row_tokens:,} tokens each · "
                f"decode: {engine.state} · {load['live']} replying, {load['waiting']} waiting")

    def text_of(self, token_ids) -> str:
        """The text of a reply's token ids, as the stream shows it."""
        decoder = self.tokenizer.stream_decoder()
        return "".join(self.token_text(decoder, t) for t in token_ids) + decoder.flush()

    def sampling_defaults(self) -> dict:
        gen = self.model.info.generation_config
        return {**SAMPLING_DEFAULTS, **{k: v for k, v in gen.items() if k in SAMPLING_DEFAULTS and v is not None}}

    def token_text(self, decoder, token_id: int) -> str:
        """Streamed text of one token; ids with no text of their own (random weights) show as ⟨id⟩."""
        tok = self.tokenizer
        if token_id >= tok.vocab_size or (tok.is_fallback and token_id >= 256
                                          and token_id not in tok.special_token_ids):
            return decoder.flush() + f"⟨{token_id}⟩"
        return decoder.push(token_id)

    def model_for(self, device: str, dtype: str | None):
        """The chat model when device and dtype match it, else a copy loaded for profiling (one kept)."""
        device = options.resolve_device(device)
        dtype = None if dtype in (None, "", "auto") else options.parse_dtype(dtype)
        here = self.model.device
        if (device.type, device.index or 0) == (here.type, here.index or 0) and dtype in (None, self.model.dtype):
            return self.model
        key = (str(device), dtype)
        if key not in self._extra:
            self._extra.clear()
            self._extra[key] = qwen2.load_model(self.shape_source, device=device, dtype=dtype,
                                                random_weights=self.random_weights, quantize=self.quantize)
        return self._extra[key]


# ---------------------------------------------------------------------------------------------
# Chat


class ChatError(Exception):
    """A reply that could not be made, with a message for the user (server paths cut to file names)."""

    def __init__(self, message: str):
        super().__init__(hide_paths(message))


def is_stats_message(item) -> bool:
    metadata = item.get("metadata") if isinstance(item, dict) else getattr(item, "metadata", None)
    return str((metadata or {}).get("title") or "").startswith(STATS_TITLE)


def history_messages(history) -> list[dict]:
    """Gradio's history as [{"role", "content": str}], skipping empty messages, non-text parts and
    the per-reply statistics."""
    messages = []
    for item in history or []:
        if isinstance(item, (list, tuple)) and len(item) == 2:  # [user, assistant] pairs
            pairs = [("user", item[0]), ("assistant", item[1])]
        elif isinstance(item, dict):
            pairs = [] if is_stats_message(item) else [(item.get("role"), item.get("content"))]
        else:
            pairs = [(getattr(item, "role", None), getattr(item, "content", None))]
        for role, content in pairs:
            text = message_text(content)
            if role in ("user", "assistant") and text.strip():
                messages.append({"role": role, "content": text})
    return messages


def fit_context(tokenizer, context: int, system: str, turns: list[dict], text: str, max_new: int):
    """Prompt ids for the chat, dropping the oldest turns (a user message and what followed it) until
    the prompt leaves room for a reply.

    Returns (ids, turns dropped, max new tokens that fit). Text far longer than the context can hold
    (CHARS_PER_TOKEN_BOUND characters a token) is refused, or dropped, before it is tokenized, and the
    turns to keep are found by bisection: a visitor's megabyte, or a thousand-turn history sent to the
    API, must not cost everyone seconds of tokenizing."""
    reserve = max(1, min(int(max_new), context // 2))
    most = CHARS_PER_TOKEN_BOUND * context
    for name, value in (("message", text), ("system prompt", system)):
        if len(value) > most:
            raise ChatError(f"This {name} is {len(value):,} characters, far more than the model's context of "
                            f"{context:,} tokens can hold: please shorten it.")
    head = [{"role": "system", "content": system}] if system and system.strip() else []
    # Where the kept history may begin: the start, each later user message, or nothing kept.
    starts = [0] + [i for i, t in enumerate(turns) if i > 0 and t["role"] == "user"] + [len(turns)]
    chars_after = [0] * (len(turns) + 1)
    for i in range(len(turns) - 1, -1, -1):
        chars_after[i] = chars_after[i + 1] + len(turns[i]["content"])

    def encode(k: int) -> list[int]:
        return tokenizer.encode_chat(head + turns[starts[k]:] + [{"role": "user", "content": text}],
                                     add_generation_prompt=True)

    lo = next(k for k, start in enumerate(starts) if len(text) + len(system) + chars_after[start] <= most)
    hi = len(starts) - 1  # keeping nothing always "fits" as far as history goes
    fitted = {}
    while lo < hi:  # the fewest dropped turns whose prompt leaves room for the reply
        mid = (lo + hi) // 2
        fitted[mid] = encode(mid)
        if len(fitted[mid]) + reserve <= context:
            hi = mid
        else:
            lo = mid + 1
    ids = fitted.get(lo) or encode(lo)
    if len(ids) >= context:
        raise ChatError(f"This message is {len(ids)} tokens with the system prompt, but the model's "
                        f"context is {context} tokens: please shorten it.")
    return ids, lo, min(int(max_new), context - len(ids))


def sampling_settings(temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed) -> dict:
    """{"sampling": SamplingSettings, "seed": int or None}, checked now (ChatError with a readable message)."""
    try:
        sampling = SamplingSettings(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                                    repetition_penalty=float(repetition_penalty))
        if int(max_new_tokens) < 1:
            raise ValueError(f"max new tokens must be at least 1, not {max_new_tokens}")
        seed = None if seed is None or int(seed) < 0 else check_seed(int(seed))  # negative: a random seed
    except (TypeError, ValueError, OverflowError, Qwen2Error) as exc:
        raise ChatError(f"Invalid setting: {exc}") from None
    return {"sampling": sampling, "seed": seed}


def context_meter(used: int, limit: int) -> str:
    filled = round(10 * used / max(limit, 1))
    return f"context {'▰' * filled}{'▱' * (10 - filled)} {used:,} / {limit:,} tokens ({used / max(limit, 1):.1%})"


class Conversations:
    """One engine conversation (its row of the KV cache) per browser or API session, the latest few
    kept; and the reply each is being written."""

    def __init__(self, lm: LoadedModel, keep: int = 16):
        self.lm, self.keep = lm, keep
        self.sessions: OrderedDict[str, Conversation] = OrderedDict()
        self.replies: dict[str, Reply] = {}  # each session's latest reply
        self.stopped: dict[str, Reply] = {}  # the reply each session's last Stop reported
        self.lock = threading.Lock()

    def get(self, key: str) -> Conversation:
        with self.lock:
            if key not in self.sessions:
                self.sessions[key] = self.lm.engine.conversation()
                # the oldest idle conversations give their rows back; one still replying is kept
                idle = [k for k, c in self.sessions.items() if c.active is None and k != key]
                for old in idle[:max(0, len(self.sessions) - self.keep)]:
                    self._forget(old).close()
            self.sessions.move_to_end(key)
            return self.sessions[key]

    def _forget(self, key: str) -> Conversation | None:
        self.replies.pop(key, None)
        self.stopped.pop(key, None)
        return self.sessions.pop(key, None)

    def stats(self, key: str):
        reply = self.replies.get(key)
        return reply.stats if reply is not None else None

    def drop(self, key: str):
        with self.lock:
            conversation = self._forget(key)
        if conversation is not None:
            conversation.close()


class Chat:
    """The reply stream shared by the page and the `/chat` API; yields (reply so far, stats so far)."""

    def __init__(self, lm: LoadedModel, busy: Busy):
        self.lm, self.busy = lm, busy
        self.conversations = Conversations(lm)

    def stream(self, key: str, text: str, history, system: str, settings: dict, max_new_tokens: int):
        lm = self.lm
        try:
            ids, dropped, max_new = fit_context(lm.tokenizer, lm.context, system or "", history_messages(history),
                                                text, int(max_new_tokens))
        except TokenizerError as exc:  # the checkpoint's chat template failed or hit its limits
            raise ChatError(str(exc)) from None
        notes = []
        if dropped:
            notes.append(f"⚠ trimmed: the {dropped} oldest turn(s) did not fit the {lm.context}-token context")
        if max_new < int(max_new_tokens):
            notes.append(f"⚠ max new tokens lowered to {max_new} to fit the context")
        conversation = self.conversations.get(key)
        try:
            reply = lm.engine.submit(ids, settings["sampling"], max_new, lm.stop_ids, settings["seed"],
                                     conversation=conversation)
        except (ValueError, TypeError, Qwen2Error) as exc:
            raise ChatError(str(exc)) from None
        self.conversations.replies[key] = reply
        decoder, text, count = lm.tokenizer.stream_decoder(), "", 0
        try:
            sent = -STREAM_INTERVAL_S  # the first token shows at once
            for count, token_id in enumerate(reply, 1):
                text += lm.token_text(decoder, token_id)
                if time.monotonic() - sent >= STREAM_INTERVAL_S:
                    sent = time.monotonic()
                    yield text, f"generating… {count} new tokens"
            text += decoder.flush()
        except Qwen2Error as exc:
            raise ChatError(str(exc)) from None
        except Exception as exc:
            raise ChatError(f"{type(exc).__name__}: {exc}") from None
        finally:
            reply.cancel()  # a no-op once it ended; Stop closes this generator at its yield
        yield text, self.stats_text(reply.stats, notes)

    def stats_text(self, stats, notes=()) -> str:
        if stats is None:
            return ""
        return "  \n".join([f"**Stats:** {stats.line()}", context_meter(stats.context_used, stats.context_limit),
                            *notes])

    def stop(self, key: str):
        """Stop the session's reply after the step in flight; returns (its text, its statistics), which
        describe the same tokens, or (None, None) when no reply is being written or it has no token yet."""
        reply = self.conversations.replies.get(key)
        if reply is None or self.conversations.stopped.get(key) is reply:
            return None, None
        reply.cancel()
        reply.wait(timeout=30)
        if reply.reason != "cancelled" or not reply.tokens:
            return None, None
        self.conversations.stopped[key] = reply
        return self.lm.text_of(reply.tokens), reply.stats


def stats_message(stats) -> dict:
    return {"role": "assistant", "content": context_meter(stats.context_used, stats.context_limit),
            "metadata": {"title": STATS_TITLE + stats.line(), "status": "done"}}


def box_ready(**value):
    """The message box usable again. A reply sets it itself as it ends (not a later event, which could
    land after the next message has started and hide its Stop button)."""
    return gr.update(interactive=True, submit_btn=True, stop_btn=False, **value)


def make_chat_events(chat: Chat):
    """The page's chat events: start (instant), respond (streams, queued), stop; and the API's."""

    def start(message, chatbot, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed):
        """Check the message and settings before the box is cleared; returns
        (textbox, chatbot, stats, pending message or None)."""
        text = message_text(message)
        try:
            if not text.strip():
                raise ChatError(EMPTY_HINT)
            sampling_settings(temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed)
        except ChatError as exc:
            gr.Warning(str(exc))
            return gr.update(), gr.skip(), f"⚠ {exc}", None
        chatbot = [*(chatbot or []), {"role": "user", "content": text}]
        waiting = chat.busy.note() or "waiting for the model…"
        return gr.update(value="", interactive=False, submit_btn=False, stop_btn=True), chatbot, waiting, text

    def respond(pending, chatbot, system_prompt, temperature, top_p, top_k, repetition_penalty,
                max_new_tokens, seed, request: gr.Request):
        """Stream the reply to `pending` (the message `start` moved into the chat); on any error, put
        the message back in the box and the chat back as it was, and say what went wrong."""
        if pending is None:
            yield gr.skip(), gr.skip(), gr.skip()
            return
        before = (chatbot or [])[:-1]
        try:
            settings = sampling_settings(temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed)
            for reply, stats in chat.stream(request.session_hash, pending, before, system_prompt, settings,
                                            max_new_tokens):
                yield [*chatbot, {"role": "assistant", "content": reply}], stats, gr.skip()
        except ChatError as exc:
            gr.Warning(f"Could not reply: {exc}")
            yield before, f"⚠ Could not reply: {exc}", box_ready(value=pending)
            return
        except Exception as exc:  # never leave the page stuck: report, restore
            traceback.print_exc()
            gr.Warning(f"Could not reply: {type(exc).__name__}: {exc}")
            yield before, f"⚠ Could not reply: {type(exc).__name__}: {exc}", box_ready(value=pending)
            return
        stats = chat.conversations.stats(request.session_hash)
        if stats is None:  # the conversation was cleared while the reply ended
            yield [*chatbot, {"role": "assistant", "content": reply}], gr.skip(), box_ready()
            return
        yield [*chatbot, {"role": "assistant", "content": reply}, stats_message(stats)], gr.skip(), box_ready()

    def stop(chatbot, request: gr.Request):
        """After Stop: the reply as far as it was generated stays (the page may be an update behind),
        with its statistics under it."""
        text, stats = chat.stop(request.session_hash)
        chatbot = list(chatbot or [])
        if stats is None or not chatbot or is_stats_message(chatbot[-1]):
            return chatbot, gr.skip()  # no reply yet, or it had ended and shows its statistics already
        if chatbot[-1].get("role") == "assistant":
            chatbot = chatbot[:-1]
        return [*chatbot, {"role": "assistant", "content": text}, stats_message(stats)], chat.stats_text(stats)

    def clear(request: gr.Request):
        chat.conversations.drop(request.session_hash)
        return ""

    def api(message, system_prompt, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed,
            history, request: gr.Request):
        """Stream a reply to `message` in this session's conversation; yields (reply so far, stats)."""
        text = message_text(message)
        try:
            if not text.strip():
                raise ChatError(EMPTY_HINT)
            settings = sampling_settings(temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed)
            for reply, stats in chat.stream(request.session_hash, text, history, system_prompt, settings,
                                            max_new_tokens):
                turn = [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
                yield reply, stats, [*(history or []), *turn]  # a cancelled reply stays in the history
        except ChatError as exc:
            raise gr.Error(str(exc)) from None

    return start, respond, stop, clear, api


# ---------------------------------------------------------------------------------------------
# Dashboard


class ProfileCancelled(Exception):
    """The visitor cancelled the profile: it stops at its next step."""


class Dashboard:
    """Profiling runs, saved runs (this machine's and the shipped reference runs) and their views."""

    def __init__(self, lm: LoadedModel, runs: RunStore, busy: Busy):
        self.lm, self.runs, self.busy = lm, runs, busy

    # -- views -------------------------------------------------------------------------------
    def views(self, runs: list[dict], theme: str, paths=None) -> list:
        """[KPI table, layer, memory, throughput, sweep figures, baseline note, top ops, timeline]."""
        charts, theme = profiling.charts, "dark" if theme == "dark" else "light"

        def draw(fn, **kwargs):
            try:
                return fn(runs, theme=theme, **kwargs)
            except Exception:  # one broken figure must not hide the others
                traceback.print_exc()
                return None

        columns, rows = charts.headline_rows(runs)
        has_sweep = any(run.get("sweep") for run in runs)
        return [pd.DataFrame(rows, columns=columns),
                draw(charts.layer_latency_figure, phase="decode"), draw(charts.memory_figure),
                draw(charts.throughput_figure), draw(charts.sweep_figure) if has_sweep else None,
                baseline_note(runs), *self.trace_views(runs, paths or [None] * len(runs), theme)]

    @staticmethod
    def trace_views(runs, paths, theme) -> list:
        """The first traced run's top operations and timeline (None, None when no run has a trace)."""
        for run, path in zip(runs, paths):
            trace = trace_file(run, path)
            if trace is None:
                continue
            try:
                ops = pd.DataFrame(profiling.trace.top_ops(trace, n=15)).round(
                    {"total_ms": 3, "mean_ms": 4, "percent": 1})
                return [ops, profiling.charts.trace_timeline(trace, theme=theme)]
            except Exception:
                traceback.print_exc()
        return [None, None]

    # -- events ------------------------------------------------------------------------------
    def profile(self, devices=None, dtype="auto", prompt_tokens=64, new_tokens=16, baseline=False,
                sweep=False, trace=False, theme="light", progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
        """Profile the model on each device, on a thread of its own; yields the status while it runs,
        then the views, the runs' JSON, files and a summary. Closing this generator (the page's or the
        API's cancel) stops the profile at its next step, and nothing of it is saved."""
        devices = [devices] if isinstance(devices, str) else list(devices or [self.lm.device])
        devices = list(dict.fromkeys(str(d) for d in devices))  # the same device twice is one run
        known = [value for _, value in device_choices()]
        unknown = [d for d in devices if d not in known and d != self.lm.device]
        if unknown:
            raise gr.Error(f"Unknown device {plain(unknown[0])[:40]}: this machine has {', '.join(known)}.")
        if baseline and not BASELINE_AVAILABLE:
            raise gr.Error(BASELINE_MISSING)
        cancelled, now = threading.Event(), {"fraction": 0.0, "desc": "waiting for the live replies to end"}
        outcome: dict = {}

        def report(fraction, desc):
            if cancelled.is_set():
                raise ProfileCancelled
            now.update(fraction=fraction, desc=desc)

        def work():
            try:
                outcome["value"] = self._profile(devices, dtype, int(prompt_tokens), int(new_tokens), baseline,
                                                 sweep, trace, theme, report)
            except ProfileCancelled:
                print("[qwen2-studio] profile cancelled: stopped, nothing saved", flush=True)
            except BaseException as exc:  # noqa: BLE001 - raised again on the event's thread below
                outcome["error"] = exc

        worker = threading.Thread(target=work, name="qwen2-profile", daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                worker.join(0.25)
                progress(now["fraction"], desc=now["desc"])
                yield [gr.skip()] * (len(VIEW_SLOTS) + 2) + [f"⏳ Profiling: {now['desc']}", gr.skip()]
        finally:
            cancelled.set()  # a no-op once the profile ended
        if "error" in outcome:
            raise outcome["error"]
        yield outcome["value"]

    def _profile(self, devices, dtype, prompt_tokens, new_tokens, baseline, sweep, trace, theme, report_to):
        stamp = self.runs.new_stamp()
        runs = []
        trace_dir = self.runs.folder / TRACES / stamp if trace else None
        with self.busy.hold("a profile is running"):
            report_to(0.0, "the model is free: profiling")  # a profile cancelled while it waited stops here
            for i, device in enumerate(devices):
                def report(fraction, desc="", i=i, device=device):
                    report_to((i + float(fraction)) / len(devices), f"{device}: {desc}")
                try:
                    model = self.lm.model_for(device, dtype)
                    runs.append(profiling.profile_model(
                        model, prompt_tokens=prompt_tokens, new_tokens=new_tokens, warmup=1,
                        baseline="transformers" if baseline else None,
                        sweep=sweep_lengths(model, new_tokens) if sweep else None,
                        trace_dir=str(trace_dir) if trace_dir else None, progress=report))
                except ProfileCancelled:
                    raise
                except Exception as exc:  # bad settings, a missing device, OOM: say so and keep serving
                    traceback.print_exc()
                    raise gr.Error(f"Profiling on {device} failed: {hide_paths(str(exc))}") from None
        files = self.runs.save_profile(runs, devices, stamp)
        traces = [str(t) for t in (trace_file(run, path) for run, path in zip(runs, files)) if t]
        report_path = self.runs.folder / f"{stamp}-report.html"
        profiling.report.write_report(runs, report_path)
        status = f"Saved {', '.join(f'`{f.name}`' for f in files)} in the runs folder."
        if traces:
            status += ("  \nThe trace's top operations and timeline are below; the trace file is in the "
                       "downloads (open it at https://ui.perfetto.dev or chrome://tracing).")
        return [*self.views(runs, theme, files), runs, [str(f) for f in files] + [str(report_path)] + traces,
                status, gr.update(choices=self.runs.choices())]

    def compare(self, selected=None, uploaded=None, theme="light"):
        """Load saved runs and uploaded run files (validated, then kept in the runs folder) and compare
        them; the comparison's HTML report is written once per set of runs."""
        try:
            paths = [self.runs.path_of(value) for value in (selected or [])]
            for upload in uploaded or []:
                src = Path(upload if isinstance(upload, str) else upload.name)
                paths.append(self.runs.add_upload(src, getattr(upload, "orig_name", None)))
            runs = self.runs.load(paths)
        except RunFileError as exc:
            raise gr.Error(f"This is not a run file the app can show: {exc}") from None
        if not runs:
            raise gr.Error("Choose saved runs, or upload run files (.json), to compare.")
        report_path = self.runs.report(runs, profiling.report.write_report)
        status = "Comparing " + "; ".join(f"**{plain(run_label(r))}** (`{plain(p.name)}`)"
                                          for r, p in zip(runs, paths)) + "."
        return [*self.views(runs, theme, paths), runs, [str(report_path)], status,
                gr.update(choices=self.runs.choices(), value=[self.runs.value_of(p) for p in paths])]

    def on_page_load(self, theme="light"):
        """The run list, with the shipped reference runs selected and shown (CPU vs GPU at first sight)."""
        shipped = shipped_runs()
        choices = gr.update(choices=self.runs.choices(), value=self.runs.shipped_values())
        if not shipped:
            return [gr.skip()] * len(VIEW_SLOTS) + [gr.skip(), choices]
        try:
            runs = self.runs.load(shipped)
        except RunFileError as exc:  # a broken checkout: say so, keep the rest of the page
            return [gr.skip()] * len(VIEW_SLOTS) + [f"The shipped reference runs cannot be shown: {plain(str(exc))}",
                                                    choices]
        status = ("Showing the reference runs shipped with the app: "
                  + "; ".join(f"**{plain(run_label(r))}**" for r in runs) + ". Run a profile to add this machine's.")
        return [*self.views(runs, theme, shipped), status, choices]


VIEW_SLOTS = ("kpi", "layers", "memory", "throughput", "sweep", "baseline_note", "trace_ops", "timeline")
BASELINE_AVAILABLE = importlib.util.find_spec("transformers") is not None
BASELINE_MISSING = ("The transformers baseline needs the transformers package, which is not installed "
                    "here (pip install transformers).")


def baseline_note(runs: list[dict]) -> str:
    """Says, next to the baseline bars, where transformers' greedy tokens differ from ours, and why."""
    notes = []
    for run in runs:
        base = run.get("baseline") or {}
        if base.get("tokens_match") is False:
            notes.append(f"⚠ **{plain(run_label(run))}**: transformers' greedy tokens differ from ours: "
                         f"{plain(profiling.charts.divergence_text(run))}")
        elif base.get("tokens_match"):
            notes.append(f"✓ **{plain(run_label(run))}**: transformers' greedy tokens equal ours.")
    return "  \n".join(notes)


def serving_view(theme="light"):
    """The shipped serving benchmarks: throughput and TTFT against concurrent users."""
    return profiling.charts.serving_figure(shipped_serving_runs(), theme="dark" if theme == "dark" else "light")


def sweep_lengths(model, new_tokens: int) -> list[int]:
    limit = min(model.config.max_position_embeddings - max(int(new_tokens), 16), 1024)
    return [n for n in (16, 32, 64, 128, 256, 512, 1024) if n <= limit]


# ---------------------------------------------------------------------------------------------
# Inside the model


class Inside:
    """One InsideSession (a prompt's walk through the model, stepped a token at a time) per session."""

    def __init__(self, lm: LoadedModel, busy: Busy, keep: int = 4):
        self.lm, self.busy, self.keep = lm, busy, keep
        self.sessions: OrderedDict[str, profiling.inside.InsideSession] = OrderedDict()

    def start(self, prompt, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=-1,
              layer=0, request: gr.Request = None):
        """Run `prompt` through the model; returns the views of the token it makes next."""
        if not str(prompt or "").strip():
            raise gr.Error("Type a prompt first, e.g. “The capital of France is”.")
        try:
            session = profiling.inside.InsideSession(
                self.lm.model, self.lm.tokenizer, temperature=float(temperature), top_k=int(top_k),
                top_p=float(top_p), min_p=float(min_p), repetition_penalty=float(repetition_penalty),
                seed=None if seed is None or int(seed) < 0 else int(seed))
            with self.busy.hold("the Inside-the-model view is running"):
                view = session.start(str(prompt))
        except (ValueError, TypeError, OverflowError, Qwen2Error) as exc:
            raise gr.Error(f"Cannot run this prompt: {hide_paths(str(exc))}") from None
        key = request.session_hash if request is not None else ""
        self.sessions[key] = session
        self.sessions.move_to_end(key)
        while len(self.sessions) > self.keep:
            self.sessions.popitem(last=False)
        return self.figures(view, layer)

    def step(self, layer=0, request: gr.Request = None):
        """Feed the chosen token through the KV cache (one decode step); returns the new views."""
        session = self.sessions.get(request.session_hash if request is not None else "")
        if session is None:
            raise gr.Error("Run a prompt first; then “Next token” advances it one decode step.")
        try:
            with self.busy.hold("the Inside-the-model view is running"):
                view = session.step()
        except Qwen2Error as exc:
            raise gr.Error(hide_paths(str(exc))) from None
        return self.figures(view, layer)

    def figures(self, view: dict, layer) -> list:
        """[summary, path, candidates, logit lens, attention figures, the view's JSON]."""
        charts = profiling.inside_charts
        layer = max(0, min(int(layer or 0), view["model"]["layers"] - 1))
        return [inside_summary(view), charts.path_figure(view), charts.candidates_figure(view),
                charts.logit_lens_figure(view), charts.attention_figure(view, layer), view]

    @staticmethod
    def attention(view, layer):
        """Another layer's attention map, from the view already computed (no model run)."""
        if not view:
            return gr.skip()
        return profiling.inside_charts.attention_figure(view, max(0, min(int(layer), view["model"]["layers"] - 1)))


def inside_summary(view: dict) -> str:
    tokens = "".join(t["text"] for t in view["tokens"])
    chosen = view["chosen"]
    text = (f"**Step {view['step']}** ({view['phase']}) · {len(view['tokens'])} tokens · next token "
            f"`{chosen['text']!r}` (id {chosen['id']}, p = {chosen['prob']:.3f}"
            f"{', a stop token' if chosen['stop'] else ''})  \n**Text so far:** {tokens!r}")
    return (f"⚠ {view['notice']}  \n" if view.get("notice") else "") + text


# ---------------------------------------------------------------------------------------------
# The page


THEME_JS = "() => document.querySelector('.dark') ? 'dark' : 'light'"


def chat_tab(lm: LoadedModel, chat: Chat):
    """The Chat tab: the conversation, the box, the settings (also the inputs of the /chat API)."""
    gen = lm.sampling_defaults()
    default_new = RANDOM_MAX_NEW_TOKENS if lm.random_weights else min(512, lm.context // 2)
    chatbot = gr.Chatbot(height=460, show_label=False, elem_id="chatbot", placeholder=(
        f"Chat with `{lm.source}` running on {lm.device} ({lm.dtype}). Each reply shows its statistics "
        "under it; the conversation's KV cache is kept between turns."))
    textbox = gr.Textbox(placeholder="Type a message…", elem_id="chat-input", show_label=False,
                         submit_btn=True, stop_btn=False, autofocus=True, lines=1)
    stats = gr.Markdown("", elem_id="chat-stats")
    gr.Examples([[e] for e in EXAMPLES], inputs=[textbox], label="Examples (English, Chinese, code)")
    with gr.Accordion("System prompt and sampling (defaults from generation_config.json)", open=False):
        system = gr.Textbox("", label="System prompt", lines=2, placeholder="e.g. You are a helpful assistant.")
        with gr.Row():
            temperature = gr.Slider(0, 2, value=float(gen["temperature"]), step=0.05,
                                    label="Temperature", info="0 = greedy")
            top_p = gr.Slider(0.01, 1, value=float(gen["top_p"]), step=0.01, label="Top-p", info="1 = off")
            top_k = gr.Slider(0, 200, value=int(gen["top_k"]), step=1, label="Top-k (0 = off)")
        with gr.Row():
            penalty = gr.Slider(0.5, 2, value=float(gen["repetition_penalty"]), step=0.01,
                                label="Repetition penalty", info="1 = off")
            max_new = gr.Slider(1, min(lm.context, lm.engine.limits.new_tokens), value=default_new, step=1,
                                label="Max new tokens", elem_id="max-new-tokens")
            seed = gr.Number(-1, precision=0, label="Seed (-1 = random)")
    settings = [temperature, top_p, top_k, penalty, max_new, seed]

    start, respond, stop, clear, api = make_chat_events(chat)
    pending = gr.State(None)
    started = textbox.submit(start, [textbox, chatbot, *settings], [textbox, chatbot, stats, pending],
                             queue=False, api_visibility="undocumented")
    replying = started.then(respond, [pending, chatbot, system, *settings], [chatbot, stats, textbox],
                            api_visibility="undocumented", concurrency_id=CHAT_QUEUE,
                            concurrency_limit=CHAT_CONCURRENCY,
                            show_progress="minimal", show_progress_on=chatbot)
    ready = dict(fn=box_ready, outputs=textbox, api_visibility="undocumented", queue=False)
    replying.failure(**ready)  # the reply ends by making the box usable; this covers a failure before it runs
    textbox.stop(None, None, None, cancels=[replying], queue=False, api_visibility="undocumented").then(
        stop, [chatbot], [chatbot, stats], queue=False, api_visibility="undocumented").then(**ready)
    chatbot.clear(clear, None, stats, queue=False, api_visibility="undocumented")

    # The /chat API: the same settings, the conversation kept in this API session's state.
    api_message = gr.Textbox(label="Message", visible=False)
    api_reply = gr.Textbox(label="Reply", visible=False)
    api_history = gr.State([])
    gr.Button(visible=False).click(api, [api_message, system, *settings, api_history],
                                   [api_reply, stats, api_history], api_name="chat",
                                   concurrency_id=CHAT_QUEUE, concurrency_limit=CHAT_CONCURRENCY)


def dashboard_tab(lm: LoadedModel, dash: Dashboard, theme):
    """The Dashboard tab: run a profile or compare runs; headline figures, charts and the trace."""
    with gr.Row():
        devices = gr.CheckboxGroup(device_choices(), value=[lm.device], label="Devices", min_width=240)
        dtype = gr.Dropdown(["auto", *options.DTYPE_NAMES], value="auto", min_width=240,
                            label="dtype (auto = the chat model's on its device)")
    with gr.Row():
        prompt_tokens = gr.Slider(8, min(4096, lm.context // 2), value=64, step=8, label="Prompt tokens",
                                  min_width=240)
        new_tokens = gr.Slider(2, min(256, lm.context // 4), value=16, step=1, label="New tokens", min_width=240)
    with gr.Row():
        baseline = gr.Checkbox(False, label="transformers baseline", interactive=BASELINE_AVAILABLE,
                               info=None if BASELINE_AVAILABLE else BASELINE_MISSING)
        sweep = gr.Checkbox(False, label="Context sweep")
        trace = gr.Checkbox(False, label="Record a torch.profiler trace")
    run_btn = gr.Button("Run", variant="primary", elem_id="run-profile")
    status = gr.Markdown("Runs are saved in the app's runs folder (the oldest go first past its cap).",
                         elem_id="profile-status")
    kpi = gr.Dataframe(label="Headline figures (one row per run)", elem_id="kpi-table", interactive=False,
                       wrap=True)
    # The figures carry their own titles: no label badge over them.
    layer_plot = gr.Plot(label="Per-layer latency", show_label=False, elem_id="layer-plot")
    throughput_plot = gr.Plot(label="Throughput and roofline", show_label=False)
    baseline_md = gr.Markdown("", elem_id="baseline-note")  # right under the baseline bars
    memory_plot = gr.Plot(label="Memory", show_label=False)
    sweep_plot = gr.Plot(label="Context sweep", show_label=False)
    with gr.Accordion("Trace: top operations and timeline (record a trace, or compare a traced run)",
                      open=True):
        trace_ops = gr.Dataframe(label="Top operations", elem_id="trace-ops", interactive=False)
        timeline = gr.Plot(label="Trace timeline", show_label=False)
    serving_plot = gr.Plot(label="Serving: throughput and time to first token vs concurrent users",
                           show_label=False, elem_id="serving-plot")
    downloads = gr.File(label="Run JSON, HTML report and trace", file_count="multiple", interactive=False)
    with gr.Accordion("Run JSON", open=False):
        run_json = gr.JSON(label="Runs")
    with gr.Accordion("Compare saved, shipped or uploaded runs", open=True):
        gr.Markdown("📦 marks the reference runs shipped with the app (CPU and GPU). Compare them with this "
                    "machine's runs or with run files made elsewhere (`python -m profiling`, or this tab's "
                    "download).")
        with gr.Row():
            saved = gr.Dropdown([], multiselect=True, label="Saved runs", scale=3, elem_id="saved-runs",
                                allow_custom_value=True, min_width=240)
            refresh = gr.Button("↻ Refresh", scale=0)
        uploads = gr.File(label="Upload run files (.json)", file_count="multiple", file_types=[".json"],
                          type="filepath")
        compare_btn = gr.Button("Compare", elem_id="compare-runs")

    views = [kpi, layer_plot, memory_plot, throughput_plot, sweep_plot, baseline_md, trace_ops, timeline]
    run_btn.click(lambda: dash.busy.note() or gr.skip(), None, status, queue=False,
                  api_visibility="undocumented").then(
        on_gpu(dash.profile), [devices, dtype, prompt_tokens, new_tokens, baseline, sweep, trace, theme],
        [*views, run_json, downloads, status, saved], api_name="profile", show_progress_on=layer_plot,
        concurrency_id=COMPUTE_QUEUE, concurrency_limit=1)
    compare_btn.click(dash.compare, [saved, uploads, theme], [*views, run_json, downloads, status, saved],
                      api_name="compare", show_progress_on=layer_plot)
    refresh.click(lambda: gr.update(choices=dash.runs.choices()), None, saved, api_visibility="undocumented")
    return views, status, saved, serving_plot


def inside_tab(lm: LoadedModel, inside: Inside):
    """The Inside-the-model tab: one token being made, with the shapes, candidates, lens and attention."""
    gr.Markdown("Watch one token being made by the loaded model: the path with the real tensor shapes, "
                "the next-token candidates before and after each sampling setting, the logit lens (what "
                "each layer would predict) and the attention maps. *Next token* takes one decode step.")
    with gr.Row():
        prompt = gr.Textbox("The capital of France is", label="Prompt", elem_id="inside-prompt", scale=4,
                            min_width=240)
        run = gr.Button("Run", variant="primary", elem_id="inside-run", scale=1, min_width=100)
        step = gr.Button("Next token", elem_id="inside-step", scale=1, min_width=100)
    with gr.Accordion("Sampling settings (temperature 0 = greedy)", open=False):
        with gr.Row():
            temperature = gr.Slider(0, 2, value=0.0, step=0.05, label="Temperature", min_width=160)
            top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0 = off)", min_width=160)
            top_p = gr.Slider(0.01, 1, value=1.0, step=0.01, label="Top-p (1 = off)", min_width=160)
            min_p = gr.Slider(0, 0.99, value=0.0, step=0.01, label="Min-p (0 = off)", min_width=160)
            penalty = gr.Slider(0.5, 2, value=1.0, step=0.01, label="Repetition penalty (1 = off)",
                                min_width=160)
            seed = gr.Number(0, precision=0, label="Seed (-1 = random)", min_width=160)
    summary = gr.Markdown("", elem_id="inside-summary")
    layer = gr.Slider(0, lm.model.config.num_hidden_layers - 1, value=0, step=1, label="Attention: layer",
                      elem_id="inside-layer")
    attention = gr.Plot(label="Attention", show_label=False, elem_id="inside-attention")
    with gr.Row(equal_height=False):
        candidates = gr.Plot(label="Next-token candidates", show_label=False, elem_id="inside-candidates",
                             min_width=320)
        lens = gr.Plot(label="Logit lens", show_label=False, elem_id="inside-lens", min_width=320)
    path = gr.Plot(label="The path", show_label=False, elem_id="inside-path")
    with gr.Accordion("The view as JSON", open=False):
        view = gr.JSON(label="View")
    outputs = [summary, path, candidates, lens, attention, view]
    queued = dict(concurrency_id=COMPUTE_QUEUE, concurrency_limit=1, show_progress_on=[summary])
    inputs = [prompt, temperature, top_k, top_p, min_p, penalty, seed, layer]
    run.click(on_gpu(inside.start), inputs, outputs, api_name="inside", **queued)
    prompt.submit(on_gpu(inside.start), inputs, outputs, api_visibility="undocumented", **queued)
    step.click(on_gpu(inside.step), [layer], outputs, api_name="inside_step", **queued)
    layer.release(inside.attention, [view, layer], attention, api_visibility="undocumented")


def build_demo(lm: LoadedModel, runs: RunStore) -> gr.Blocks:
    busy = Busy(lm.engine)
    dash = Dashboard(lm, runs, busy)
    # Gradio keeps a copy of every upload and download in its cache: hourly, drop those over an hour old.
    with gr.Blocks(title="Qwen2 Studio", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"# Qwen2 Studio\n{lm.summary()}")
        serving = gr.Markdown(lm.serving(), elem_id="serving")
        # The engine's state (eager -> compiling 2/3 -> compiled, replies in flight), refreshed while the
        # page is open; the tick reads two counters and runs outside the queue.
        gr.Timer(3).tick(lm.serving, None, serving, queue=False, api_visibility="undocumented",
                         show_progress="hidden")
        if lm.notice():
            gr.Markdown(lm.notice(), elem_id="notice")
        theme = gr.Textbox("light", visible=False, label="Chart theme (light or dark)")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                chat_tab(lm, Chat(lm, busy))
            with gr.Tab("Dashboard", id="dashboard"):
                views, status, saved, serving_plot = dashboard_tab(lm, dash, theme)
            with gr.Tab("Inside the model", id="inside"):
                inside_tab(lm, Inside(lm, busy))
        demo.load(None, None, theme, js=THEME_JS).then(
            dash.on_page_load, theme, [*views, status, saved], api_visibility="undocumented").then(
            serving_view, theme, serving_plot, api_visibility="undocumented")
    return demo


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
                        "step, about a minute per batch size on the 0.5B model; default compiles in seconds")
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
    try:
        lm = LoadedModel(args.model, args.device, args.dtype, args.quantize, args.fallback_config, args.fast_decode,
                         slots=args.slots, slot_tokens=args.slot_tokens, limits=limits,
                         compile_mode=args.compile_mode).start()
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
