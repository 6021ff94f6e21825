"""`python -m profiling.bench` and `python -m profiling.report`: output files and bad input.

Bad input must end in one "error: ..." line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import profiling
from profiling.bench import main, output_paths
from tests.helpers import make_checkpoint

pytest.importorskip("qwen2")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("cli-ckpt"), with_tokenizer=False)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def _fails(argv, capsys) -> str:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse refusals
        code = exc.code
    assert code not in (0, None)
    return _one_error_line(capsys.readouterr().err)


def test_bench_writes_a_run_file(ckpt, tmp_path, capsys):
    out = tmp_path / "run.json"
    assert main(["--model", str(ckpt), "--prompt-tokens", "8", "--new-tokens", "3",
                 "--out", str(out), "--no-progress"]) == 0
    run = profiling.load_run(out)
    assert run["prompt_tokens"] == 8 and run["new_tokens"] == 3 and run["device"] == "cpu"
    assert len(run["layers"]) == 2
    assert "decode" in capsys.readouterr().out


def test_bench_several_dtypes_write_one_file_each(ckpt, tmp_path, capsys):
    out = tmp_path / "run.json"
    assert main(["--model", str(ckpt), "--random-weights", "--dtype", "float32,bfloat16",
                 "--prompt-tokens", "4", "--new-tokens", "2", "--warmup", "0",
                 "--out", str(out), "--no-progress"]) == 0
    a = profiling.load_run(tmp_path / "run.cpu.float32.json")
    b = profiling.load_run(tmp_path / "run.cpu.bfloat16.json")
    assert (a["dtype"], b["dtype"]) == ("float32", "bfloat16")
    assert a["model"]["random_weights"] is True
    assert not out.exists()


def test_output_paths():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 1)
    assert output_paths("r.json", [(cpu, torch.float32)]) == [Path("r.json")]
    assert output_paths("d/r.json", [(cpu, torch.float32), (cuda, torch.bfloat16)]) == [
        Path("d/r.cpu.float32.json"), Path("d/r.cuda1.bfloat16.json")]


@pytest.mark.parametrize("extra, message", [
    (["--device", "cuda"], "not available"),
    (["--device", "cuda:9"], "not available"),
    (["--device", "mps"], "not available"),
    (["--device", "tpu"], "not a device name"),
    (["--device", "cpu,cuda"], "not available"),
    (["--dtype", "float8"], "unknown dtype"),
    (["--prompt-tokens", "0"], "--prompt-tokens"),
    (["--prompt-tokens", "-4"], "--prompt-tokens"),
    (["--new-tokens", "0"], "--new-tokens"),
    (["--new-tokens", "-1"], "--new-tokens"),
    (["--new-tokens", "two"], "--new-tokens"),
    (["--prompt-tokens", "300"], "exceeds the context limit max_position_embeddings=256"),
    (["--sweep", "64,300"], "sweep context"),
    (["--sweep", "a,b"], "integers"),
    (["--baseline", "vllm"], "--baseline"),
    (["--quantize", "int3"], "--quantize"),
    (["--fast-decode", "warp"], "--fast-decode"),
])
def test_bench_bad_input(ckpt, tmp_path, capsys, extra, message):
    if "cuda" in " ".join(extra) and "cuda:9" not in extra and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if "mps" in extra and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    line = _fails(["--model", str(ckpt), "--out", str(tmp_path / "r.json"), "--no-progress",
                   *extra], capsys)
    assert message in line
    assert not (tmp_path / "r.json").exists()


def test_bench_missing_model_dir(tmp_path, capsys):
    line = _fails(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "r.json")], capsys)
    assert "nope" in line


def test_bench_baseline_without_transformers(ckpt, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    line = _fails(["--model", str(ckpt), "--baseline", "transformers",
                   "--out", str(tmp_path / "r.json")], capsys)
    assert "pip install transformers" in line


def _python(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


@pytest.mark.slow
def test_end_to_end_bench_trace_sweep_and_report(ckpt, tmp_path):
    """A real process: run file + trace + sweep, then the HTML report from the run file."""
    out, traces = tmp_path / "run.json", tmp_path / "traces"
    proc = _python("-m", "profiling.bench", "--model", str(ckpt), "--prompt-tokens", "8",
                   "--new-tokens", "4", "--out", str(out), "--trace-dir", str(traces),
                   "--sweep", "16,64")
    assert proc.returncode == 0, proc.stderr
    run = json.loads(out.read_text())
    assert [p["context_tokens"] for p in run["sweep"]] == [16, 64]
    assert [p.name for p in traces.iterdir()] == ["qwen2-cpu-float32.pt.trace.json.gz"]
    assert run["trace"]["file"] == str(traces / "qwen2-cpu-float32.pt.trace.json.gz")
    assert "ui.perfetto.dev" in proc.stdout and "tensorboard --logdir" in proc.stdout
    report = tmp_path / "report.html"
    proc = _python("-m", "profiling.report", str(out), "-o", str(report))
    assert proc.returncode == 0, proc.stderr
    assert report.stat().st_size > 100_000  # plotly.js is embedded


@pytest.mark.slow
def test_real_process_bad_input_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    proc = _python("-m", "profiling.report", str(bad), "-o", str(tmp_path / "r.html"))
    assert proc.returncode == 2
    assert "bad.json" in _one_error_line(proc.stderr)
    if not torch.cuda.is_available():
        proc = _python("-m", "profiling.bench", "--model", "x", "--device", "cuda")
        assert proc.returncode == 2
        assert "not available" in _one_error_line(proc.stderr)
