"""Chat templates: Hugging Face-compatible Jinja, sandboxed and bounded in time and size.

    template = ChatTemplate(source, origin="org/model tokenizer_config.json")
    text = template.render(messages=messages, add_generation_prompt=True, tools=None)

A chat template is code shipped inside a downloaded checkpoint, so it runs in Jinja's immutable
sandbox with the globals Hugging Face provides (`raise_exception`, `tojson`, `strftime_now`), and
any attempt to reach a private attribute fails at once. The sandbox alone stops a template from
escaping, not from exhausting the machine: `{{ 'a' * 10**9 }}` or two nested `range(100000)`
loops would hold a worker for minutes or allocate gigabytes. So every compile and render here is
bounded by `TemplateLimits`:

* a wall-clock deadline, checked at every step that can repeat: each item of every `{% for %}`
  loop (the compiled loops iterate through a guard), every call (macros, recursion, methods),
  filter and test, and inside the size estimates; compiling runs under a trace function instead,
  since Jinja's parser has no such hooks;
* a cap on the rendered text, and on every single string, list or dict the template makes: the
  operations that can amplify a value (`*`, `**`, `+`, `%`, `~`, `str.center`, `str.replace`,
  `str.join`, `str.format`, `|indent`, `|tojson(indent=...)`, ...) are checked *before* they run,
  from an estimate of what they would produce, and every result is checked after;
* a budget of `range()` items per render.

Going over a limit raises TokenizerError naming the template's origin and the limit. Jinja folds
constant expressions at compile time (`{{ 10**(10**9) }}` would hang `from_string`); the checked
operations are never folded past a limit, so a bomb in a branch that is never taken stays
harmless, and one that runs fails at render time.

Known gap: Python compares and hashes nested containers in C, where no deadline can interrupt
it; a template that builds an exponentially shared structure (`{% set x = [x, x] %}` forty times)
and then compares it with `==` can still spin. Printing or serialising such a structure is caught.
"""

from __future__ import annotations

import json
import math
import re
import string
import sys
import time
import types
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import update_wrapper, wraps

from .errors import TokenizerError


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


# --------------------------------------------------------------------------------------------
# Limit bookkeeping


class _LimitHit(BaseException):
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


def _run() -> _Run:
    run = _RUN.get()
    if run is None:  # a checked helper used outside compile/render: size limits, no deadline
        run = _Run(DEFAULT_LIMITS, math.inf, False, DEFAULT_LIMITS.range_items)
    return run


def _hit(what: str, limit: str) -> None:
    run = _run()
    message = f"{what}, over the limit TemplateLimits.{limit} = {getattr(run.limits, limit):,}"
    raise (_NotFoldable if run.compiling else _LimitHit)(message)


def _tick() -> None:
    """Raise once the deadline of the compile or render in progress has passed."""
    run = _RUN.get()
    if run is not None and time.monotonic() > run.deadline:
        _expired(run.limits.seconds)


def _expired(seconds: float):
    raise _LimitHit(f"it ran for more than {seconds:g} s, the limit TemplateLimits.seconds")


def _check_len(size: int, what: str) -> None:
    if size > _run().limits.value_len:
        _hit(f"{what} would be {size:,} characters or items long", "value_len")


def _check_bits(bits: float, what: str) -> None:
    if bits > _run().limits.int_bits:
        _hit(f"{what} would be an integer of about {bits:,.0f} bits", "int_bits")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_SIZED = (str, bytes, bytearray, list, tuple, dict, set, frozenset)
_SEQUENCES = (str, bytes, list, tuple)


def _checked(value):
    """Pass `value` on if it is within the size limits (the after-the-fact half of each check)."""
    if isinstance(value, _SIZED):
        _check_len(len(value), f"a {type(value).__name__}")
    elif _is_int(value):
        _check_bits(value.bit_length(), "a number")
    return value


def _text_size(value, limit: int) -> int:
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
            _tick()
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
        elif _is_int(item):
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


def _check_text(values, what: str) -> None:
    limit = _run().limits.value_len
    total = 0
    for value in values:
        total += _text_size(value, limit)
        if total > limit:
            break
    _check_len(total, what)


def _check_join(original):
    """Wrap one of the runtime's join helpers (`~` compiles to `str_join((a, b, ...))`)."""

    def join(seq):
        seq = tuple(seq)
        _check_text(seq, "the text joined by '~'")
        return original(seq)

    return update_wrapper(join, original)


# --------------------------------------------------------------------------------------------
# Estimates for the operations that can amplify a value


def _check_binop(operator: str, left, right) -> None:
    if operator == "+":
        if isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
            _check_len(len(left) + len(right), "'+'")
        elif _is_int(left) and _is_int(right):
            _check_bits(max(left.bit_length(), right.bit_length()) + 1, "'+'")
    elif operator == "*":
        sequence, count = (left, right) if isinstance(left, _SEQUENCES) else (right, left)
        if isinstance(sequence, _SEQUENCES) and _is_int(count):
            _check_len(len(sequence) * max(count, 0), "'*'")
        elif _is_int(left) and _is_int(right):
            _check_bits(left.bit_length() + right.bit_length(), "'*'")
    elif operator == "**":
        if _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
            limit = _run().limits.int_bits
            bits = right if right > limit else right * math.log2(abs(left))
            _check_bits(bits, "'**'")
    elif operator == "%":
        if isinstance(left, (str, bytes)):
            _check_printf(left, right)


# One printf conversion: %(key)flags width .precision length type
_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[A-Za-z%]")


def _format_inputs(values) -> tuple[int, int]:
    """(largest int, largest text size) among the values a format string can pull in."""
    limit = _run().limits.value_len
    values = list(values)
    widest = max((abs(v) for v in values if _is_int(v)), default=0)
    biggest = max((_text_size(v, limit) for v in values), default=0)
    return widest, biggest


def _check_printf(template, args) -> None:
    """Bound `template % args`: each conversion yields at most its width or precision (a `*`
    takes a width from the arguments) or the text of the largest argument."""
    text = template if isinstance(template, str) else template.decode("latin-1")
    if isinstance(args, Mapping):
        values = args.values()
    else:
        values = args if isinstance(args, tuple) else (args,)
    widest, biggest = _format_inputs(values)
    total = len(text)
    for match in _PRINTF.finditer(text):
        sizes = [widest if g == "*" else int(g) for g in match.groups() if g]
        total += max([biggest, *sizes])
    _check_len(total, "the '%' format")


_FORMATTER = string.Formatter()


def _check_format(template: str, values) -> None:
    """Bound `template.format(...)` the same way: each field yields at most the largest number
    in its spec (width or precision; a nested `{}` takes one from the arguments) or the text of
    the largest argument."""
    try:
        fields = list(_FORMATTER.parse(template))
    except ValueError:
        return  # malformed: the real call raises the same error
    widest, biggest = _format_inputs(values)
    total = len(template)
    for _literal, field, spec, _conversion in fields:
        if field is None:
            continue
        sizes = [int(d) for d in re.findall(r"\d+", spec or "")]
        if spec and "{" in spec:
            sizes.append(widest)
        total += max([biggest, *sizes])
    _check_len(total, "str.format()")


def _format_values(args, kwargs, is_format_map: bool):
    if is_format_map:
        mapping = args[0] if args else {}
        return list(mapping.values()) if isinstance(mapping, Mapping) else []
    return [*args, *kwargs.values()]


# Builtin str/bytes/int methods whose result can be far bigger than their inputs. Each takes
# (owner, args, kwargs), raises past a limit, and returns the args to call with (join
# materialises a generator so it can be measured and still passed on).


def _arg(args, kwargs, index: int, name: str, default):
    return args[index] if len(args) > index else kwargs.get(name, default)


def _method_width(owner, args, kwargs):
    width = _arg(args, kwargs, 0, "width", 0)
    if _is_int(width):
        _check_len(max(len(owner), width), "padding")
    return args


def _method_expandtabs(owner, args, kwargs):
    tabsize = _arg(args, kwargs, 0, "tabsize", 8)
    if _is_int(tabsize):
        tab = "\t" if isinstance(owner, str) else b"\t"
        _check_len(len(owner) + owner.count(tab) * max(tabsize, 0), "expandtabs()")
    return args


def _method_replace(owner, args, kwargs):
    if len(args) < 2:
        return args
    old, new = args[0], args[1]
    count = _arg(args, kwargs, 2, "count", -1)
    try:
        found = owner.count(old) if len(old) else len(owner) + 1
    except TypeError:
        return args  # wrong argument types: the real call raises
    if _is_int(count) and count >= 0:
        found = min(found, count)
    _check_len(len(owner) + found * len(new), "replace()")
    return args


def _method_join(owner, args, kwargs):
    if not args:
        return args
    try:
        items = list(args[0])
    except TypeError:
        return args
    _check_len(len(owner) * max(len(items) - 1, 0)
               + sum(len(i) for i in items if isinstance(i, (str, bytes))), "join()")
    return (items, *args[1:])


def _method_translate(owner, args, kwargs):
    table = _arg(args, kwargs, 0, "table", None)
    if isinstance(owner, str) and isinstance(table, Mapping):
        longest = max((len(v) for v in table.values() if isinstance(v, str)), default=1)
        _check_len(len(owner) * max(longest, 1), "translate()")
    return args


def _method_format(owner, args, kwargs):
    _check_format(owner, _format_values(args, kwargs, False))
    return args


def _method_format_map(owner, args, kwargs):
    _check_format(owner, _format_values(args, kwargs, True))
    return args


def _method_to_bytes(owner, args, kwargs):
    length = _arg(args, kwargs, 0, "length", 1)
    if _is_int(length):
        _check_len(length, "int.to_bytes()")
    return args


_TEXT_METHODS = {
    "center": _method_width, "ljust": _method_width, "rjust": _method_width,
    "zfill": _method_width, "expandtabs": _method_expandtabs, "replace": _method_replace,
    "join": _method_join, "translate": _method_translate,
    # Jinja >= 3.1.5 routes str.format through wrap_str_format; older ones call it directly.
    "format": _method_format, "format_map": _method_format_map,
}


def _method_check(obj):
    """The pre-check for calling `obj`, if it is an amplifying method of a str, bytes or int."""
    if not isinstance(obj, (types.BuiltinMethodType, types.MethodType)):
        return None
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    if isinstance(owner, (str, bytes)):
        return _TEXT_METHODS.get(name)
    if _is_int(owner) and name == "to_bytes":
        return _method_to_bytes
    return None


# Filters: each check takes (value, args, kwargs) -- the filter's input and the arguments after
# it -- raises past a limit and returns the input to use.


def _filter_text(name):
    def check(value, args, kwargs):
        _check_text([value], f"the input of |{name}")
        return value

    return check


def _filter_center(value, args, kwargs):
    width = _arg(args, kwargs, 0, "width", 80)
    size = _text_size(value, _run().limits.value_len)
    _check_len(max(size, width if _is_int(width) else 0), "|center")
    return value


def _filter_indent(value, args, kwargs):
    width = _arg(args, kwargs, 0, "width", 4)
    pad = width if _is_int(width) else len(width) if isinstance(width, str) else 0
    size = _text_size(value, _run().limits.value_len)
    lines = value.count("\n") + 1 if isinstance(value, str) else size + 1
    _check_len(size + lines * max(pad, 0), "|indent")
    return value


def _filter_wordwrap(value, args, kwargs):
    wrap = _arg(args, kwargs, 2, "wrapstring", None)
    size = _text_size(value, _run().limits.value_len)
    # At worst a break after every character.
    _check_len(size * (1 + (len(wrap) if isinstance(wrap, str) else 1)), "|wordwrap")
    return value


def _filter_replace(value, args, kwargs):
    _check_text([value], "the input of |replace")
    if isinstance(value, str) and len(args) >= 2:
        count = _arg(args, kwargs, 2, "count", None)
        _method_replace(value, (str(args[0]), str(args[1]), -1 if count is None else count), {})
    return value


def _filter_join(value, args, kwargs):
    items = list(value)
    separator = _arg(args, kwargs, 0, "d", "")
    limit = _run().limits.value_len
    total = _text_size(separator, limit) * max(len(items) - 1, 0)
    for item in items:
        if total > limit:
            break
        total += _text_size(item, limit)
    _check_len(total, "|join")
    return items


def _filter_format(value, args, kwargs):
    if isinstance(value, str):
        _check_printf(value, kwargs or tuple(args))
    return value


def _filter_batch(value, args, kwargs):
    count = _arg(args, kwargs, 0, "linecount", 0)
    if _arg(args, kwargs, 1, "fill_with", None) is not None and _is_int(count):
        _check_len(count, "|batch's padding")  # pads the last batch to `count` items
    return value


def _filter_slice(value, args, kwargs):
    count = _arg(args, kwargs, 0, "slices", 0)
    if _is_int(count):
        _check_len(count, "|slice's slice count")  # makes `count` lists, even empty ones
    return value


def _filter_sum(value, args, kwargs):
    start = _arg(args, kwargs, 1, "start", 0)
    if not isinstance(start, _SEQUENCES):
        return value
    items = list(value)  # summing sequences concatenates them
    limit = _run().limits.value_len
    total = len(start)
    for item in items:
        if total > limit:
            break
        total += _text_size(item, limit)
    _check_len(total, "|sum")
    return items


_STRINGIFYING_FILTERS = (
    "capitalize", "e", "escape", "forceescape", "lower", "pprint", "safe", "string", "striptags",
    "title", "trim", "truncate", "upper", "urlencode", "urlize", "wordcount", "xmlattr",
)

_FILTER_CHECKS = {
    **{name: _filter_text(name) for name in _STRINGIFYING_FILTERS},
    "center": _filter_center, "indent": _filter_indent, "wordwrap": _filter_wordwrap,
    "replace": _filter_replace, "join": _filter_join, "format": _filter_format,
    "batch": _filter_batch, "slice": _filter_slice, "sum": _filter_sum,
}


def _wrap_filter(name: str, func):
    """`func` with a size check after it (and the filter's pre-check before it, if it has one).
    Keeps Jinja's pass-context marker, so the first argument is still what Jinja passes."""
    check = _FILTER_CHECKS.get(name)
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0

    @wraps(func)
    def checked(*args, **kwargs):
        _tick()
        if check is not None and len(args) > skip:
            value = check(args[skip], args[skip + 1:], kwargs)
            args = (*args[:skip], value, *args[skip + 1:])
        return _checked(func(*args, **kwargs))

    return checked


def _wrap_test(func):
    """`func` with a deadline check: `select`/`reject` call tests once per item."""

    @wraps(func)
    def ticking(*args, **kwargs):
        _tick()
        return func(*args, **kwargs)

    return ticking


def _guard_loop(iterable):
    """What every `{% for %}` iterates over (see _guard_loops): the items of `iterable`, with a
    deadline check every 64 of them, so loops that call nothing still stop in time."""
    run = _run()
    deadline, clock = run.deadline, time.monotonic
    for n, item in enumerate(iterable):
        if n % 64 == 0 and clock() > deadline:
            _expired(run.limits.seconds)
        yield item


def _guard_loops(ast, env) -> None:
    """Rewrite each `{% for x in EXPR %}` of the parsed template as `{% for x in
    environment.guard_loop(EXPR) %}` (an environment attribute: templates cannot name it)."""
    from jinja2 import nodes

    for loop in ast.find_all(nodes.For):
        guard = nodes.Call(nodes.EnvironmentAttribute("guard_loop"), [loop.iter], [], None, None)
        loop.iter = guard.set_lineno(loop.iter.lineno).set_environment(env)


# --------------------------------------------------------------------------------------------
# Globals and filters Hugging Face adds


def _raise_exception(message):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """HF's tojson: json.dumps, non-ASCII kept as is (Jinja's own escapes for HTML)."""
    limit = _run().limits.value_len
    if indent is None:
        # One JSON character per character of text, at most 12 for an escape (a surrogate
        # pair), plus the separators: when that bound fits, dump in one go (in C).
        extra = sum(len(s) for s in separators if isinstance(s, str)) if separators else 4
        if _text_size(x, limit) * (12 + extra) <= limit:
            return json.dumps(x, ensure_ascii=ensure_ascii, separators=separators,
                              sort_keys=sort_keys)
    elif _is_int(indent):
        _check_len(indent, "tojson's indent")  # json builds ' ' * indent up front
    # Otherwise piece by piece, so that output past the limit is never built.
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                               sort_keys=sort_keys)
    pieces, size = [], 0
    for n, piece in enumerate(encoder.iterencode(x)):
        size += len(piece)
        if size > limit:
            _check_len(size, "tojson's output")
        if n % 1024 == 0:
            _tick()
        pieces.append(piece)
    return "".join(pieces)


def _strftime_now(format):
    return datetime.now().strftime(format)


def _make_range(jinja_range):
    def range_(*args):
        items = jinja_range(*args)  # Jinja's own per-call cap (100,000 items) stays
        run = _run()
        run.range_left -= len(items)
        if run.range_left < 0:
            _hit("range() calls would make more items than allowed", "range_items")
        return items

    return range_


def _make_lipsum(jinja_lipsum):
    def lipsum(n=5, html=True, min=20, max=100):
        if _is_int(n) and _is_int(max):
            _check_len(n * max * 12, "lipsum()")  # up to `max` words of ~12 characters each
        return jinja_lipsum(n, html, min, max)

    return lipsum


# --------------------------------------------------------------------------------------------
# The environment


def _environment():
    """A fresh Jinja environment: HF's configuration, in an immutable sandbox with the checks."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        # Intercepted operators go through call_binop, and are never folded at compile time.
        intercepted_binops = frozenset({"+", "*", "**", "%"})

        guard_loop = staticmethod(_guard_loop)

        # Joins the output of macros, {% set %} blocks, {% filter %} blocks and caller().
        @staticmethod
        def concat(parts):
            parts = list(parts)
            _check_len(sum(len(p) for p in parts), "a block's text")
            return "".join(parts)

        def call_binop(self, context, operator, left, right):
            if operator == "+" and type(left) is str and type(right) is str:
                # What templates do most (`'<|im_start|>' + message.role + '\n'`): kept cheap.
                _check_len(len(left) + len(right), "'+'")
                return left + right
            _check_binop(operator, left, right)
            return _checked(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's signature)
            _tick()  # macros, recursive loops and caller() all come through here
            check = _method_check(__obj)
            if check is not None:
                args = check(__obj.__self__, args, kwargs)
            return _checked(super().call(__context, __obj, *args, **kwargs))

        def wrap_str_format(self, value):
            wrapper = super().wrap_str_format(value)
            if wrapper is None:
                return None
            template, is_format_map = value.__self__, value.__name__ == "format_map"

            def checked_format(*args, **kwargs):
                _check_format(template, _format_values(args, kwargs, is_format_map))
                return _checked(wrapper(*args, **kwargs))

            return update_wrapper(checked_format, value)

        # The stock sandbox returns a silent Undefined for `x.__class__`, which renders as ""
        # and only fails if used further; fail at the first unsafe access instead.
        def unsafe_undefined(self, obj, attribute):
            raise SecurityError(
                f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
            )

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, finalize=_finalize,
                         extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _wrap_filter(name, f) for name, f in env.filters.items()}
    env.tests = {name: _wrap_test(f) for name, f in env.tests.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["range"] = _make_range(env.globals["range"])
    env.globals["lipsum"] = _make_lipsum(env.globals["lipsum"])
    return env


def _finalize(value):
    """Every `{{ expression }}` passes through here before Jinja calls str() on it."""
    if type(value) is str:
        _check_len(len(value), "an output value")
    else:
        _check_text([value], "an output value")
    return value


def _guard_joins(template) -> None:
    """`~` compiles to a call of the runtime's str_join/markup_join, imported into the
    template's module; swap in checked versions there (the environment has no hook for it)."""
    namespace = template.root_render_func.__globals__
    for name in ("str_join", "markup_join"):
        if name in namespace:
            namespace[name] = _check_join(namespace[name])


def _start(limits: TemplateLimits, compiling: bool):
    """Make a fresh budget the current one on this thread; returns the token that resets it."""
    run = _Run(limits, time.monotonic() + limits.seconds, compiling, limits.range_items)
    return _RUN.set(run)


def _deadline_tracer(seconds: float):
    """A trace function that raises once `seconds` have passed, for compiling: it sees every
    Python call of Jinja's lexer, parser, optimiser and code generator, which have no hooks of
    their own. (Renders are not traced: tracing makes all Python code several times slower,
    and their loops and calls check the deadline themselves.)"""
    deadline, clock = time.monotonic() + seconds, time.monotonic

    def on_call(frame, event, arg):
        if clock() > deadline:
            _expired(seconds)

    return on_call


def _compile(source: str, limits: TemplateLimits):
    """(the names the template reads, the compiled template), under the compile deadline."""
    from jinja2 import nodes

    env = _environment()
    _ = env.lexer  # built (and cached) untraced: compiling its regexes is slow under a tracer
    token = _start(limits, compiling=True)
    previous = sys.gettrace()  # a debugger's or coverage's tracer, put back below
    sys.settrace(_deadline_tracer(limits.seconds))
    try:
        ast = env.parse(source)
        variables = frozenset(n.name for n in ast.find_all(nodes.Name) if n.ctx == "load")
        _guard_loops(ast, env)
        template = env.from_string(ast)
    finally:
        sys.settrace(previous)  # first: a Python-level call here could still be interrupted
        _RUN.reset(token)
    _guard_joins(template)
    return variables, template


# --------------------------------------------------------------------------------------------
# The template


class ChatTemplate:
    """One compiled chat template. `origin` names where it came from, for error messages.

    Attributes: source, origin, limits, variables (every variable name the template reads,
    e.g. {"messages", "tools", "add_generation_prompt", "loop", ...}).
    Raises TokenizerError when the source does not compile or is over a limit.
    """

    def __init__(self, source: str, origin: str, limits: TemplateLimits = DEFAULT_LIMITS):
        if not isinstance(source, str):
            raise TokenizerError(f"chat template from {origin} must be a string, "
                                 f"got {type(source).__name__}")
        if len(source) > limits.source_chars:
            raise TokenizerError(
                f"chat template from {origin} is {len(source):,} characters long, over the "
                f"limit TemplateLimits.source_chars = {limits.source_chars:,}"
            )
        self.source, self.origin, self.limits = source, origin, limits
        try:
            self.variables, self._template = _compile(source, limits)
        except _LimitHit as hit:
            raise TokenizerError(f"chat template from {origin} does not compile: {hit}") from None
        except Exception as exc:  # TemplateSyntaxError, RecursionError and friends
            raise TokenizerError(f"chat template from {origin} does not compile: {exc}") from exc

    def render(self, limits: TemplateLimits | None = None, /, **variables) -> str:
        """The template's text for `variables` (under `limits`, by default those it was compiled
        with); TokenizerError if it fails or hits a limit."""
        limits = limits or self.limits
        pieces, size = [], 0
        try:
            token = _start(limits, compiling=False)
            try:
                for piece in self._template.generate(**variables):
                    size += len(piece)
                    if size > limits.output_chars:
                        _hit("the rendered text would be longer", "output_chars")
                    pieces.append(piece)
            finally:
                _RUN.reset(token)
        except _LimitHit as hit:
            raise TokenizerError(f"chat template from {self.origin} was stopped: {hit}") from None
        except Exception as exc:  # SecurityError, raise_exception(), TypeError, UndefinedError
            raise TokenizerError(
                f"chat template from {self.origin} failed to render "
                f"({type(exc).__name__}): {exc}"
            ) from exc
        return "".join(pieces)
