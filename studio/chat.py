"""Chat logic, apart from the page: the prompt from the history (fitted to the context), settings
checked before anything runs, a conversation per session kept in the engine, replies streamed and
stopped. ChatError (a VisitorError) carries the message the page shows."""

from __future__ import annotations

import html
import json
import time
import traceback

from qwen2.chat import message_text
from qwen2.engine import Conversation, Reply
from qwen2.errors import Qwen2Error, TokenizerError
from qwen2.tool_calls import validate_tools

from .errors import VisitorError
from .hosting import Busy, LoadedModel
from .sessions import SessionLRU
from .settings import checked_new_tokens, checked_sampling, checked_seed

# The page gets at most 20 updates a second: each update re-renders the reply in the browser, so one per
# token only loads the page (and its Stop click) at a few hundred tokens per second.
STREAM_INTERVAL_S = 0.05
# Per-reply statistics are "thought" messages whose title starts with this. Plain text: an emoji here
# shows as an empty box wherever the browser has no emoji font.
STATS_TITLE = "Stats: "
CHARS_PER_TOKEN_BOUND = 8  # no real text averages more characters a token (code indentation: about 4)
EMPTY_HINT = "Type a message first: the message box is empty."


class ChatError(VisitorError):
    """A reply that could not be made, with a message for the user (server paths cut to file names)."""


def is_stats_message(item) -> bool:
    metadata = item.get("metadata") if isinstance(item, dict) else getattr(item, "metadata", None)
    return str((metadata or {}).get("title") or "").startswith(STATS_TITLE)


def history_messages(history) -> list[dict]:
    """Gradio's history as [{"role", "content": str}], skipping empty messages, non-text parts and
    the per-reply statistics; an API history's tool results ({"role": "tool"}) and an assistant's
    `tool_calls` are kept for the template."""
    messages = []
    for item in history or []:
        if isinstance(item, (list, tuple)) and len(item) == 2:  # [user, assistant] pairs
            pairs = [("user", item[0], None), ("assistant", item[1], None)]
        elif isinstance(item, dict):
            pairs = [] if is_stats_message(item) else [(item.get("role"), item.get("content"), item.get("tool_calls"))]
        else:
            pairs = [(getattr(item, "role", None), getattr(item, "content", None), None)]
        for role, content, calls in pairs:
            text = message_text(content)
            if role in ("user", "assistant", "tool") and (text.strip() or calls):
                messages.append({"role": role, "content": text, **({"tool_calls": calls} if calls else {})})
    return messages


def fit_context(tokenizer, context: int, system: str, turns: list[dict], text, max_new: int, tools=None):
    """Prompt ids for the chat, dropping the oldest turns (a user message and what followed it) until
    the prompt leaves room for a reply. `text` is the new user message, or this turn's messages (a
    function call's results: [{"role": "tool", "content": ...}, ...]).

    Returns (ids, turns dropped, max new tokens that fit). Text far longer than the context can hold
    (CHARS_PER_TOKEN_BOUND characters a token) is refused, or dropped, before it is tokenized, and the
    turns to keep are found by bisection: a visitor's megabyte, or a thousand-turn history sent to the
    API, must not cost everyone seconds of tokenizing."""
    reserve = max(1, min(int(max_new), context // 2))
    most = CHARS_PER_TOKEN_BOUND * context
    tools = validate_tools(tools)  # TokenizerError naming the tool and field
    new = [{"role": "user", "content": text}] if isinstance(text, str) else list(text)
    new_chars = sum(len(m["content"]) for m in new)
    for name, size in (("message", new_chars), ("system prompt", len(system)),
                       ("list of tools", len(json.dumps(tools)) if tools else 0)):
        if size > most:
            raise ChatError(f"This {name} is {size:,} characters, far more than the model's context of "
                            f"{context:,} tokens can hold: please shorten it.")
    head = [{"role": "system", "content": system}] if system and system.strip() else []
    # Where the kept history may begin: the start, each later user message, or nothing kept.
    starts = [0] + [i for i, t in enumerate(turns) if i > 0 and t["role"] == "user"] + [len(turns)]
    chars_after = [0] * (len(turns) + 1)
    for i in range(len(turns) - 1, -1, -1):
        chars_after[i] = chars_after[i + 1] + len(turns[i]["content"]) + len(json.dumps(turns[i].get("tool_calls") or ""))

    def encode(k: int) -> list[int]:
        return tokenizer.encode_chat(head + turns[starts[k]:] + new, add_generation_prompt=True, tools=tools)

    fixed = new_chars + len(system) + (len(json.dumps(tools)) if tools else 0)
    lo = next(k for k, start in enumerate(starts) if fixed + chars_after[start] <= most)
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


def sampling_settings(temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed, min_p=0.0,
                      most_new_tokens: int | None = None) -> dict:
    """{"sampling": SamplingSettings, "seed": int or None, "max_new_tokens": int}, checked now
    (studio/settings.py); `most_new_tokens` is the server's cap (--max-new-tokens)."""
    try:
        return {"sampling": checked_sampling(temperature, top_p, top_k, repetition_penalty, min_p),
                "seed": checked_seed(seed), "max_new_tokens": checked_new_tokens(max_new_tokens, most_new_tokens)}
    except VisitorError as exc:
        raise ChatError(str(exc)) from None


def context_meter(used: int, limit: int) -> str:
    filled = round(10 * used / max(limit, 1))
    return f"context {'▰' * filled}{'▱' * (10 - filled)} {used:,} / {limit:,} tokens ({used / max(limit, 1):.1%})"


class Conversations:
    """One engine conversation (its row of the KV cache) per browser or API session, the latest few
    kept (the oldest idle ones give their rows back; one still replying is kept); and the reply each
    is being written."""

    def __init__(self, lm: LoadedModel, keep: int = 16):
        self.lm = lm
        self.sessions: SessionLRU[Conversation] = SessionLRU(
            keep, is_idle=lambda c: c.active is None, on_evict=lambda key, c: self._forget(key, c))
        self.replies: dict[str, Reply] = {}  # each session's latest reply
        self.stopped: dict[str, Reply] = {}  # the reply each session's last Stop reported
        self.stop_asked: set[str] = set()  # sessions whose Stop came before their reply was submitted

    def get(self, key: str) -> Conversation:
        return self.sessions.get_or_create(key, self.lm.engine.conversation)

    def _forget(self, key: str, conversation: Conversation) -> None:
        self.replies.pop(key, None)
        self.stopped.pop(key, None)
        self.stop_asked.discard(key)
        conversation.close()

    def stats(self, key: str):
        reply = self.replies.get(key)
        return reply.stats if reply is not None else None

    def drop(self, key: str):
        conversation = self.sessions.pop(key)
        if conversation is not None:
            self._forget(key, conversation)


class Chat:
    """The reply stream shared by the page and the `/chat` API; yields (reply so far, stats so far)."""

    def __init__(self, lm: LoadedModel, busy: Busy):
        self.lm, self.busy = lm, busy
        self.conversations = Conversations(lm)

    def settings(self, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed, min_p=0.0) -> dict:
        """sampling_settings, with this server's cap on max new tokens."""
        return sampling_settings(temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed, min_p,
                                 most_new_tokens=self.lm.engine.limits.new_tokens)

    def stream(self, key: str, text: str, history, system: str, settings: dict, max_new_tokens: int,
               tools=None):
        lm = self.lm
        try:
            ids, dropped, max_new = fit_context(lm.tokenizer, lm.context, system or "", history_messages(history),
                                                text, int(max_new_tokens), tools)
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
        if key in self.conversations.stop_asked:  # Stop was pressed while this reply waited its turn
            self.conversations.stop_asked.discard(key)
            reply.cancel()
        detokenizer, text, count = lm.tokenizer.detokenizer(), "", 0
        try:
            sent = -STREAM_INTERVAL_S  # the first token shows at once
            for count, token_id in enumerate(reply, 1):
                text += lm.token_text(detokenizer, token_id)
                if time.monotonic() - sent >= STREAM_INTERVAL_S:
                    sent = time.monotonic()
                    yield text, f"generating… {count} new token{'' if count == 1 else 's'}"
            text += detokenizer.flush()
        except Qwen2Error as exc:
            raise ChatError(str(exc)) from None
        except Exception as exc:  # a bug: its traceback for the server's log, a message for the visitor
            traceback.print_exc()
            raise ChatError(f"{type(exc).__name__}: {exc}") from None
        finally:
            reply.cancel()  # a no-op once it ended; Stop closes this generator at its yield
        yield text, self.stats_text(reply.stats, notes)

    def stats_message(self, key: str) -> dict | None:
        """The statistics message under the session's latest reply (None when its conversation was
        cleared); a reply that kept guesses shows its text in it, those tokens marked."""
        reply = self.conversations.replies.get(key)
        if reply is None:
            return None
        marked = ""
        if reply.guessed:
            detokenizer = self.lm.tokenizer.detokenizer()
            pieces = [self.lm.token_text(detokenizer, t) for t in reply.tokens]
            pieces[-1] += detokenizer.flush()
            marked = guessed_marks(pieces, reply.guessed)
        return stats_message(reply.stats, marked)

    def stats_text(self, stats, notes=()) -> str:
        if stats is None:
            return ""
        return "  \n".join([f"**Stats:** {stats.line()}", context_meter(stats.context_used, stats.context_limit),
                            *notes])

    def new_turn(self, key: str):
        """A message was sent: a Stop pressed before it was is not for its reply."""
        self.conversations.stop_asked.discard(key)

    def request_stop(self, key: str):
        """The page's Stop: the session's reply ends after the step in flight, and the reply's own
        stream then ends with its statistics (nothing is cancelled in the browser, so the page never
        sees an event fail). A reply not yet submitted is stopped as soon as it is."""
        reply = self.conversations.replies.get(key)
        if reply is not None and reply.reason is None:
            reply.cancel()
        else:
            self.conversations.stop_asked.add(key)

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


def guessed_marks(pieces: list[str], guessed) -> str:
    """A reply's text (`pieces`: each token's text) with its tokens at the indices `guessed` marked:
    those that came from a guess the model kept, with no decode step of their own. HTML in a <pre>
    block, which Markdown leaves as written (the text escaped: a reply's own tags stay text)."""
    guessed = set(guessed)
    runs: list[tuple[bool, str]] = []
    for i, piece in enumerate(pieces):
        if runs and runs[-1][0] == (i in guessed):
            runs[-1] = (runs[-1][0], runs[-1][1] + piece)
        else:
            runs.append((i in guessed, piece))
    body = "".join(f"<mark>{html.escape(text, quote=False)}</mark>" if mark else html.escape(text, quote=False)
                   for mark, text in runs if text)
    count = sum(1 for i in guessed if i < len(pieces))
    legend = (f"Marked: the {count} of {len(pieces)} new tokens that came from guesses the model kept "
              "(prompt lookup, checked in one forward), with no decode step of their own.")
    return f"{legend}\n\n<pre class=\"guessed-tokens\">{body}</pre>"


def stats_message(stats, marked: str = "") -> dict:
    """The "Stats: ..." message under a reply: the statistics line as its title; the context meter and
    `marked` (guessed_marks) inside."""
    content = context_meter(stats.context_used, stats.context_limit)
    return {"role": "assistant", "content": f"{content}\n\n{marked}" if marked else content,
            "metadata": {"title": STATS_TITLE + stats.line(), "status": "done"}}
