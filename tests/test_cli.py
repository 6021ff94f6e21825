"""`python -m qwen2`: the terminal chat, one-shot and interactive, in a real subprocess."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, stdin: str = "", env_extra=None, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "qwen2", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def test_one_shot_prompt_streams_a_reply_and_stats(tiny_model_dir):
    out = run_cli("--model", str(tiny_model_dir), "--prompt", "你好, hello", "--max-new-tokens", "12",
                  "--temperature", "0", "--fast-decode", "off")
    assert out.returncode == 0, out.stderr
    stats = out.stdout.strip().splitlines()[-1]
    assert "prompt tokens" in stats and "first token" in stats and "tok/s" in stats and "cpu" in stats
    new = int(stats.split(" new tokens")[0].split()[-1])
    assert 0 <= new <= 12  # greedy may meet an end token before the budget


def test_interactive_chat_takes_two_turns_then_quits(tiny_model_dir):
    out = run_cli("--model", str(tiny_model_dir), "--max-new-tokens", "4", "--temperature", "0",
                  stdin="first question\nsecond question\n\n")
    assert out.returncode == 0, out.stderr
    stats = [line for line in out.stdout.splitlines() if "prompt tokens" in line]
    assert len(stats) == 2
    first, second = (int(re.search(r"(\d+) prompt tokens", line).group(1)) for line in stats)
    assert second > first  # the second prompt carries the first turn


def test_random_weights_without_tokenizer_uses_byte_fallback(tiny_model_dir, tmp_path):
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    out = run_cli("--model", str(tmp_path), "--random-weights", "--prompt", "hi", "--max-new-tokens", "3")
    assert out.returncode == 0, out.stderr
    assert "random weights" in out.stderr


def test_bad_model_and_bad_setting_give_one_line_errors(tiny_model_dir, tmp_path):
    out = run_cli("--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert out.returncode == 2 and "model directory not found" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("--model", str(tiny_model_dir), "--prompt", "hi", "--top-p", "0")
    assert out.returncode == 2 and "top_p" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("--model", "Org/NotCached", "--prompt", "hi", env_extra={"HF_HUB_CACHE": str(tmp_path)})
    assert out.returncode == 2 and "Org/NotCached" in out.stderr and "Traceback" not in out.stderr


def test_auto_fast_decode_compiles_at_start_up_on_cpu(tiny_model_dir):
    out = run_cli("--model", str(tiny_model_dir), "--prompt", "hello", "--max-new-tokens", "6",
                  "--temperature", "0", "--fast-decode", "auto", timeout=400)
    assert out.returncode == 0, out.stderr
    assert "compiling the CPU decode step" in out.stderr and "compiled in" in out.stderr
    eager = run_cli("--model", str(tiny_model_dir), "--prompt", "hello", "--max-new-tokens", "6",
                    "--temperature", "0", "--fast-decode", "off")
    assert "compiling" not in eager.stderr
    reply = lambda o: o.stdout.rsplit("[", 1)[0]  # noqa: E731 - the text before the stats line
    assert reply(out) == reply(eager)  # the compiled step gives the same greedy reply
