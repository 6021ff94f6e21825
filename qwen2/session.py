"""What the serving engine (qwen2/engine.py) keeps per request and per conversation, and its limits.

A Conversation is a row of the engine's KV cache that outlives one reply, so the next turn only
prefills what is new; a Reply is one request, read by iterating it while the engine fills it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .errors import LimitError
from .sampling import Sampler, SamplingSettings
from .stats import ReplyStats

def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids a and b share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(frozen=True)
class Limits:
    """Per-request bounds. The defaults suit a public Space on two CPU cores: a reply ends after two
    minutes whatever its settings, and a prompt or a queue beyond these is refused with a message."""

    prompt_tokens: int = 8192
    new_tokens: int = 2048
    wall_s: float = 120.0  # from the start of the prefill to the last token
    waiting: int = 64  # requests queued behind the live ones

    def check(self, prompt_len: int, max_new_tokens: int):
        if prompt_len > self.prompt_tokens:
            raise LimitError(f"the prompt is {prompt_len} tokens; this server takes at most "
                             f"{self.prompt_tokens} prompt tokens per request")
        if max_new_tokens > self.new_tokens:
            raise LimitError(f"max_new_tokens={max_new_tokens} is over this server's limit of "
                             f"{self.new_tokens} new tokens per request")


_END = object()  # the last item of a reply's token queue


class Conversation:
    """A conversation's row of the engine's KV cache and the token ids whose keys/values it holds.

    Kept between turns, so the next prompt (the previous one, the reply and a new message) only
    prefills what is new; `close()` (or leaving the `with` block) gives the row back at once.
    """

    def __init__(self, release: Callable[[Conversation], None], wake: Callable[[], None]):
        # The engine's hooks, not the engine: what a conversation may ask of it is to give its row
        # back and to look again at its requests (a reply was cancelled).
        self._release, self.wake = release, wake
        self.row: int | None = None  # None: no row (new, closed, or given up to a newcomer)
        self.cached: list[int] = []
        self.active: Reply | None = None  # the reply being made in this row
        self.last_used = time.monotonic()

    def close(self):
        self._release(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Reply:
    """One request: iterate it for the new token ids as they are made (the stop token is not one).

    `cancel()` ends it after the step in flight; `stats` says what it cost; `tokens` holds every id
    it produced; `guessed` the indices into `tokens` of those that came from a guess the model kept
    (speculative decoding: no step of their own), each recorded before its token is streamed;
    `reason` says why it ended ("stop", "length", "cancelled", "time", "error").
    """

    def __init__(self, prompt: list[int], settings: SamplingSettings, max_new_tokens: int, stop_ids: set[int],
                 seed: int | None, conversation: Conversation, stats: ReplyStats, wall_s: float,
                 own_conversation: bool = False):
        self.prompt, self.settings, self.max_new_tokens = prompt, settings, max_new_tokens
        self.stop_ids, self.seed, self.conversation, self.stats = stop_ids, seed, conversation, stats
        self.wall_s = wall_s
        self.own_conversation = own_conversation  # a one-off request: its row goes back when it ends
        self.tokens: list[int] = []
        self.guessed: list[int] = []
        self.reason: str | None = None
        self.error: BaseException | None = None
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self.first: float | None = None
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # scheduler state
        self.row: int | None = None
        self.position = 0  # the next slot of the row to write (= the next token's position)
        self.next_id: int | None = None  # the token the next decode step feeds
        self.sampler: Sampler | None = None
        self.speculation = None  # a qwen2.speculative.Speculation where this reply may speculate

    # -- the consumer's side -------------------------------------------------------------------
    def __iter__(self) -> Iterator[int]:
        while True:
            item = self._queue.get()
            if item is _END:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def cancel(self):
        """Stop after the step in flight; what was made so far stays in `tokens` and `stats`."""
        self._cancel.set()
        self.conversation.wake()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the engine is done with this reply; True when it is."""
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    # -- the engine's side ----------------------------------------------------------------------
    @property
    def decoding(self) -> bool:
        return self.next_id is not None

    def _emit(self, token: int, now: float, guessed: bool = False):
        if guessed:
            self.guessed.append(len(self.tokens))
        self.tokens.append(token)
        self.first = self.first or now
        stats = self.stats
        stats.new_tokens, stats.context_used = len(self.tokens), len(self.prompt) + len(self.tokens)
        stats.ttft_s, stats.decode_s = self.first - self.started, now - self.first
        self._queue.put(token)

    def _finish(self, reason: str, error: BaseException | None = None):
        self.reason, self.error = reason, error
        self.stats.stopped = reason in ("cancelled", "time")
        self.stats.end = reason
        if self.first is None and self.started is not None:
            self.stats.ttft_s = time.perf_counter() - self.started
        self.next_id = None
        self._queue.put(_END)
        self._done.set()
