"""Run files from strangers: the typed schema, traces only beside their run, a bounded runs folder.

Reproductions from the public-Space audit (issue 15): one upload with `"model": "x"` broke the
dashboard for every later visitor; a run naming any server path as its trace made the app parse it;
each comparison wrote a new multi-MB report and nothing was ever cleaned. The run files here are the
reference runs shipped under docs/runs/ (real profiles), changed one field at a time.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import profiling
from profiling import trace as trace_module
from profiling.errors import RunFileError
from profiling.report import write_report
from profiling.runfile import shipped_runs, trace_file
from studio.runs import RunStore
from studio.text import plain


@pytest.fixture(scope="module")
def shipped() -> tuple[Path, dict]:
    paths = shipped_runs()
    if not paths:
        pytest.skip("docs/runs/ ships no reference run")
    return paths[0], json.loads(paths[0].read_text())


def changed(run: dict, edit) -> dict:
    run = copy.deepcopy(run)
    edit(run)
    return run


# -- the typed schema ------------------------------------------------------------------------
@pytest.mark.parametrize("edit, field", [
    (lambda r: r.update(model="x"), "model"),
    (lambda r: r["environment"]["git"].update(commit=12345), "environment.git.commit"),
    (lambda r: r.update(ttft_s="soon"), "ttft_s"),
    (lambda r: r.update(decode_tokens_per_s="30"), "decode_tokens_per_s"),
    (lambda r: r["memory"].update(peak_bytes=[1]), "memory.peak_bytes"),
    (lambda r: r["layers"][2].update(attention_ms=True), "layers[2].attention_ms"),
    (lambda r: r.update(layers={"0": {}}), "layers"),
    (lambda r: r.update(trace=["/etc/passwd"]), "trace"),
    (lambda r: r["trace"].update(file={"path": "x"}), "trace.file"),
    (lambda r: r.update(sweep=[{"context_tokens": "64"}]), "sweep[0].context_tokens"),
    (lambda r: r["baseline"].update(tokens_match="yes"), "baseline.tokens_match"),
    (lambda r: r.update(device="x" * 10_000), "device"),
    (lambda r: r.update(generated_token_ids=[-1]), "generated_token_ids[0]"),
])
def test_wrong_types_are_refused_with_the_field_named(shipped, tmp_path, edit, field):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(changed(shipped[1], edit)))
    with pytest.raises(RunFileError) as info:
        profiling.load_run(path, where="upload.json")
    message = str(info.value)
    assert message.startswith("upload.json: ") and f"{field}:" in message, message
    assert str(tmp_path) not in message  # no server path in what a visitor reads


def test_a_valid_run_still_loads_and_unknown_keys_are_kept(shipped, tmp_path):
    run = changed(shipped[1], lambda r: r.update(extra_from_a_newer_writer={"x": [1, 2]}))
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    assert profiling.load_run(path) == run


def test_oversized_and_deeply_nested_files_are_refused_before_parsing(tmp_path):
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (profiling.runfile.MAX_RUN_BYTES + 1))
    with pytest.raises(RunFileError, match="too big"):
        profiling.load_run(big)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(RunFileError, match="nested too deeply"):
        profiling.load_run(deep)


def test_report_cli_refuses_a_mistyped_run_in_one_line(shipped, tmp_path):
    path = tmp_path / "typed.json"
    path.write_text(json.dumps(changed(shipped[1], lambda r: r.update(model="x"))))
    done = subprocess.run([sys.executable, "-m", "profiling.report", str(path), "-o", str(tmp_path / "r.html")],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error:") and "model:" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "r.html").exists()


# -- traces ----------------------------------------------------------------------------------
def test_a_trace_is_read_only_beside_its_run(shipped, tmp_path):
    path, run = shipped
    assert trace_file(run, path) is not None  # the shipped run's trace, in docs/runs/
    outside = tmp_path / "elsewhere" / "x.pt.trace.json"
    outside.parent.mkdir()
    outside.write_text('{"traceEvents": []}')
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    for name in (str(outside), "../elsewhere/x.pt.trace.json", "/etc/passwd", str(path)):
        visitor = changed(run, lambda r, name=name: r["trace"].update(file=name))
        assert trace_file(visitor, runs_dir / "upload.json") is None, name
    beside = runs_dir / "traces" / "stamp" / "x.pt.trace.json"
    beside.parent.mkdir(parents=True)
    beside.write_text('{"traceEvents": []}')
    mine = changed(run, lambda r: r["trace"].update(file=str(beside)))
    assert trace_file(mine, runs_dir / "mine.json") == beside.resolve()


def test_a_trace_that_inflates_is_refused(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.pt.trace.json.gz"
    with gzip.open(bomb, "wb") as fh:  # 80 MB of whitespace in ~80 KB
        for _ in range(80):
            fh.write(b" " * 2**20)
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(OSError, match="MB of JSON"):
        trace_module.top_ops(bomb)
    many = tmp_path / "many.pt.trace.json"
    many.write_text("[" + ",".join(["{}"] * (trace_module.MAX_TRACE_OBJECTS + 1)) + "]")
    with pytest.raises(OSError, match="JSON objects"):
        trace_module.top_ops(many)


# -- the runs folder -------------------------------------------------------------------------
def test_an_upload_is_validated_before_it_is_stored(shipped, tmp_path):
    store = RunStore(tmp_path / "runs")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(changed(shipped[1], lambda r: r.update(model="x"))))
    with pytest.raises(RunFileError, match="model"):
        store.add_upload(bad)
    assert list(store.folder.iterdir()) == []  # nothing of it was kept


def test_identical_uploads_are_stored_once_under_a_safe_name(shipped, tmp_path):
    store = RunStore(tmp_path / "runs")
    src = tmp_path / "in"
    src.mkdir()
    upload = src / "<img src=x>.json"
    upload.write_text(json.dumps(shipped[1]))
    first = store.add_upload(upload)
    again = store.add_upload(upload)
    assert first == again and first.parent == store.folder and "<" not in first.name
    assert [p.name for p in store.folder.iterdir()] == [first.name]


def test_a_bad_file_in_the_folder_is_skipped_not_shown(shipped, tmp_path, capsys):
    store = RunStore(tmp_path / "runs")
    (store.folder / "typed.json").write_text(json.dumps(changed(shipped[1], lambda r: r.update(model="x"))))
    (store.folder / "good.json").write_text(json.dumps(shipped[1]))
    values = [value for _, value in store.choices()]
    assert "good.json" in values and "typed.json" not in values
    assert "typed.json" in capsys.readouterr().out  # said in the log, once
    store.choices()
    assert "typed.json" not in capsys.readouterr().out


def test_a_comparison_report_is_written_once(shipped, tmp_path):
    store = RunStore(tmp_path / "runs")
    runs = [shipped[1]]
    first = store.report(runs, write_report)
    mtime = first.stat().st_mtime_ns
    assert store.report(copy.deepcopy(runs), write_report) == first
    assert len(list(store.folder.glob("*.html"))) == 1 and first.stat().st_mtime_ns >= mtime


def test_the_folder_is_capped_oldest_first(shipped, tmp_path):
    store = RunStore(tmp_path / "runs", max_files=5, max_bytes=10**9)
    src = tmp_path / "src"
    src.mkdir()
    stored = []
    for i in range(8):
        upload = src / f"run{i}.json"
        upload.write_text(json.dumps(changed(shipped[1], lambda r, i=i: r.update(seed=i))))
        stored.append(store.add_upload(upload))
        past = time.time() - 100 + i  # distinct ages
        os.utime(stored[-1], (past, past))
    names = sorted(p.name for p in store.folder.iterdir())
    assert names == sorted(p.name for p in stored[-5:]), names
    size = stored[-1].stat().st_size
    by_bytes = RunStore(store.folder, max_files=100, max_bytes=2 * size + 1)
    by_bytes.prune()
    assert sorted(p.name for p in store.folder.iterdir()) == sorted(p.name for p in stored[-2:])
    assert shipped[0].is_file()  # shipped runs live elsewhere and are never pruned


def test_markdown_from_run_files_is_shown_as_text():
    shown = plain("<img src=x onerror=alert(1)> <details>[link](http://x) **bold** | a")
    assert "<img" not in shown and "<details>" not in shown
    assert "\\[link\\]" in shown and "\\*\\*bold\\*\\*" in shown and "\\|" in shown
