"""profiling.serve: the serving benchmark runs concurrent streams through the engine, writes its rows,
and the dashboard draws them (throughput and time to first token against concurrent users)."""

from __future__ import annotations

import json

import profiling.charts
from profiling.serve import main as serve_main
from profiling.serve import summarise


def test_summarise_adds_up_the_streams():
    streams = [{"new_tokens": 10, "ttft_s": 0.5, "queue_wait_s": 0.0, "decode_tok_s": 20.0},
               {"new_tokens": 10, "ttft_s": 1.5, "queue_wait_s": 1.0, "decode_tok_s": 10.0}]
    row = summarise(2, streams, wall_s=2.0)
    assert row["aggregate_tok_s"] == 10.0 and row["aggregate_decode_tok_s"] == 30.0
    assert row["stream_tok_s_mean"] == 15.0 and row["stream_tok_s_min"] == 10.0
    assert row["ttft_p95_s"] == 1.5 and row["queue_wait_p95_s"] == 1.0 and row["errors"] == 0


def test_serving_benchmark_through_the_engine_writes_rows_the_dashboard_draws(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "serve.json"
    assert serve_main(["--model", str(tiny_model_dir), "--dtype", "float32", "--fast-decode", "off",
                       "--users", "1,3", "--new-tokens", "6", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "serving" and [r["users"] for r in result["rows"]] == [1, 3]
    for row in result["rows"]:
        assert row["errors"] == 0 and row["aggregate_tok_s"] > 0 and row["ttft_p95_s"] > 0
    assert "3 users vs 1" in capsys.readouterr().out
    figure = profiling.charts.serving_figure([result])
    assert [trace.x for trace in figure.data][0] == (1, 3) and len(figure.data) == 3
