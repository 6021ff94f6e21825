"""ReplyStats.line: the per-reply statistics under every chat reply say why a reply ended, count once,
and speak English ("1 new token")."""

from __future__ import annotations

from qwen2.stats import ReplyStats


def stats(**fields) -> ReplyStats:
    base = dict(prompt_tokens=42, new_tokens=17, ttft_s=0.12, decode_s=0.68, device="cpu", dtype="float32",
                context_used=59, context_limit=8192)
    return ReplyStats(**{**base, **fields})


def test_a_reply_that_ended_by_itself():
    line = stats(end="stop").line()
    assert line.startswith("42 prompt tokens · 17 new tokens · first token 120 ms · 23.5 tok/s"), line
    assert "stopped" not in line and "limit" not in line


def test_the_reason_comes_first_and_the_count_once():
    assert stats(stopped=True, end="cancelled").line().startswith("stopped after 17 new tokens · 42 prompt tokens")
    assert stats(stopped=True, end="time").line().startswith("stopped by the time limit after 17 new tokens")
    length = stats(end="length", new_tokens=512).line()
    assert length.startswith("length limit reached: 512 new tokens · 42 prompt tokens"), length
    for line in (stats(stopped=True, end="cancelled").line(), length):
        assert line.count("new token") == 1, line


def test_one_token_is_singular():
    line = stats(new_tokens=1, decode_s=0.0, end="stop").line()
    assert "1 new token ·" in line and "1 new tokens" not in line and "decode n/a (1 token)" in line
    assert stats(new_tokens=1, stopped=True, end="cancelled").line().startswith("stopped after 1 new token ·")
