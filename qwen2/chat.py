"""A conversation with the model: message text, the per-reply statistics line, and a session that
keeps the KV cache between turns (ChatSession, single stream; EngineChat, on the serving engine).

Each turn's prompt is the whole conversation rendered by the chat template, and it starts with the
previous turn's prompt and reply. Recomputing that prefix would make every reply wait longer than
the one before; ChatSession keeps the cache and feeds only the tokens that changed, so the time to
first token stays flat as the chat grows.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from .fast_path import cache_bucket
from .generate import DecodeSession, check_budget, stream_tokens
from .options import dtype_name
from .sampling import Sampler, SamplingSettings
from .session import common_prefix
from .stats import ReplyStats


def message_text(content) -> str:
    """The text of a message's content: a plain string, or content parts ({"type": "text", "text"},
    Gradio's {"text", "files"}, lists of either); non-text parts (files, images) contribute nothing."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return ""


class ChatSession:
    """One conversation's KV cache, kept between turns.

        chat = ChatSession(model)
        for token in chat.reply(tokenizer.encode_chat(messages), max_new_tokens=256): ...
        chat.stats.line()

    A new prompt is compared with the tokens already in the cache (the previous prompt and reply);
    the longest common prefix is kept and only the rest is prefilled. Any edit earlier in the
    conversation simply shortens that prefix.
    """

    def __init__(self, model, max_len: int | None = None, fast_path=None):
        self.model, self.fast_path = model, fast_path  # fast_path: a fast decode path (qwen2/fast.py) or None
        self.limit = min(max_len or model.config.max_position_embeddings, model.config.max_position_embeddings)
        self.session: DecodeSession | None = None
        self.cached: list[int] = []  # the ids whose keys/values are in the cache, in order
        self.stats = ReplyStats(device=str(model.device), dtype=dtype_name(model.dtype), context_limit=self.limit)

    def reset(self):
        """Forget the conversation (its cache goes back to the pool)."""
        if self.session is not None:
            self.session.close()
        self.session, self.cached = None, []

    @property
    def context_used(self) -> int:
        return len(self.cached)

    def reply(self, prompt_ids: list[int], max_new_tokens: int = 64, stop_token_ids=None, temperature: float = 0.0,
              top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
              seed: int | None = None) -> Iterator[int]:
        """Stream the new token ids answering `prompt_ids` (the whole conversation, templated).
        Arguments are checked here, before the first token; closing the generator (Stop) keeps what
        was computed for the next turn."""
        settings = SamplingSettings(temperature, top_k, top_p, min_p, repetition_penalty)
        prompt = [int(t) for t in prompt_ids]
        check_budget(self.model, len(prompt), max_new_tokens, self.limit)
        stop = set() if stop_token_ids is None else {int(t) for t in stop_token_ids}
        return self._reply(prompt, max_new_tokens, settings, stop, seed)

    def _reply(self, prompt, max_new_tokens, settings, stop, seed):
        started = time.perf_counter()
        reused = min(common_prefix(prompt, self.cached), len(prompt) - 1)  # the last token's logits are needed
        self.stats = ReplyStats(prompt_tokens=len(prompt), reused_tokens=reused, device=str(self.model.device),
                                dtype=dtype_name(self.model.dtype), stopped=True,
                                context_used=len(prompt), context_limit=self.limit)
        try:
            session = self._session_for(reused, len(prompt) + 1)
            ids = torch.tensor([prompt], dtype=torch.long, device=self.model.device)
            sampler = Sampler(settings, ids, self.model.config.vocab_size, seed)
            logits = session.prefill(ids[:, reused:])
            self.cached = list(prompt)
            reply: list[int] = []
            first = None
            for token in self._stream(session, sampler, logits, max_new_tokens, stop, reply):
                now = time.perf_counter()
                first = first or now
                self.stats.new_tokens, self.stats.context_used = len(reply), len(prompt) + len(reply)
                self.stats.ttft_s, self.stats.decode_s = first - started, now - first
                yield token
            self.stats.stopped = False
            self.stats.end = "length" if len(reply) >= max_new_tokens else "stop"
            self.stats.ttft_s = self.stats.ttft_s if first else time.perf_counter() - started
        except BaseException as exc:
            if not isinstance(exc, GeneratorExit):  # Stop keeps the cache; an error drops it
                self.reset()
            raise
        finally:
            if self.session is not None:
                self.cached = self.cached[:self.session.cache.length]

    def _stream(self, session, sampler, logits, max_new_tokens, stop, reply):
        """stream_tokens, moving to the next larger cache whenever this one is full.

        The cache is sized to what the conversation holds, not to the most the reply could add: a
        fixed-size cache is read whole at every step of the fast decode paths, so a smaller one is a
        faster step. Growing copies the cache once per doubling."""
        prompt = list(self.cached)
        remaining = max_new_tokens
        while True:
            n = min(remaining, session.cache.max_len - session.cache.length + 1)  # n tokens feed n - 1
            count = 0
            for token in stream_tokens(session, sampler, logits, n, stop):
                count += 1
                reply.append(token)
                self.cached = (prompt + reply)[:session.cache.length]
                yield token
            remaining -= count
            if count < n or remaining == 0:  # a stop token, or the budget is spent
                return
            session = self._session_for(session.cache.length, session.cache.length + 1)
            logits = session.step(torch.tensor([reply[-1]], device=self.model.device))
            self.cached = (prompt + reply)[:session.cache.length]

    def _session_for(self, keep: int, needed: int) -> DecodeSession:
        """The live session rewound to `keep` tokens, or a larger one holding those tokens."""
        old = self.session
        if old is not None and old.cache.max_len >= needed:
            old.rewind(keep)
            return old
        new = DecodeSession(self.model, 1, cache_bucket(needed, self.limit), fast_path=self.fast_path)
        if old is None:
            keep = 0
        else:
            new.copy_prefix_from(old, keep)
            old.close()
        self.session, self.cached = new, self.cached[:keep]
        return new


class EngineChat:
    """One conversation served by a serving engine (qwen2/engine.py), with ChatSession's interface:
    reply(prompt_ids, ...) streams token ids, `stats` describes the last reply, `limit` is the
    context. What the engine adds: its compiled steps and speculative decoding (prompt lookup,
    verified only where it pays), on a row kept between turns. Closing the stream (Stop) cancels
    the reply after the step in flight. (The terminal chat's; the app's tabs talk to the engine
    through studio/chat.py.)"""

    def __init__(self, engine):
        self.engine, self.model = engine, engine.model
        self.limit = engine.row_tokens
        self.conversation = engine.conversation()
        self.stats = ReplyStats(device=str(self.model.device), dtype=dtype_name(self.model.dtype),
                                context_limit=self.limit)
        self.current = None  # the engine's Reply being streamed (its `guessed` tokens: --show-guesses)

    def reply(self, prompt_ids: list[int], max_new_tokens: int = 64, stop_token_ids=None, temperature: float = 0.0,
              top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
              seed: int | None = None) -> Iterator[int]:
        settings = SamplingSettings(temperature, top_k, top_p, min_p, repetition_penalty)
        reply = self.engine.submit(prompt_ids, settings, max_new_tokens, stop_token_ids or (), seed,
                                   conversation=self.conversation)
        self.stats, self.current = reply.stats, reply
        return self._stream(reply)

    @staticmethod
    def _stream(reply) -> Iterator[int]:
        try:
            yield from reply
        finally:
            if not reply.done:  # the reader stopped early (Stop, Ctrl-C)
                reply.cancel()
                reply.wait(timeout=30)  # after the step in flight
