"""The serving engine: one object runs the model for every conversation at once.

    engine = Engine(model, rows=4).start()      # the scheduler thread; the compile runs beside it
    with engine.conversation() as conversation:  # a row of the KV cache, kept between turns
        reply = engine.submit(prompt_ids, max_new_tokens=64, stop_ids={eos}, conversation=conversation)
        for token in reply: ...                  # streams as the engine makes them
        reply.stats.line()

Continuous batching, as llama.cpp's server slots and vLLM's scheduler do it. Each turn of the loop:
  1. requests that were cancelled or ran out of time leave; waiting ones get a row if one is free,
  2. newcomers' prompts are prefilled, up to `prefill_chunk` tokens in all (so a long prompt
     delays the others by about one chunk, not by its whole length, and many short ones start
     together),
  3. every request past its prefill decodes one token, all of them in one batched forward; a
     request decoding alone speculates instead (below).
A request joins at the next step and leaves when it stops (a stop token, its token budget, cancel,
its time limit, an error) without disturbing the others. Each row keeps its own sampling settings,
seed, stop tokens and length; a greedy row gets the tokens it would get alone (tests/test_engine.py).

Every row of the cache (qwen2/cache.py: RowCache) is one conversation, kept after its reply so the
next turn prefills only what is new; an idle conversation gives its row up when a newcomer needs one.
How a step is launched (eager, or Inductor-compiled per batch size) is the step runner's business
(qwen2/steps.py); the model stays math.

Speculative decoding (qwen2/speculative.py): a reply decoding alone guesses its next tokens by
prompt lookup (code edits and quotes repeat the conversation) and the step runner checks them in
one forward; the reply keeps what the model agrees with (greedy: the same tokens as without; sampled:
the same distribution), and its row is simply read no further than what was kept. A DraftGate per
reply verifies only the guesses that are expected to pay, so open chat, where lookup rarely guesses
right, decodes at plain speed. With two or more replies decoding, the batched step already shares
each weight read among them, and nobody speculates.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque

import torch

from .cache import RowCache
from .errors import GenerationError, LimitError
from .generate import _check_ids, check_budget
from .openmp import release_workers
from .options import dtype_name
from .sampling import Sampler, SamplingSettings, check_seed
from .session import Conversation, Limits, Reply, common_prefix
from .speculative import PromptLookupDrafter, Speculation
from .stats import ReplyStats
from .steps import make_steps

__all__ = ["Conversation", "Engine", "Limits", "Reply"]


class Engine:
    """Owns the model, the KV-cache rows and the step runner; serves every request from one thread.

    rows: conversations held at once (llama.cpp's -np); row_tokens: each one's context (prompt +
    reply); prefill_chunk: prompt tokens fed per loop turn; fast_decode: "auto" (compiled on CPU),
    "compile" or "off" (qwen2/steps.py); limits: per-request bounds; speculate: whether a reply
    decoding alone may speculate (prompt lookup, gated), unless its request says otherwise.
    """

    def __init__(self, model, rows: int = 4, row_tokens: int | None = None, prefill_chunk: int = 128,
                 fast_decode: str = "auto", limits: Limits | None = None, idle_release_s: float = 600.0,
                 compile_mode: str | None = None, speculate: bool = True):
        if rows < 1 or prefill_chunk < 1:
            raise GenerationError(f"rows={rows} and prefill_chunk={prefill_chunk} must be >= 1")
        self.model = model
        context = model.config.max_position_embeddings
        self.row_tokens = min(row_tokens or context, context)
        self.rows, self.prefill_chunk = rows, prefill_chunk
        self.limits = limits or Limits()
        self.idle_release_s = idle_release_s
        self.speculate = bool(speculate)
        self.steps = make_steps(model, fast_decode, max_batch=rows, mode=compile_mode, verify=self.speculate,
                                row_tokens=self.row_tokens)
        self._cache: RowCache | None = None  # allocated at the first request, freed when idle
        self._owners: list[Conversation | None] = [None] * rows
        self._waiting: deque[Reply] = deque()
        self._live: list[Reply] = []
        self._cv = threading.Condition()
        self._exclusive = 0  # > 0: admissions paused for someone who needs the model alone
        self._closing = False
        self._thread: threading.Thread | None = None
        self._idle_since = time.monotonic()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, compile_in_background: bool = True, progress=None) -> Engine:
        """Start serving now; the step runner's preparation (compiles) runs beside the replies."""
        if self._thread is None:
            # The steps run on the engine's thread: this one (which loaded the model) gives its CPU
            # workers back, or every step waits for sleeping ones (qwen2/openmp.py)
            release_workers()
            self._thread = threading.Thread(target=self._serve, name="qwen2-engine", daemon=True)
            self._thread.start()
            if compile_in_background:
                self.steps.prepare(self._pool, progress)
        return self

    def compile_now(self, progress=None):
        """The step runner's preparation (compiles) on this thread, before serving: for a terminal
        chat, where nobody is served meanwhile. progress(fraction, message) hears of each."""
        self.steps.compile_now(self._pool, progress)

    def close(self):
        """Cancel everything, stop the thread and the compiles, free the cache."""
        with self._cv:
            self._closing = True
            for reply in [*self._waiting, *self._live]:
                reply._cancel.set()
            self._cv.notify_all()
        self.steps.stop()
        if self._thread is not None:
            self._thread.join()
        with self._cv:  # a thread never started (or gone) leaves these: end them, no reader waits forever
            for reply in [*self._waiting, *self._live]:
                if not reply.done:
                    reply._finish("cancelled")
            self._waiting.clear()
            self._live = []
        self._cache = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    @property
    def state(self) -> str:
        """In words, for a page header: "eager", "compiling 2/3", "compiled"."""
        return self.steps.state

    @property
    def load(self) -> dict:
        with self._cv:
            return {"live": len(self._live), "waiting": len(self._waiting), "rows": self.rows}

    # -- requests -------------------------------------------------------------------------------
    def conversation(self) -> Conversation:
        return Conversation(self._release, self._wake)

    def submit(self, prompt_ids, settings: SamplingSettings | None = None, max_new_tokens: int = 64,
               stop_ids=(), seed: int | None = None, conversation: Conversation | None = None,
               wall_s: float | None = None, speculate: bool | None = None) -> Reply:
        """Queue a reply to `prompt_ids` (the whole conversation so far, templated). Every argument is
        checked here, so a bad one raises now and nothing is queued. speculate: None follows the
        engine's setting; False never speculates for this reply (True cannot override an engine's off)."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise GenerationError("the prompt is empty; expected at least one token id")
        _check_ids(torch.tensor(prompt), self.model.config.vocab_size)
        check_seed(seed)
        check_budget(self.model, len(prompt), max_new_tokens, self.row_tokens)
        self.limits.check(len(prompt), max_new_tokens)
        wall_s = min(self.limits.wall_s, wall_s or self.limits.wall_s)
        stats = ReplyStats(prompt_tokens=len(prompt), device=str(self.model.device),
                           dtype=dtype_name(self.model.dtype), context_used=len(prompt),
                           context_limit=self.row_tokens)
        own = conversation is None
        conversation = conversation or self.conversation()
        reply = Reply(prompt, settings or SamplingSettings(), max_new_tokens, {int(t) for t in stop_ids}, seed,
                      conversation, stats, wall_s, own_conversation=own)
        # A seeded sampled reply must be the same whoever decodes beside it: speculation draws its
        # random numbers otherwise, and it runs only while a reply decodes alone, so such a reply never speculates.
        if self.speculate and speculate is not False and (reply.settings.greedy or seed is None):
            reply.speculation = Speculation(PromptLookupDrafter())  # gated; priced each round
        with self._cv:
            if self._closing:
                raise GenerationError("the engine is closed")
            if len(self._waiting) >= self.limits.waiting:
                raise LimitError(f"{len(self._waiting)} requests are already waiting (the limit is "
                                 f"{self.limits.waiting}); try again in a moment")
            self._waiting.append(reply)
            self._cv.notify_all()
        return reply

    def generate(self, prompt_ids, **kwargs) -> list[int]:
        """submit() and wait: the new token ids of one reply."""
        return list(self.submit(prompt_ids, **kwargs))

    @contextlib.contextmanager
    def exclusive(self):
        """The model alone, for a measurement: new replies wait, live ones finish first, and the
        background compile pauses between its steps. Replies waiting meanwhile show it as queue wait."""
        with self._cv:
            self._exclusive += 1
            self._cv.notify_all()
            while self._live:
                self._cv.wait()
        try:
            with self.steps.paused():
                yield self.model
        finally:
            release_workers()  # the holder's CPU workers, before the engine's steps run again
            with self._cv:
                self._exclusive -= 1
                self._cv.notify_all()

    def decode_runner(self):
        """(the step runner, the row cache) for measuring the engine's own decode step on the
        cache's scratch row (profiling.steps.EngineDecode); only inside exclusive(), where no reply
        is live and the background compile is paused."""
        if not self._exclusive:
            raise RuntimeError("decode_runner() is for measurements inside Engine.exclusive()")
        return self.steps, self._pool()

    # -- rows ------------------------------------------------------------------------------------
    def _pool(self) -> RowCache:
        with self._cv:
            if self._cache is None:
                # inference-mode tensors, whichever thread asks first (the serving loop, or a
                # measurement's decode_runner): the compiled step is guarded on how they were made
                with torch.inference_mode():
                    self._cache = RowCache(self.model.config, self.rows, self.row_tokens, self.model.device,
                                           self.model.dtype)
            return self._cache

    def _release(self, conversation: Conversation):
        with self._cv:
            for reply in [conversation.active, *self._waiting]:  # its live reply and any still queued
                if reply is not None and reply.conversation is conversation:
                    reply._cancel.set()
            self._release_locked(conversation)
            self._cv.notify_all()

    def _row_for(self, conversation: Conversation) -> int | None:
        """The conversation's row, else a free one, else the row of the conversation idle longest."""
        if conversation.row is not None and self._owners[conversation.row] is conversation:
            return conversation.row
        if None in self._owners:
            row = self._owners.index(None)
        else:
            idle = [c for c in self._owners if c.active is None]
            if not idle:
                return None
            oldest = min(idle, key=lambda c: c.last_used)
            row = oldest.row
            oldest.row, oldest.cached = None, []
        self._owners[row] = conversation
        conversation.row, conversation.cached = row, []
        return row

    # -- the loop --------------------------------------------------------------------------------
    def _wake(self):
        with self._cv:
            self._cv.notify_all()

    def _serve(self):
        with torch.inference_mode():
            while True:
                with self._cv:
                    self._end_cancelled()
                    self._admit()
                    if not self._live:
                        if self._closing:
                            return
                        self._release_when_idle()
                        self._cv.wait(timeout=1.0)
                        continue
                    prefilling = [r for r in self._live if not r.decoding]
                    decoding = [r for r in self._live if r.decoding]
                try:
                    self._prefill(prefilling)
                    if len(decoding) == 1 and decoding[0].speculation is not None:
                        self._speculate(decoding[0])
                    elif decoding:
                        self._decode(decoding)
                except Exception as exc:  # noqa: BLE001 - the step's replies end with the error; the engine goes on
                    for reply in prefilling + decoding:
                        if not reply.done:
                            reply.conversation.cached = []  # its row may hold half-written keys
                            reply._finish("error", exc)
                with self._cv:
                    self._retire()

    def _end_cancelled(self):
        now = time.perf_counter()
        for reply in list(self._waiting):
            if reply._cancel.is_set():
                self._waiting.remove(reply)
                reply._finish("cancelled")
                self._forget(reply)
        for reply in self._live:
            if reply._cancel.is_set():
                reply._finish("cancelled")
            elif reply.started is not None and now - reply.started > reply.wall_s:
                reply._finish("time")
        self._retire()

    def _admit(self):
        """Waiting replies in order get rows; one whose conversation is still busy (its previous reply
        ending: Stop, then a new message) waits without holding up the others."""
        busy = set()
        for reply in list(self._waiting):
            if self._exclusive:
                return
            conversation = reply.conversation
            if conversation.active is not None or id(conversation) in busy:
                busy.add(id(conversation))
                continue
            row = self._row_for(conversation)
            if row is None:
                return
            self._waiting.remove(reply)
            try:
                self._start(reply)
            except Exception as exc:  # noqa: BLE001 - this reply fails; the engine and the others go on
                conversation.active = None
                reply._finish("error", exc)
                self._forget(reply)

    def _start(self, reply: Reply):
        conversation = reply.conversation
        conversation.active = reply
        reply.row = conversation.row
        reply.started = time.perf_counter()
        reply.stats.queue_wait_s = reply.started - reply.submitted
        reused = min(common_prefix(reply.prompt, conversation.cached), len(reply.prompt) - 1)
        conversation.cached = conversation.cached[:reused]
        reply.position = reused
        reply.stats.reused_tokens = reused
        prompt = torch.tensor([reply.prompt], device=self.model.device)
        reply.sampler = Sampler(reply.settings, prompt, self.model.config.vocab_size, reply.seed)
        if reply.speculation is not None:
            reply.speculation.start(reply.prompt, len(reply.prompt) + reply.max_new_tokens, reply.sampler,
                                    self.model.config.vocab_size)
        self._live.append(reply)

    def _retire(self):
        ended = [r for r in self._live if r.done]
        if not ended:
            return
        self._live = [r for r in self._live if not r.done]
        for reply in ended:
            self._forget(reply)
        if not self._live:
            self._idle_since = time.monotonic()
        self._cv.notify_all()

    def _forget(self, reply: Reply):
        conversation = reply.conversation
        if conversation.active is reply:
            conversation.active = None
        conversation.last_used = time.monotonic()
        if reply.own_conversation:
            self._release_locked(conversation)

    def _release_locked(self, conversation: Conversation):
        if conversation.row is not None and self._owners[conversation.row] is conversation:
            self._owners[conversation.row] = None
        conversation.row, conversation.cached = None, []

    def _release_when_idle(self):
        """Conversations idle longer than idle_release_s give their rows up; with none left, the
        cache's memory goes back."""
        now = time.monotonic()
        for conversation in self._owners:
            if conversation is not None and conversation.active is None \
                    and now - conversation.last_used > self.idle_release_s:
                self._release_locked(conversation)
        if self._cache is not None and not any(self._owners) and not self.steps.compiling \
                and now - self._idle_since > self.idle_release_s:
            self._cache = None

    def _prefill(self, newcomers: list[Reply]):
        """Up to `prefill_chunk` prompt tokens this turn, oldest newcomer first: many short prompts
        are all prefilled before the next decode step, a long one takes a chunk per turn."""
        budget = self.prefill_chunk
        for reply in newcomers:
            if budget <= 0:
                return
            budget -= self._prefill_chunk(reply, budget)

    def _prefill_chunk(self, reply: Reply, budget: int) -> int:
        """Feed the next at most `budget` tokens of the reply's prompt; returns how many."""
        start = reply.position
        end = min(len(reply.prompt), start + budget)
        ids = torch.tensor([reply.prompt[start:end]], device=self.model.device)
        logits = self.steps.prefill(self._pool(), reply.row, ids, start)  # (1, V)
        reply.conversation.cached.extend(reply.prompt[start:end])
        reply.position = end
        if end == len(reply.prompt):
            reply.stats.batch_size = max(reply.stats.batch_size, 1)
            self._sampled(reply, int(reply.sampler(logits)))
        return end - start

    def _decode(self, batch: list[Reply]):
        logits = self.steps.decode(self._pool(), [r.row for r in batch],
                                   [r.next_id for r in batch], [r.position for r in batch])  # (B, V)
        for i, reply in enumerate(batch):
            reply.conversation.cached.append(reply.next_id)
            reply.position += 1
            reply.stats.batch_size = max(reply.stats.batch_size, len(batch))
            reply.stats.decode_forwards += 1
            reply.stats.decode_steps += 1.0
            self._sampled(reply, int(reply.sampler(logits[i:i + 1])))

    def _speculate(self, reply: Reply):
        """One speculative round for a reply decoding alone: feed its pending token and the guesses
        worth checking in one forward; emit the guesses the model agrees with and its own next token.
        The row's slots past what was kept hold rejected guesses' keys, which no later query reads
        before its own token overwrites them (a query sees slots up to its position only)."""
        cache, speculation = self._pool(), reply.speculation
        room = min(reply.max_new_tokens - len(reply.tokens) - 1, self.steps.max_guesses(cache, reply.position))
        # the context ends with the pending token; the gate prices guesses at the runner's latest timings
        costs = self.steps.verify_cost  # in one-token steps, by tokens fed
        guess = speculation.plan(reply.prompt + reply.tokens, room, costs)
        fed = [reply.next_id] + guess
        if guess:
            logits = self.steps.verify(cache, reply.row, fed, reply.position)  # (k + 1, V)
        else:
            logits = self.steps.decode(cache, [reply.row], fed, [reply.position])  # (1, V)
        kept, token = speculation.settle(logits, guess)
        reply.conversation.cached.extend(fed[:kept + 1])
        reply.position += kept + 1
        stats = reply.stats
        stats.batch_size = max(stats.batch_size, 1)
        stats.drafted, stats.accepted = speculation.stats.drafted, speculation.stats.accepted
        stats.decode_forwards += 1
        stats.decode_steps += costs[min(len(fed), len(costs)) - 1] / costs[0]
        for i, t in enumerate(guess[:kept] + [token]):
            reply.sampler.mark(torch.tensor([t], device=self.model.device))
            self._sampled(reply, t, guessed=i < kept)
            if reply.done:
                return

    def _sampled(self, reply: Reply, token: int, guessed: bool = False):
        """A row's new token: the end of its reply, or streamed and fed to the next step."""
        if token in reply.stop_ids:
            reply._finish("stop")
            return
        reply._emit(token, time.perf_counter(), guessed)
        if len(reply.tokens) == reply.max_new_tokens:
            reply._finish("length")
        else:
            reply.next_id = token

