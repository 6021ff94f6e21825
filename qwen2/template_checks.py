"""The checks on what a template can amplify: each operation that can make a value far bigger than
its inputs is bounded *before* it runs, from an estimate of what it would produce.

Binary operators (`+`, `*`, `**`, `%`), the str/bytes/int methods (`center`, `replace`, `join`,
`format`, `to_bytes`, ...) and the filters (`|indent`, `|join`, `|sum`, ...): qwen2/template_sandbox.py
routes each through the check here; the budget and the size limits are qwen2/template_budget.py's.
"""

from __future__ import annotations

import math
import re
import string
import types
from collections.abc import Mapping
from functools import wraps

from .template_budget import (
    SEQUENCES,
    check_bits,
    check_len,
    check_text,
    check_value,
    current_run,
    is_int,
    text_size,
    text_total,
    tick,
)


def check_binop(operator: str, left, right) -> None:
    if operator == "+":
        if isinstance(left, SEQUENCES) and isinstance(right, SEQUENCES):
            check_len(len(left) + len(right), "'+'")
        elif is_int(left) and is_int(right):
            check_bits(max(left.bit_length(), right.bit_length()) + 1, "'+'")
    elif operator == "*":
        sequence, count = (left, right) if isinstance(left, SEQUENCES) else (right, left)
        if isinstance(sequence, SEQUENCES) and is_int(count):
            check_len(len(sequence) * max(count, 0), "'*'")
        elif is_int(left) and is_int(right):
            check_bits(left.bit_length() + right.bit_length(), "'*'")
    elif operator == "**":
        if is_int(left) and is_int(right) and right > 0 and abs(left) > 1:
            limit = current_run().limits.int_bits
            bits = right if right > limit else right * math.log2(abs(left))
            check_bits(bits, "'**'")
    elif operator == "%":
        if isinstance(left, (str, bytes)):
            _check_printf(left, right)


# One printf conversion: %(key)flags width .precision length type
_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[A-Za-z%]")


def _format_inputs(values) -> tuple[int, int]:
    """(largest int, largest text size) among the values a format string can pull in."""
    limit = current_run().limits.value_len
    values = list(values)
    widest = max((abs(v) for v in values if is_int(v)), default=0)
    biggest = max((text_size(v, limit) for v in values), default=0)
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
    check_len(total, "the '%' format")


_FORMATTER = string.Formatter()


def check_format(template: str, values) -> None:
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
    check_len(total, "str.format()")


def format_values(args, kwargs, is_format_map: bool):
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
    if is_int(width):
        check_len(max(len(owner), width), "padding")
    return args


def _method_expandtabs(owner, args, kwargs):
    tabsize = _arg(args, kwargs, 0, "tabsize", 8)
    if is_int(tabsize):
        tab = "\t" if isinstance(owner, str) else b"\t"
        check_len(len(owner) + owner.count(tab) * max(tabsize, 0), "expandtabs()")
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
    if is_int(count) and count >= 0:
        found = min(found, count)
    check_len(len(owner) + found * len(new), "replace()")
    return args


def _method_join(owner, args, kwargs):
    if not args:
        return args
    try:
        items = list(args[0])
    except TypeError:
        return args
    check_len(len(owner) * max(len(items) - 1, 0)
               + sum(len(i) for i in items if isinstance(i, (str, bytes))), "join()")
    return (items, *args[1:])


def _method_translate(owner, args, kwargs):
    table = _arg(args, kwargs, 0, "table", None)
    if isinstance(owner, str) and isinstance(table, Mapping):
        longest = max((len(v) for v in table.values() if isinstance(v, str)), default=1)
        check_len(len(owner) * max(longest, 1), "translate()")
    return args


def _method_format(is_format_map: bool):
    def check(owner, args, kwargs):
        check_format(owner, format_values(args, kwargs, is_format_map))
        return args

    return check


def _method_to_bytes(owner, args, kwargs):
    length = _arg(args, kwargs, 0, "length", 1)
    if is_int(length):
        check_len(length, "int.to_bytes()")
    return args


_TEXT_METHODS = {
    "center": _method_width, "ljust": _method_width, "rjust": _method_width,
    "zfill": _method_width, "expandtabs": _method_expandtabs, "replace": _method_replace,
    "join": _method_join, "translate": _method_translate,
    # Jinja >= 3.1.5 routes str.format through wrap_str_format; older ones call it directly.
    "format": _method_format(False), "format_map": _method_format(True),
}


def method_check(obj):
    """The pre-check for calling `obj`, if it is an amplifying method of a str, bytes or int."""
    if not isinstance(obj, (types.BuiltinMethodType, types.MethodType)):
        return None
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    if isinstance(owner, (str, bytes)):
        return _TEXT_METHODS.get(name)
    if is_int(owner) and name == "to_bytes":
        return _method_to_bytes
    return None


# Filters: each check takes (value, args, kwargs) -- the filter's input and the arguments after
# it -- raises past a limit and returns the input to use.


def _filter_text(name):
    def check(value, args, kwargs):
        check_text([value], f"the input of |{name}")
        return value

    return check


def _filter_center(value, args, kwargs):
    width = _arg(args, kwargs, 0, "width", 80)
    size = text_size(value, current_run().limits.value_len)
    check_len(max(size, width if is_int(width) else 0), "|center")
    return value


def _filter_indent(value, args, kwargs):
    width = _arg(args, kwargs, 0, "width", 4)
    pad = width if is_int(width) else len(width) if isinstance(width, str) else 0
    size = text_size(value, current_run().limits.value_len)
    lines = value.count("\n") + 1 if isinstance(value, str) else size + 1
    check_len(size + lines * max(pad, 0), "|indent")
    return value


def _filter_wordwrap(value, args, kwargs):
    wrap = _arg(args, kwargs, 2, "wrapstring", None)
    size = text_size(value, current_run().limits.value_len)
    # At worst a break after every character.
    check_len(size * (1 + (len(wrap) if isinstance(wrap, str) else 1)), "|wordwrap")
    return value


def _filter_replace(value, args, kwargs):
    check_text([value], "the input of |replace")
    if isinstance(value, str) and len(args) >= 2:
        count = _arg(args, kwargs, 2, "count", None)
        _method_replace(value, (str(args[0]), str(args[1]), -1 if count is None else count), {})
    return value


def _filter_join(value, args, kwargs):
    items = list(value)
    separator = _arg(args, kwargs, 0, "d", "")
    separators = text_size(separator, current_run().limits.value_len) * max(len(items) - 1, 0)
    check_len(text_total(items, start=separators), "|join")
    return items


def _filter_format(value, args, kwargs):
    if isinstance(value, str):
        _check_printf(value, kwargs or tuple(args))
    return value


def _filter_batch(value, args, kwargs):
    count = _arg(args, kwargs, 0, "linecount", 0)
    if _arg(args, kwargs, 1, "fill_with", None) is not None and is_int(count):
        check_len(count, "|batch's padding")  # pads the last batch to `count` items
    return value


def _filter_slice(value, args, kwargs):
    count = _arg(args, kwargs, 0, "slices", 0)
    if is_int(count):
        check_len(count, "|slice's slice count")  # makes `count` lists, even empty ones
    return value


def _filter_sum(value, args, kwargs):
    start = _arg(args, kwargs, 1, "start", 0)
    if not isinstance(start, SEQUENCES):
        return value
    items = list(value)  # summing sequences concatenates them
    check_len(text_total(items, start=len(start)), "|sum")
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


def wrap_filter(name: str, func):
    """`func` with a size check after it (and the filter's pre-check before it, if it has one).
    Keeps Jinja's pass-context marker, so the first argument is still what Jinja passes."""
    check = _FILTER_CHECKS.get(name)
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0

    @wraps(func)
    def checked(*args, **kwargs):
        tick()
        if check is not None and len(args) > skip:
            value = check(args[skip], args[skip + 1:], kwargs)
            args = (*args[:skip], value, *args[skip + 1:])
        return check_value(func(*args, **kwargs))

    return checked


def wrap_test(func):
    """`func` with a deadline check: `select`/`reject` call tests once per item."""

    @wraps(func)
    def ticking(*args, **kwargs):
        tick()
        return func(*args, **kwargs)

    return ticking

