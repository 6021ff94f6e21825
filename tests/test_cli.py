"""`python -m qwen2`: the terminal chat, one-shot and interactive, in a real subprocess; its refusals
and the byte fallback through its main() in this process (the same code, without a Python start-up
each)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from qwen2.__main__ import main
from tests.helpers import ROOT


def run_cli(*args, stdin: str = "", env_extra=None, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "qwen2", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def prompt_tokens(stats_line: str) -> int:
    """N of "N prompt tokens" in a statistics line (qwen2.stats.ReplyStats.line)."""
    return int(re.search(r"(\d+) prompt tokens", stats_line).group(1))


@pytest.mark.slow
def test_one_shot_prompt_streams_a_reply_and_stats(tiny_model_dir):
    out = run_cli("--model", str(tiny_model_dir), "--prompt", "你好, hello", "--max-new-tokens", "12",
                  "--temperature", "0", "--fast-decode", "off")
    assert out.returncode == 0, out.stderr
    stats = out.stdout.strip().splitlines()[-1]
    assert "prompt tokens" in stats and "first token" in stats and "tok/s" in stats and "cpu" in stats
    new = int(re.search(r"(\d+) new tokens?", stats).group(1))
    assert 0 <= new <= 12  # greedy may meet an end token before the budget


@pytest.mark.slow
def test_interactive_chat_takes_two_turns_then_quits(tiny_model_dir):
    out = run_cli("--model", str(tiny_model_dir), "--max-new-tokens", "4", "--temperature", "0",
                  "--speculate", "lookup", stdin="first question\nsecond question\n\n")
    assert out.returncode == 0, out.stderr
    stats = [line for line in out.stdout.splitlines() if "prompt tokens" in line]
    assert len(stats) == 2
    first, second = (prompt_tokens(line) for line in stats)
    assert second > first  # the second prompt carries the first turn
    # on the engine (--speculate lookup) the conversation's row is kept between turns: the second
    # turn prefills only what is new
    reused = re.search(r"\((\d+) reused\)", stats[1])
    assert reused and int(reused.group(1)) > 0


def test_random_weights_without_tokenizer_uses_byte_fallback(tiny_model_dir, tmp_path, capsys):
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    assert main(["--model", str(tmp_path), "--random-weights", "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert "random weights" in out.err and "prompt tokens" in out.out


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_bad_model_and_bad_setting_give_one_line_errors(tiny_model_dir, tmp_path, capsys, offline_hub):
    assert main(["--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "model directory not found" in _one_error_line(capsys)
    assert main(["--model", str(tiny_model_dir), "--prompt", "hi", "--top-p", "0"]) == 2
    assert "top_p" in _one_error_line(capsys)
    assert main(["--model", str(tiny_model_dir), "--prompt", "hi", "--top-k", "-4", "--fast-decode", "compile"]) == 2
    err = _one_error_line(capsys)
    assert "top_k=-4" in err and "compiling" not in err  # refused before the compile, not after it
    assert main(["--model", "Org/NotCached", "--prompt", "hi"]) == 2  # offline, an empty hub cache
    assert "Org/NotCached" in _one_error_line(capsys)
    for context in ("0", "100000"):  # the tiny model holds 256 positions
        for path in ("lookup", "off"):
            assert main(["--model", str(tiny_model_dir), "--prompt", "hi", "--fast-decode", "off",
                         "--speculate", path, "--context", context]) == 2
            assert f"--context {context}: expected 64 to the model's context (256 tokens)" in _one_error_line(capsys)


def test_speculation_off_the_engines_compiled_steps_decodes_eagerly_and_says_so(tiny_model_dir, capsys):
    """--speculate lookup with --fast-decode graphs (CUDA graphs are the single stream's): the engine
    runs eagerly, and a note names both flags, where the engine used to refuse the setting."""
    assert main(["--model", str(tiny_model_dir), "--prompt", "hello hello", "--max-new-tokens", "4",
                 "--temperature", "0", "--fast-decode", "graphs", "--speculate", "lookup"]) == 0
    out = capsys.readouterr()
    assert "--fast-decode graphs" in out.err and "--speculate off" in out.err and "prompt tokens" in out.out


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(tiny_model_dir, capsys, monkeypatch):
    import qwen2.__main__ as cli

    lines = iter(["first question", "second question", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    real_reply, calls = cli.reply, []

    def reply(chat, tok, messages, args, **kwargs):
        calls.append([m["content"] for m in messages])
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C during the first reply
        return real_reply(chat, tok, messages, args, **kwargs)

    monkeypatch.setattr(cli, "reply", reply)
    assert main(["--model", str(tiny_model_dir), "--max-new-tokens", "4", "--temperature", "0",
                 "--fast-decode", "off", "--speculate", "lookup"]) == 0
    out = capsys.readouterr()
    assert "[stopped" in out.err
    assert calls == [["first question"], ["second question"]]  # the stopped message was dropped
    assert len([line for line in out.out.splitlines() if "prompt tokens" in line]) == 1


@pytest.mark.slow
def test_auto_fast_decode_compiles_at_start_up_on_cpu(tiny_model_dir, capsys):
    """The default (auto) compiles the decode step before the first reply (in the cheap compile mode
    the test run sets, $QWEN2_COMPILE_MODE): on CPU the engine's steps and verification (speculation
    on by default), with --speculate off the single-stream fast path's; each gives the eager greedy
    reply."""
    mode = os.environ["QWEN2_COMPILE_MODE"]
    common = ("--model", str(tiny_model_dir), "--prompt", "hello hello hello", "--max-new-tokens", "12",
              "--temperature", "0", "--fast-decode", "auto")
    engine = run_cli(*common, timeout=400)
    assert engine.returncode == 0, engine.stderr
    assert "compiling the decode step for 1 row" in engine.stderr and "4-token verification" in engine.stderr
    assert f"Inductor {mode})" in engine.stderr and "decode step compiled for 1 row" in engine.stderr
    single = run_cli(*common, "--speculate", "off", timeout=400)
    assert single.returncode == 0, single.stderr
    assert "compiling the CPU decode step" in single.stderr and "compiled in" in single.stderr
    assert f"(Inductor, {mode})" in single.stderr  # the run's cheap mode reached it
    assert main(["--model", str(tiny_model_dir), "--prompt", "hello hello hello", "--max-new-tokens", "12",
                 "--temperature", "0", "--fast-decode", "off", "--speculate", "off"]) == 0
    eager = capsys.readouterr()
    assert "compiling" not in eager.err
    reply = lambda text: text.rsplit("[", 1)[0]  # noqa: E731 - the text before the stats line
    assert reply(engine.stdout) == reply(single.stdout) == reply(eager.out)  # the same greedy reply


def test_show_guesses_underlines_the_tokens_kept_guesses_gave_and_nothing_else(tiny_model_dir, capsys):
    """A greedy reply of random weights loops, and prompt lookup guesses the loop: with --show-guesses
    the pieces of the kept guesses' tokens are underlined; without the escape codes the reply is
    the one printed without the flag, and the statistics line counts as many kept guesses."""
    from qwen2.__main__ import GuessMarks

    common = ["--model", str(tiny_model_dir), "--max-new-tokens", "60", "--temperature", "0",
              "--fast-decode", "off", "--speculate", "lookup", "--prompt", "Say something long."]
    assert main(common) == 0
    plain = capsys.readouterr().out
    assert main([*common, "--show-guesses"]) == 0
    shown = capsys.readouterr().out
    kept = int(re.search(r"(\d+)/\d+ guessed tokens kept", shown).group(1))
    assert kept > 0 and GuessMarks.UNDERLINE not in plain
    marked = re.findall(re.escape(GuessMarks.UNDERLINE) + "(.*?)" + re.escape(GuessMarks.PLAIN), shown, re.DOTALL)
    assert 0 < len(marked) <= kept, (len(marked), kept)  # a piece per token; a token with no text is not marked
    reply = shown.replace(GuessMarks.UNDERLINE, "").replace(GuessMarks.PLAIN, "")
    assert reply[:reply.rindex("\n[")] == plain[:plain.rindex("\n[")]  # the statistics line's times differ
