"""A visitor's sampling settings, checked by name before anything runs: the page's sliders keep
their ranges, but an API client may send anything (a string, null, 2.5 for top_k, 0.0 for top_p).

Every message names the parameter as the API spells it and the range it takes ("top_p=0.0 is
invalid; expected in (0, 1] (1 = off)"): the runtime's own check (qwen2.sampling) speaks for the
sampling knobs, whatever the sliders allow.
"""

from __future__ import annotations

from qwen2.errors import Qwen2Error
from qwen2.sampling import SamplingSettings, check_seed

from .errors import VisitorError


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 30 else f"{text[:27]}..."


def _number(name: str, value) -> float:
    """A setting that must be a number: JSON gives int or float; anything else (a string, null, a
    list) is refused by name before the runtime's own range check."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise VisitorError(f"{name}={_shown(value)} is invalid; expected a number")
    return float(value)


def _whole(name: str, value, expected: str) -> int:
    """A setting that must be a whole number (3 and 3.0 alike; 2.5, inf and nan refused)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise VisitorError(f"{name}={_shown(value)} is invalid; expected {expected}")
    return value


def checked_sampling(temperature, top_p, top_k, repetition_penalty, min_p=0.0) -> SamplingSettings:
    try:
        return SamplingSettings(
            temperature=_number("temperature", temperature), top_p=_number("top_p", top_p),
            top_k=_whole("top_k", top_k, "an integer >= 0 (0 = off)"), min_p=_number("min_p", min_p),
            repetition_penalty=_number("repetition_penalty", repetition_penalty))
    except Qwen2Error as exc:
        raise VisitorError(str(exc)) from None


def checked_seed(seed) -> int | None:
    """The seed to sample with; None (a random one) for None or any seed below 0."""
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and seed < 0):
        return None
    try:
        return check_seed(seed)
    except Qwen2Error as exc:
        raise VisitorError(str(exc)) from None


def checked_new_tokens(max_new_tokens, most: int | None = None) -> int:
    """max_new_tokens as a whole number in [1, most] (`most`: the server's cap, --max-new-tokens)."""
    expected = "an integer >= 1" if most is None else f"an integer in [1, {most}]"
    value = _whole("max_new_tokens", max_new_tokens, expected)
    if value < 1 or (most is not None and value > most):
        raise VisitorError(f"max_new_tokens={value} is invalid; expected {expected}"
                           + ("" if most is None else " (this server's limit)"))
    return value
