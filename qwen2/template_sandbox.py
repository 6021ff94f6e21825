"""The bounded sandbox a chat template runs in: Jinja's immutable sandbox, configured as Hugging
Face configures it, with every step that can repeat or amplify routed through a check.

    variables, template = compile_template(source, limits)   # under the compile deadline
    with running(limits, compiling=False): template.generate(**variables)   # qwen2/chat_template.py

Loops iterate through a guard that checks the deadline; calls, filters and tests tick it too;
operators, methods and filters that can amplify a value are checked first (qwen2/template_checks.py);
`~` joins, block text and every `{{ expression }}` are measured; range() draws from the render's
budget (qwen2/template_budget.py).
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from functools import update_wrapper

from .template_budget import (
    TemplateLimits,
    check_len,
    check_text,
    check_value,
    current_run,
    deadline_tracer,
    expired,
    is_int,
    over_limit,
    running,
    text_size,
    tick,
)
from .template_checks import check_binop, check_format, format_values, method_check, wrap_filter, wrap_test


# --------------------------------------------------------------------------------------------
# Loops, joins and output: the steps Jinja compiles into the template's own code


def _guard_loop(iterable):
    """What every `{% for %}` iterates over (see _guard_loops): the items of `iterable`, with a
    deadline check every 64 of them, so loops that call nothing still stop in time."""
    run = current_run()
    deadline, clock = run.deadline, time.monotonic
    for n, item in enumerate(iterable):
        if n % 64 == 0 and clock() > deadline:
            expired(run.limits.seconds)
        yield item


def _guard_loops(ast, env) -> None:
    """Rewrite each `{% for x in EXPR %}` of the parsed template as `{% for x in
    environment.guard_loop(EXPR) %}` (an environment attribute: templates cannot name it)."""
    from jinja2 import nodes

    for loop in ast.find_all(nodes.For):
        guard = nodes.Call(nodes.EnvironmentAttribute("guard_loop"), [loop.iter], [], None, None)
        loop.iter = guard.set_lineno(loop.iter.lineno).set_environment(env)


def _check_join(original):
    """Wrap one of the runtime's join helpers (`~` compiles to `str_join((a, b, ...))`)."""

    def join(seq):
        seq = tuple(seq)
        check_text(seq, "the text joined by '~'")
        return original(seq)

    return update_wrapper(join, original)


def _guard_joins(template) -> None:
    """`~` compiles to a call of the runtime's str_join/markup_join, imported into the
    template's module; swap in checked versions there (the environment has no hook for it)."""
    namespace = template.root_render_func.__globals__
    for name in ("str_join", "markup_join"):
        if name in namespace:
            namespace[name] = _check_join(namespace[name])


def _finalize(value):
    """Every `{{ expression }}` passes through here before Jinja calls str() on it."""
    if type(value) is str:
        check_len(len(value), "an output value")
    else:
        check_text([value], "an output value")
    return value


# --------------------------------------------------------------------------------------------
# Globals and filters Hugging Face adds


def _raise_exception(message):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """HF's tojson: json.dumps, non-ASCII kept as is (Jinja's own escapes for HTML)."""
    limit = current_run().limits.value_len
    if indent is None:
        # One JSON character per character of text, at most 12 for an escape (a surrogate
        # pair), plus the separators: when that bound fits, dump in one go (in C).
        extra = sum(len(s) for s in separators if isinstance(s, str)) if separators else 4
        if text_size(x, limit) * (12 + extra) <= limit:
            return json.dumps(x, ensure_ascii=ensure_ascii, separators=separators,
                              sort_keys=sort_keys)
    elif is_int(indent):
        check_len(indent, "tojson's indent")  # json builds ' ' * indent up front
    # Otherwise piece by piece, so that output past the limit is never built.
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                               sort_keys=sort_keys)
    pieces, size = [], 0
    for n, piece in enumerate(encoder.iterencode(x)):
        size += len(piece)
        if size > limit:
            check_len(size, "tojson's output")
        if n % 1024 == 0:
            tick()
        pieces.append(piece)
    return "".join(pieces)


def _strftime_now(format):
    return datetime.now().strftime(format)


def _make_range(jinja_range):
    def range_(*args):
        items = jinja_range(*args)  # Jinja's own per-call cap (100,000 items) stays
        run = current_run()
        run.range_left -= len(items)
        if run.range_left < 0:
            over_limit("range() calls would make more items than allowed", "range_items")
        return items

    return range_


def _make_lipsum(jinja_lipsum):
    def lipsum(n=5, html=True, min=20, max=100):
        if is_int(n) and is_int(max):
            check_len(n * max * 12, "lipsum()")  # up to `max` words of ~12 characters each
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
            check_len(sum(len(p) for p in parts), "a block's text")
            return "".join(parts)

        def call_binop(self, context, operator, left, right):
            if operator == "+" and type(left) is str and type(right) is str:
                # What templates do most (`'<|im_start|>' + message.role + '\n'`): kept cheap.
                check_len(len(left) + len(right), "'+'")
                return left + right
            check_binop(operator, left, right)
            return check_value(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's signature)
            tick()  # macros, recursive loops and caller() all come through here
            check = method_check(__obj)
            if check is not None:
                args = check(__obj.__self__, args, kwargs)
            return check_value(super().call(__context, __obj, *args, **kwargs))

        def wrap_str_format(self, value):
            wrapper = super().wrap_str_format(value)
            if wrapper is None:
                return None
            template, is_format_map = value.__self__, value.__name__ == "format_map"

            def checked_format(*args, **kwargs):
                check_format(template, format_values(args, kwargs, is_format_map))
                return check_value(wrapper(*args, **kwargs))

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
    env.filters = {name: wrap_filter(name, f) for name, f in env.filters.items()}
    env.tests = {name: wrap_test(f) for name, f in env.tests.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["range"] = _make_range(env.globals["range"])
    env.globals["lipsum"] = _make_lipsum(env.globals["lipsum"])
    return env


def compile_template(source: str, limits: TemplateLimits):
    """(the names the template reads, the compiled template), under the compile deadline."""
    from jinja2 import nodes

    env = _environment()
    _ = env.lexer  # built (and cached) untraced: compiling its regexes is slow under a tracer
    with running(limits, compiling=True):
        previous = sys.gettrace()  # a debugger's or coverage's tracer, put back below
        sys.settrace(deadline_tracer(limits.seconds))
        try:
            ast = env.parse(source)
            variables = frozenset(n.name for n in ast.find_all(nodes.Name) if n.ctx == "load")
            _guard_loops(ast, env)
            template = env.from_string(ast)
        finally:
            sys.settrace(previous)  # first: a Python-level call here could still be interrupted
        tick()  # a compile that outran its deadline without a traced call to stop it
    _guard_joins(template)
    return variables, template
