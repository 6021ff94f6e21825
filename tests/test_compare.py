"""profiling.compare: ours against transformers in one process (figures are not asserted, only
that the comparison runs on the same weights and reports what it claims)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers", reason="the comparison's reference is transformers")

from profiling import compare  # noqa: E402


def test_compare_runs_both_engines_on_the_same_weights(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = compare.main(["--model", str(tiny_model_dir), "--modes", "float32,int8", "--prompt-tokens", "8",
                         "--new-tokens", "6", "--prefill-tokens", "16", "--rounds", "1", "--out", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "ours tok/s" in table and "float32" in table and "int8" in table
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    fp32 = rows["float32"]
    assert fp32["greedy_equal"] is True and fp32["greedy_same_prefix"] == 6  # fp32: identical tokens
    assert fp32["ours_tok_s"] > 0 and fp32["ref_tok_s"] > 0 and fp32["prefill_ratio"] > 0
    assert fp32["weights_bytes"] == fp32["ref_weights_bytes"]
    q8 = rows["int8"]
    assert q8["weights_bytes"] < 0.3 * fp32["weights_bytes"]  # int8 plus scales, against fp32
    assert 0.0 <= q8["top1_agreement"] <= 1.0 and q8["kl_nats_per_token"] >= 0


def test_compare_random_weights_from_a_local_config(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    code = compare.main(["--model", str(tmp_path), "--random-weights", "--modes", "float32",
                         "--prompt-tokens", "4", "--new-tokens", "4", "--prefill-tokens", "0", "--rounds", "1"])
    assert code == 0
    assert "float32" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--modes", "int4"], "unknown mode"),
    (["--new-tokens", "1"], "--new-tokens"),
    (["--device", "cuda:7"], "cuda"),
])
def test_compare_bad_input_is_one_line(tiny_model_dir, capsys, argv, message):
    assert compare.main(["--model", str(tiny_model_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
