"""One greedy run through qwen2.generate.DecodeSession, timing prefill and each decode step.

The profiled token count: the prefill produces the first token (its time is the time to first
token), then `new_tokens` decode steps each feed the last token and produce one more, so the KV
cache ends holding prompt_tokens + new_tokens positions. A step's time covers the session call
plus the greedy argmax, i.e. the time to produce one token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def new_session(model, max_len: int, fast_path=None):
    """A DecodeSession: with `fast_path` (a fast decode path: CUDA graphs or a compiled CPU step) on a
    cache of its pool, sized in buckets; without, on a KV cache of its own of exactly `max_len`
    slots, with plain module calls (forward hooks do not fire inside a graph or a compiled region).
    """
    from qwen2.generate import DecodeSession

    return DecodeSession(model, batch_size=1, max_len=max_len, fast_path=fast_path)


@dataclass
class RunTimes:
    prefill_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    prefill_parts: dict = field(default_factory=dict)         # (part, layer) -> seconds
    step_parts: list[dict] = field(default_factory=list)       # one dict per decode step
    tokens: list[int] = field(default_factory=list)
    kv_allocated_bytes: int = 0
    kv_used_bytes: int = 0
    kv_length: int = 0
    on_fast_path: bool = False  # the steps ran on a fast decode path (its pooled cache)


def timed_greedy(clock, call, *args, hooks=None, on_step=None):
    """One greedy step through `call(*args)` (logits (B, V)): (its argmax (B,), seconds by `clock`,
    the step's per-block parts from `hooks` or None); `on_step()` after it."""
    clock.reset()
    if hooks is not None:
        hooks.start_step()
    start = clock.mark()
    token = call(*args).argmax(dim=-1)
    end = clock.mark()
    clock.finish()
    seconds = clock.seconds(start, end)
    parts = hooks.collect() if hooks is not None else None
    if on_step:
        on_step()
    return token, seconds, parts


def timed_run(model, ids: torch.Tensor, new_tokens: int, clock, hooks=None,
              on_step=None, fast_path=None) -> RunTimes:
    """Prefill `ids` then `new_tokens` greedy decode steps; time each with `clock`.

    With `hooks` (an entered ModuleHooks using the same clock) the per-block times of every step
    are collected too. `on_step()` is called after each timed call (for progress bars). `fast_path`
    runs the steps on a fast decode path (never with hooks: they would see nothing).
    """
    out = RunTimes()
    session = new_session(model, ids.shape[1] + new_tokens, fast_path=None if hooks is not None else fast_path)

    token, out.prefill_s, parts = timed_greedy(clock, session.prefill, ids, hooks=hooks, on_step=on_step)
    if parts is not None:
        out.prefill_parts = parts
    tokens = [token]
    for _ in range(new_tokens):
        token, seconds, parts = timed_greedy(clock, session.step, token, hooks=hooks, on_step=on_step)
        out.step_s.append(seconds)
        if parts is not None:
            out.step_parts.append(parts)
        tokens.append(token)

    _finish(out, session, tokens)
    return out


def _finish(out: RunTimes, session, tokens: list[torch.Tensor]):
    """The run's tokens and its cache's figures into `out`; the session closed."""
    cache = session.cache
    out.tokens = [int(t) for t in torch.cat(tokens).tolist()]
    out.on_fast_path = session.fast_path is not None
    out.kv_allocated_bytes = int(cache.allocated_bytes)
    out.kv_used_bytes = int(cache.used_bytes)
    out.kv_length = int(session.length)
    session.close()


def paired_runs(model, ids: torch.Tensor, new_tokens: int, clock, on_step=None) -> tuple[RunTimes, RunTimes]:
    """A clean run and a hooked one (profiling.hooks.ModuleHooks), made call by call on one
    session: the prefill and each decode step run twice at the same position, once without hooks
    and once with them (the cache rewound between: the second writes the same slots again). The
    prefill and odd steps (1, 3, ...) go clean first; even steps (0, 2, ...) hooked first
    (profiling.overhead.paired_median_ratio balances the two orders). The two samples of a pair are
    a step apart on the same cache, so their ratio is what the hooks cost, not the machine's drift
    between two runs: a clean run followed by a hooked run read 11-18 % on eager CPU steps that the
    hooks slow by ~2 % (docs/benchmarks.md). Returns (clean, hooked); the run goes on from the clean
    calls' tokens, and each run keeps its own (equal unless the hooks changed the math)."""
    from .hooks import ModuleHooks

    clean, hooked = RunTimes(), RunTimes()
    session = new_session(model, ids.shape[1] + new_tokens)
    hooks = ModuleHooks(model, clock)

    def twice(call, arg, hooked_first: bool):
        """timed_greedy's (token, seconds, parts) of call(arg), clean and hooked, at one position."""
        start, out = session.length, {}
        for with_hooks in ((True, False) if hooked_first else (False, True)):
            session.rewind(start)
            if with_hooks:
                with hooks:
                    out[True] = timed_greedy(clock, call, arg, hooks=hooks, on_step=on_step)
            else:
                out[False] = timed_greedy(clock, call, arg, on_step=on_step)
        return out[False], out[True]

    (token, clean.prefill_s, _), (hooked_token, hooked.prefill_s, hooked.prefill_parts) = twice(
        session.prefill, ids, hooked_first=False)
    tokens, hooked_tokens = [token], [hooked_token]
    for i in range(new_tokens):
        (token, clean_s, _), (hooked_token, hooked_s, parts) = twice(session.step, token, hooked_first=i % 2 == 0)
        clean.step_s.append(clean_s)
        hooked.step_s.append(hooked_s)
        hooked.step_parts.append(parts)
        tokens.append(token)
        hooked_tokens.append(hooked_token)
    hooked.tokens = [int(t) for t in torch.cat(hooked_tokens).tolist()]
    _finish(clean, session, tokens)
    hooked.kv_allocated_bytes, hooked.kv_used_bytes = clean.kv_allocated_bytes, clean.kv_used_bytes
    hooked.kv_length = clean.kv_length
    return clean, hooked


class EngineDecode:
    """The serving engine's own decode step as a profile's fast path: its step runner
    (qwen2/steps.py) on the scratch row of its row cache, one row, as a chat reply decodes. Used
    inside `Engine.exclusive()` (no reply is live, the background compile paused), so the scratch
    row is free; the steps are the engine's, compiled at start-up, never compiled again here."""

    def __init__(self, steps, cache):
        self.steps, self.cache = steps, cache
        self.name = steps.name

    def why_not(self, tokens: int) -> str | None:
        """Why a run of `tokens` (prompt + new) would not time the compiled step, or None."""
        if tokens > self.cache.row_len:
            return f"the engine's rows hold {self.cache.row_len} tokens, this profile needs {tokens}"
        if not self.steps.compiled_for(self.cache, 1, tokens):
            return f"its step is not compiled for one row reading {tokens} keys (still compiling, or too many keys)"
        return None

    def timed_run(self, ids: torch.Tensor, new_tokens: int, clock, on_step=None) -> RunTimes:
        """timed_run's greedy prefill + `new_tokens` steps through the engine's runner."""
        out = RunTimes()
        steps, cache, row = self.steps, self.cache, self.cache.scratch
        n_prompt = ids.shape[1]
        token, out.prefill_s, _ = timed_greedy(clock, steps.prefill, cache, row, ids, 0, on_step=on_step)
        out.tokens = [int(token[0])]
        for i in range(new_tokens):
            token, seconds, _ = timed_greedy(clock, steps.decode, cache, [row], [out.tokens[-1]], [n_prompt + i],
                                             on_step=on_step)
            out.step_s.append(seconds)
            out.tokens.append(int(token[0]))
        out.on_fast_path = steps.compiled_for(cache, 1, n_prompt + new_tokens)
        out.kv_length = n_prompt + new_tokens
        return out
