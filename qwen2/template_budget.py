"""A chat template's budget: what one compile or render may use (`TemplateLimits`), the budget of
the compile or render in progress, and the size checks every other part of the sandbox calls.

The budget lives in a ContextVar, not on the template: the app renders one template in several
worker threads at once. A check that fails raises LimitHit (or, while Jinja folds constants at
compile time, _NotFoldable, so the expression is left for run time); qwen2/chat_template.py turns
LimitHit into TokenizerError.
"""

from __future__ import annotations

import contextlib
import math
import time
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class TemplateLimits:
    """What one compile or one render of a chat template may use. A real chat prompt is far
    below every one of these (the model's context is 32k tokens, ~100k characters)."""

    seconds: float = 1.0             # wall clock for one compile, and for one render
    output_chars: int = 1_000_000    # the rendered prompt
    value_len: int = 1_000_000       # characters or items of any one value the template makes
    int_bits: int = 65_536           # bits of any one integer (10**19000 or so)
    range_items: int = 1_000_000     # range() items of one render, all calls together
    source_chars: int = 1_000_000    # the template's own text


DEFAULT_LIMITS = TemplateLimits()


class LimitHit(BaseException):
    """A limit was hit while the template ran. A BaseException so that no `except Exception` on
    the way out (Jinja's runtime, a filter, the constant folder) can swallow it; ChatTemplate
    turns it into TokenizerError."""


class _NotFoldable(Exception):
    """A limit was hit while Jinja folded a constant expression at compile time. An ordinary
    Exception, which Jinja takes as "evaluate this at run time": the expression is checked again
    there if a render ever reaches it."""


@dataclass
class _Run:
    limits: TemplateLimits
    deadline: float
    compiling: bool
    range_left: int


# The compile or render in progress on this thread (or asyncio task); renders run concurrently
# in the app's worker threads, so the budget cannot live on the shared template.
_RUN: ContextVar[_Run | None] = ContextVar("qwen2_chat_template_run", default=None)


def current_run() -> _Run:
    run = _RUN.get()
    if run is None:  # a checked helper used outside compile/render: size limits, no deadline
        run = _Run(DEFAULT_LIMITS, math.inf, False, DEFAULT_LIMITS.range_items)
    return run


def over_limit(what: str, limit: str) -> None:
    run = current_run()
    message = f"{what}, over the limit TemplateLimits.{limit} = {getattr(run.limits, limit):,}"
    raise (_NotFoldable if run.compiling else LimitHit)(message)


def tick() -> None:
    """Raise once the deadline of the compile or render in progress has passed."""
    run = _RUN.get()
    if run is not None and time.monotonic() > run.deadline:
        expired(run.limits.seconds)


def expired(seconds: float):
    raise LimitHit(f"it ran for more than {seconds:g} s, the limit TemplateLimits.seconds")


def check_len(size: int, what: str) -> None:
    if size > current_run().limits.value_len:
        over_limit(f"{what} would be {size:,} characters or items long", "value_len")


def check_bits(bits: float, what: str) -> None:
    if bits > current_run().limits.int_bits:
        over_limit(f"{what} would be an integer of about {bits:,.0f} bits", "int_bits")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_SIZED = (str, bytes, bytearray, list, tuple, dict, set, frozenset)
SEQUENCES = (str, bytes, list, tuple)


def check_value(value):
    """Pass `value` on if it is within the size limits (the after-the-fact half of each check)."""
    if isinstance(value, _SIZED):
        check_len(len(value), f"a {type(value).__name__}")
    elif is_int(value):
        check_bits(value.bit_length(), "a number")
    return value


def text_size(value, limit: int) -> int:
    """About len(str(value)), counted without building the string; stops once past `limit`.

    Containers are walked item by item, so a structure that holds the same list many times over
    (`{% set x = [x, x] %}` repeated) costs at most `limit` steps here instead of being printed as
    2**n items. Strings count their length, other objects a generous fixed width: the estimate
    is within a small factor of the real text, which is checked again once it exists.
    """
    if isinstance(value, str):
        return len(value)
    total, stack, steps = 0, [value], 0
    while stack:
        item = stack.pop()
        steps += 1
        if steps % 4096 == 0:
            tick()
        # Concrete types only: isinstance against an ABC runs Python code, which is slow.
        if isinstance(item, (str, bytes)):
            total += len(item) + 3
        elif isinstance(item, _COLLECTIONS):
            total += 2 + 2 * len(item)
            if total <= limit:
                stack.extend(item)
        elif isinstance(item, dict):
            total += 2 + 4 * len(item)
            if total <= limit:
                stack.extend(item.keys())
                stack.extend(item.values())
        elif is_int(item):
            total += item.bit_length() // 3 + 2
        elif item is None or isinstance(item, (bool, float)):
            total += 24
        else:
            attrs = _namespace_attrs(item)
            if attrs is not None:
                total += 16
                stack.append(attrs)
            else:
                total += 64  # Undefined, loop objects, macros, cyclers: short reprs
        if total > limit:
            return total
    return total


_COLLECTIONS = (list, tuple, set, frozenset, type({}.keys()), type({}.values()), type({}.items()))


def _namespace_attrs(item):
    """The dict behind a Jinja `namespace()` (its repr prints it), or None."""
    try:
        return object.__getattribute__(item, "_Namespace__attrs")
    except AttributeError:
        return None


def text_total(values, start: int = 0) -> int:
    """`start` plus the text_size of each of `values`, counted only until past the value_len limit."""
    limit = current_run().limits.value_len
    total = start
    for value in values:
        if total > limit:
            break
        total += text_size(value, limit)
    return total


def check_text(values, what: str) -> None:
    check_len(text_total(values), what)


@contextlib.contextmanager
def running(limits: TemplateLimits, compiling: bool):
    """A fresh budget, the current one on this thread inside the block."""
    token = _RUN.set(_Run(limits, time.monotonic() + limits.seconds, compiling, limits.range_items))
    try:
        yield
    finally:
        _RUN.reset(token)


# Where a compile's own Python code lives: the deadline is raised only in calls of these modules.
COMPILING_MODULES = ("jinja2.", "markupsafe", "qwen2.template")


def deadline_tracer(seconds: float):
    """A trace function that raises once `seconds` have passed, for compiling: it sees every
    Python call of Jinja's lexer, parser, optimiser and code generator, which have no hooks of
    their own. (Renders are not traced: tracing makes all Python code several times slower,
    and their loops and calls check the deadline themselves.)

    It raises only in the compile's own calls (COMPILING_MODULES): a weakref callback or __del__
    that garbage collection runs in the middle of a compile is traced too, and Python swallows an
    exception raised there and drops the trace function, which ended the deadline for the rest of
    the compile."""
    deadline, clock = time.monotonic() + seconds, time.monotonic

    def on_call(frame, event, arg):
        if clock() > deadline and frame.f_globals.get("__name__", "").startswith(COMPILING_MODULES):
            expired(seconds)

    return on_call

