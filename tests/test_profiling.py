"""profiling/: measurements from the outside, run files, traces, charts and the report.

One tiny 3-layer checkpoint is profiled once per module (with a trace and a context sweep) and
the run is checked against what the model says it is. Nothing here needs a GPU; the CUDA tests
at the end run only where one is present.
"""

from __future__ import annotations

import copy
import gzip
import json
import statistics
from pathlib import Path

import plotly.io as pio
import pytest
import torch

import profiling
import profiling.charts as charts
from profiling.device import memory_bandwidth_limit, table_bandwidth
from profiling.errors import BaselineError, RunFileError
from profiling.hooks import ModuleHooks
from profiling.prompts import seeded_prompt_ids
from profiling.report import write_report
from profiling.runfile import model_size, run_label, shipped_runs
from profiling.steps import paired_runs, timed_run
from profiling.trace import top_ops
from profiling.trace_chart import trace_timeline
from profiling.timers import CpuClock, summarize
from tests.helpers import make_checkpoint, needs_kernel

qwen2 = pytest.importorskip("qwen2")

LAYERS = 3
PROMPT, NEW = 12, 5
SWEEP = [8, 32]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("prof-ckpt"), with_tokenizer=False,
                           num_hidden_layers=LAYERS)


@pytest.fixture(scope="module")
def model(ckpt):
    return qwen2.load_model(ckpt, device="cpu", dtype="float32")


@pytest.mark.parametrize("tied", [True, False])
def test_a_run_counts_the_networks_parameters_however_its_weights_are_stored(tmp_path, tied):
    """A quantized model holds scales and packed weights as parameters: the run file's count (and
    the dashboard's "494 M" label) is the network's, the same as the unquantized model's."""
    from profiling.assemble import model_facts

    path = make_checkpoint(tmp_path, with_tokenizer=False, tie_word_embeddings=tied)
    plain = qwen2.load_model(path, dtype="float32")
    stored = sum(p.numel() for p in {id(p): p for p in plain.parameters()}.values())
    assert model_facts(plain)["parameters"] == stored
    for scheme in ("int8", "int4"):
        quantized = qwen2.load_model(path, dtype="float32", quantize=scheme)
        assert sum(p.numel() for p in quantized.parameters()) != stored  # what the old count read
        assert model_facts(quantized)["parameters"] == stored, scheme


@pytest.fixture(scope="module")
def traced(model, tmp_path_factory):
    trace_dir = tmp_path_factory.mktemp("traces")
    seen = []
    run = profiling.profile_model(model, prompt_tokens=PROMPT, new_tokens=NEW, warmup=1,
                                  sweep=SWEEP, trace_dir=trace_dir,
                                  progress=lambda f, d: seen.append((f, d)))
    return run, trace_dir, seen


@pytest.fixture(scope="module")
def run(traced):
    return traced[0]


def kv_bytes(cfg, tokens: int, dtype_size: int) -> int:
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * tokens * dtype_size


# -- the run's contents ----------------------------------------------------------------------
def test_run_has_the_documented_keys(run):
    for key in ("schema", "schema_version", "decode_tokens_per_s", "prefill_tokens_per_s",
                "ttft_s", "layers", "memory", "device", "dtype", "environment", "breakdown",
                "instrumentation", "bandwidth", "decode_path"):
        assert key in run, key
    for key in ("weights_bytes", "kv_cache_bytes", "peak_bytes", "kv_cache_used_bytes",
                "kv_bytes_per_token"):
        assert key in run["memory"], key
    assert run["schema_version"] == profiling.SCHEMA_VERSION
    assert run["device"] == "cpu" and run["dtype"] == "float32"
    json.dumps(run, allow_nan=False)  # strict JSON


def test_one_layer_entry_per_decoder_layer(run, model):
    assert len(run["layers"]) == model.config.num_hidden_layers == LAYERS
    for i, layer in enumerate(run["layers"]):
        assert layer["index"] == i
        for phase in (layer, layer["prefill"]):
            assert phase["attention_ms"] > 0 and phase["mlp_ms"] > 0
            assert phase["input_layernorm_ms"] > 0 and phase["post_attention_layernorm_ms"] > 0


def test_weight_bytes_equal_the_parameters(run, model):
    expected = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: counted once
    assert run["memory"]["weights_bytes"] == expected
    assert run["model"]["parameters"] == sum(p.numel() for p in model.parameters())


def test_kv_bytes_follow_the_formula(run, model):
    cfg = model.config
    mem = run["memory"]
    tokens = PROMPT + NEW
    assert mem["kv_cache_tokens"] == tokens
    assert mem["kv_cache_used_bytes"] == kv_bytes(cfg, tokens, 4)
    assert mem["kv_cache_bytes"] == mem["kv_cache_allocated_bytes"] == kv_bytes(cfg, tokens, 4)
    assert mem["kv_bytes_per_token"] == kv_bytes(cfg, 1, 4)


def test_kv_bytes_in_bfloat16(ckpt):
    model = qwen2.load_model(ckpt, device="cpu", dtype="bfloat16")
    run = profiling.profile_model(model, prompt_tokens=4, new_tokens=2, warmup=0)
    assert run["dtype"] == "bfloat16"
    assert run["memory"]["kv_cache_used_bytes"] == kv_bytes(model.config, 6, 2)
    assert run["memory"]["weights_bytes"] == sum(p.numel() * 2 for p in model.parameters())


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_parts_add_up_to_the_step_time(run, phase):
    b = run["breakdown"][phase]
    parts = b["embedding_ms"] + b["layers_ms"] + b["final_norm_ms"] + b["lm_head_ms"]
    assert parts == pytest.approx(b["accounted_ms"], rel=1e-9, abs=1e-9)
    assert b["accounted_ms"] + b["other_ms"] == pytest.approx(b["step_ms"], rel=1e-9, abs=1e-9)
    # the hooked blocks lie inside the step: their sum cannot exceed it (timer resolution aside)
    assert 0 < b["accounted_ms"] <= b["step_ms"] * 1.001 + 1e-3
    assert b["other_ms"] >= -1e-3
    assert 0 < b["accounted_fraction"] <= 1.001
    key = (lambda layer: layer) if phase == "decode" else (lambda layer: layer["prefill"])
    layer_sum = sum(key(layer)["total_ms"] for layer in run["layers"])
    assert layer_sum == pytest.approx(b["layers_ms"], rel=1e-9)
    assert b["attention_ms"] == pytest.approx(sum(key(x)["attention_ms"] for x in run["layers"]))


def test_speed_figures(run):
    assert run["ttft_s"] > 0 and run["prefill_tokens_per_s"] > 0 and run["decode_tokens_per_s"] > 0
    assert run["prefill_tokens_per_s"] == pytest.approx(PROMPT / run["ttft_s"])
    step = run["decode"]["step_ms"]
    assert step["n"] == NEW == run["decode"]["steps"]
    assert step["min"] <= step["p10"] <= step["median"] <= step["p90"] <= step["max"]
    assert run["decode_tokens_per_s"] == pytest.approx(1e3 / step["median"])
    tps = run["decode"]["tokens_per_s"]
    assert tps["min"] <= tps["p10"] <= tps["p90"] <= tps["max"]
    assert len(run["generated_token_ids"]) == NEW + 1


def test_bandwidth_and_roofline(run):
    bw = run["bandwidth"]
    assert bw["limit_source"] == "measured" and bw["limit_bytes_per_s"] > 0
    assert bw["weights_read_bytes"] == run["memory"]["weights_bytes"]  # tied embeddings
    mean_ctx = PROMPT + (NEW + 1) / 2
    assert bw["kv_read_bytes"] == pytest.approx(run["memory"]["kv_bytes_per_token"] * mean_ctx)
    assert bw["achieved_bytes_per_s"] == pytest.approx(
        bw["bytes_per_token"] * run["decode_tokens_per_s"])
    assert bw["roofline_fraction"] == pytest.approx(
        bw["achieved_bytes_per_s"] / bw["limit_bytes_per_s"])
    assert bw["roofline_tokens_per_s"] == pytest.approx(
        bw["limit_bytes_per_s"] / bw["bytes_per_token"])


def test_instrumentation_overhead_is_recorded(run):
    inst = run["instrumentation"]
    assert inst["timer"] == "perf_counter"
    for key in ("prefill_ms_clean", "prefill_ms_hooked", "decode_step_ms_clean",
                "decode_step_ms_hooked"):
        assert inst[key] > 0, key
    # each step timed without and with hooks (profiling.steps.paired_runs), the hooked call first at
    # even steps: the median of the pairs' ratios for each order, averaged
    ratios = [h / c - 1 for c, h in zip(run["decode"]["step_ms_list"], inst["decode_step_ms_hooked_list"])]
    expected = (statistics.median(ratios[0::2]) + statistics.median(ratios[1::2])) / 2
    assert inst["overhead_fraction_decode"] == pytest.approx(expected)
    # its interval, a bootstrap over the pairs (profiling.overhead), holds the figure
    assert inst["overhead_fraction_decode_low"] <= inst["overhead_fraction_decode"] <= \
        inst["overhead_fraction_decode_high"]
    assert len(inst["decode_step_ms_hooked_list"]) == run["decode"]["steps"]
    assert "eager" in run["decode_path"]


def test_memory_peak_and_environment(run):
    mem = run["memory"]
    assert mem["peak_bytes"] >= mem["weights_bytes"] > 0
    assert "RSS" in mem["peak_source"]
    env = run["environment"]
    for key in ("device", "cpu_model", "cpu_count", "torch_threads", "torch_version", "dtype",
                "git", "timestamp", "gpu_name"):
        assert key in env, key
    assert env["torch_version"] == torch.__version__
    assert set(env["git"]) == {"commit", "dirty"}


@needs_kernel
def test_a_cpu_runs_environment_names_the_instructions_its_kernels_were_built_for():
    from profiling.environment import environment
    from qwen2 import cpu_kernels

    built = cpu_kernels.instruction_set()
    assert built in {"avx512-vnni", "avx2", "scalar"}
    assert environment(torch.device("cpu"), torch.float32)["cpu_kernels"] == built


def test_progress_reaches_one(traced):
    seen = traced[2]
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert all(isinstance(d, str) for _, d in seen)


def test_hooks_are_removed(model, run):
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_hooks_are_removed_after_an_error(model):
    clock = CpuClock()
    ids = seeded_prompt_ids(model.config.vocab_size, 4, torch.device("cpu"))
    boom = model.model.layers[0].mlp.register_forward_hook(
        lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with ModuleHooks(model, clock, labels=True) as hooks:
                timed_run(model, ids, 1, clock, hooks=hooks)
    finally:
        boom.remove()
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_paired_runs_time_each_call_with_and_without_hooks_and_decode_as_one_run(model):
    """Each call twice at one position (the cache rewound between): the tokens and cache are a plain
    greedy run's, every step has a clean and a hooked time, the hooked one its blocks, and no hook
    is left on the model."""
    clock = CpuClock()
    ids = seeded_prompt_ids(model.config.vocab_size, 6, torch.device("cpu"), seed=5)
    with torch.inference_mode():
        plain = timed_run(model, ids, 5, clock)
        clean, hooked = paired_runs(model, ids, 5, clock)
    assert clean.tokens == plain.tokens and hooked.tokens == plain.tokens  # each run's own calls
    assert clean.kv_length == hooked.kv_length == plain.kv_length == 11
    assert len(clean.step_s) == len(hooked.step_s) == len(hooked.step_parts) == 5 and not clean.step_parts
    assert clean.prefill_s > 0 and hooked.prefill_s > 0 and not clean.prefill_parts
    layers = model.config.num_hidden_layers
    for parts in [hooked.prefill_parts, *hooked.step_parts]:
        assert len([key for key in parts if key[0] == "mlp"]) == layers and ("lm_head", None) in parts
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_prompt_ids_are_deterministic():
    a = seeded_prompt_ids(100, 50, torch.device("cpu"), seed=3)
    b = seeded_prompt_ids(100, 50, torch.device("cpu"), seed=3)
    assert torch.equal(a, b) and a.shape == (1, 50) and int(a.max()) < 100 and int(a.min()) >= 0
    assert not torch.equal(a, seeded_prompt_ids(100, 50, torch.device("cpu"), seed=4))


def test_summarize():
    s = summarize([3.0, 1.0, 2.0, 4.0], scale=1e3)
    assert s["median"] == 2500 and s["min"] == 1000 and s["max"] == 4000 and s["n"] == 4
    assert summarize([]) is None


# -- sweep -----------------------------------------------------------------------------------
def test_sweep_points(run, model):
    points = run["sweep"]
    assert [p["context_tokens"] for p in points] == SWEEP
    for p in points:
        assert p["decode_tokens_per_s"] > 0
        assert p["kv_cache_bytes"] == kv_bytes(model.config, p["context_tokens"], 4)
        assert p["kv_cache_used_bytes"] == kv_bytes(model.config,
                                                    p["context_tokens"] + p["decode_steps"], 4)


# -- traces ----------------------------------------------------------------------------------
def test_one_trace_file_per_run(traced):
    run, trace_dir, _ = traced
    files = [p for p in Path(trace_dir).rglob("*") if p.is_file()]
    assert files == [Path(run["trace"]["file"])] and files[0].name.endswith(".pt.trace.json.gz")
    assert run["trace"]["bytes"] == files[0].stat().st_size
    with gzip.open(files[0], "rt") as fh:
        events = json.load(fh)["traceEvents"]
    names = {e.get("name") for e in events}
    for label in ("model.embed_tokens", "model.layers.0", "model.layers.2.self_attn",
                  "model.layers.1.mlp", "model.layers.0.input_layernorm", "lm_head",
                  "qwen2.prefill", "qwen2.decode_step"):
        assert label in names, label
    assert "ui.perfetto.dev" in run["trace"]["open"]["perfetto"]


def test_tensorboard_plugin_parses_the_trace(traced, tmp_path):
    pytest.importorskip("torch_tb_profiler")
    from torch_tb_profiler import consts
    from torch_tb_profiler.profiler.data import RunProfileData
    from torch_tb_profiler.profiler.run_generator import RunGenerator

    run, trace_dir, _ = traced
    path = run["trace"]["file"]
    match = consts.WORKER_PATTERN.match(Path(path).name)  # the loader's own file-name rule
    assert match, path
    data = RunProfileData.parse(match.group(1), None, path, str(tmp_path))
    profile = RunGenerator(match.group(1), None, data).generate_run_profile()
    assert len(data.steps_names) == 1 + run["trace"]["steps"]["decode"]  # prefill + decode steps
    assert "overall" in [v.name for v in profile.views]
    assert "trace" in [v.name for v in profile.views]


def test_top_ops(traced):
    rows = top_ops(traced[0]["trace"]["file"], n=5)
    assert 1 <= len(rows) <= 5
    assert [r["total_ms"] for r in rows] == sorted((r["total_ms"] for r in rows), reverse=True)
    for row in rows:
        assert row["name"].startswith("aten::") and row["calls"] >= 1 and row["total_ms"] >= 0
        assert 0 <= row["percent"] <= 100
    assert sum(r["percent"] for r in rows) <= 100.5  # self times do not double count


def test_trace_timeline(traced):
    fig = trace_timeline(traced[0]["trace"]["file"], theme="dark")
    rows = {t.name for t in fig.data}
    assert {"steps", "layers", "blocks", "operators"} <= rows
    steps = next(t for t in fig.data if t.name == "steps")
    assert len(steps.x) == 1 + traced[0]["trace"]["steps"]["decode"] and min(steps.base) == 0


# -- run files -------------------------------------------------------------------------------
def test_save_and_load_round_trip(run, tmp_path):
    path = profiling.save_run(run, tmp_path / "sub" / "run.json")
    assert profiling.load_run(path) == json.loads(json.dumps(run))


def _write(path: Path, obj) -> Path:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ([1, 2], "not a profiling run"),
    ({"hello": 1}, "not a Qwen2 Studio profiling run"),
    ({"schema": "qwen2-studio.profile-run", "schema_version": 0}, "older"),
    ({"schema": "qwen2-studio.profile-run", "schema_version": 99}, "newer"),
    ({"schema": "qwen2-studio.profile-run", "schema_version": 1}, "missing keys"),
])
def test_load_run_refuses_bad_files(tmp_path, content, message):
    path = _write(tmp_path / "bad.json", content)
    with pytest.raises(RunFileError, match=message) as info:
        profiling.load_run(path)
    assert str(path) in str(info.value) and isinstance(info.value, ValueError)


def test_load_run_refuses_missing_and_binary_files(tmp_path):
    with pytest.raises(RunFileError, match="not found"):
        profiling.load_run(tmp_path / "nope.json")
    with pytest.raises(RunFileError, match="directory"):
        profiling.load_run(tmp_path)
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(RunFileError):
        profiling.load_run(tmp_path / "bin.json")


def test_load_run_refuses_a_truncated_run(run, tmp_path):
    broken = copy.deepcopy(run)
    del broken["memory"]["peak_bytes"]
    with pytest.raises(RunFileError, match="peak_bytes"):
        profiling.load_run(_write(tmp_path / "r.json", broken))
    broken = copy.deepcopy(run)
    del broken["layers"][1]["mlp_ms"]
    with pytest.raises(RunFileError, match=r"layers\[1\]"):
        profiling.load_run(_write(tmp_path / "r.json", broken))


# -- bandwidth, bad input -------------------------------------------------------------------
def test_gpu_bandwidth_table():
    assert table_bandwidth("NVIDIA H200")[0] == 4.8e12
    assert table_bandwidth("NVIDIA H100 80GB HBM3")[0] == 3.35e12
    assert table_bandwidth("NVIDIA A100-SXM4-80GB")[0] == 2.0e12
    assert table_bandwidth("NVIDIA A100 80GB PCIe")[0] == 2.0e12
    assert table_bandwidth("NVIDIA L4")[0] == 0.3e12
    assert table_bandwidth("Tesla T4")[0] == 0.32e12
    assert table_bandwidth("NVIDIA A10G")[0] == 0.6e12
    assert table_bandwidth("NVIDIA L40S")[0] != 0.3e12
    assert table_bandwidth("Some Future GPU") is None


def test_cpu_bandwidth_is_measured():
    bandwidth, source = memory_bandwidth_limit(torch.device("cpu"))
    assert source == "measured" and 1e8 < bandwidth < 1e13


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt_tokens": 0}, "prompt_tokens"),
    ({"prompt_tokens": -3}, "prompt_tokens"),
    ({"new_tokens": 0}, "new_tokens"),
    ({"new_tokens": -1}, "new_tokens"),
    ({"new_tokens": 2.5}, "new_tokens"),
    ({"warmup": -1}, "warmup"),
    ({"prompt_tokens": 300}, "exceeds the context limit max_position_embeddings=256"),
    ({"prompt_tokens": 250, "new_tokens": 7}, "exceeds the context"),
    ({"sweep": [64, 250]}, "sweep context"),
    ({"sweep": "64,abc"}, "integers"),
    ({"sweep": [0]}, ">= 1"),
    ({"baseline": "vllm"}, "unknown baseline"),
])
def test_profile_model_refuses_bad_input(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        profiling.profile_model(model, **kwargs)


# -- baseline --------------------------------------------------------------------------------
def test_transformers_baseline_from_the_checkpoint(model):
    pytest.importorskip("transformers")
    run = profiling.profile_model(model, prompt_tokens=6, new_tokens=3, warmup=0,
                                  baseline="transformers")
    base = run["baseline"]
    assert base["engine"] == "transformers" and base["weights"].startswith("from_pretrained")
    assert base["decode_tokens_per_s"] > 0 and base["ttft_s"] > 0
    assert base["tokens_match"] is True and base["diverged_at"] is None
    assert base["divergence_note"] == "same greedy tokens as transformers"
    assert base["generated_token_ids"] == run["generated_token_ids"]


def test_divergence_is_located_and_explained():
    from profiling.baseline import divergence_note, first_divergence

    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2, 3], [1, 2]) == 2
    note = divergence_note(5, torch.bfloat16, None)
    assert note.startswith("outputs diverge at token 5: bfloat16 rounding")
    assert "int8" in divergence_note(0, torch.bfloat16, "int8")


def test_transformers_baseline_with_random_weights(ckpt):
    pytest.importorskip("transformers")
    torch.manual_seed(1)
    model = qwen2.load_model(ckpt, device="cpu", dtype="float32", random_weights=True)
    run = profiling.profile_model(model, prompt_tokens=6, new_tokens=3, warmup=0,
                                  baseline="transformers")
    assert "state_dict" in run["baseline"]["weights"]
    assert run["baseline"]["tokens_match"] is True  # the copied weights are ours


def test_baseline_without_transformers_is_a_clear_error(model, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(BaselineError, match="pip install transformers"):
        profiling.profile_model(model, prompt_tokens=4, new_tokens=2, baseline="transformers")


# -- charts and report -----------------------------------------------------------------------
def _variant(run: dict, device: str, dtype: str, speed: float) -> dict:
    other = copy.deepcopy(run)
    other["device"], other["dtype"] = device, dtype
    other["decode_tokens_per_s"] *= speed
    other["prefill_tokens_per_s"] *= speed
    for layer in other["layers"]:
        for key in ("attention_ms", "mlp_ms"):
            layer[key] /= speed
    other["sweep"] = None
    other["baseline"] = {"engine": "transformers", "decode_tokens_per_s": 10.0,
                         "prefill_tokens_per_s": 100.0, "tokens_match": False, "diverged_at": 5,
                         "divergence_note": "outputs diverge at token 5: bf16 rounding"}
    return other


@pytest.fixture(scope="module")
def runs(run):
    return [run, _variant(run, "cuda:0", "bfloat16", 50.0), _variant(run, "cuda:0", "float16", 40)]


def test_layer_latency_figure(runs):
    for phase in ("decode", "prefill"):
        fig = charts.layer_latency_figure(runs, phase=phase)
        visible = [t for t in fig.data if t.visible]
        assert visible and all(t.type == "bar" for t in fig.data)
        assert {t.offsetgroup for t in visible} == {"0", "1", "2"}  # one bar group per run
        layers = [t for t in visible if t.xaxis == "x"]  # top panel: the decoder layers, in order
        assert list(layers[0].x) == list(range(LAYERS))
        outside = {x for t in visible if t.xaxis == "x2" for x in t.x}  # bottom panel: the rest
        assert {"embedding", "final norm", "LM head"} <= outside
        assert phase in fig.layout.title.text
        # attention and MLP of layer 0, run 0, are stacked: MLP starts where attention ends
        attn = next(t for t in visible if t.offsetgroup == "0" and t.legendgroup == "attention")
        mlp = next(t for t in visible if t.offsetgroup == "0" and t.legendgroup == "mlp")
        assert mlp.base[0] == pytest.approx(attn.base[0] + attn.y[0])
    assert len(fig.layout.updatemenus[0].buttons) == 2
    with pytest.raises(ValueError, match="phase"):
        charts.layer_latency_figure(runs, phase="both")


def test_memory_figure_shows_the_model_apart_from_the_process(runs, run):
    fig = charts.memory_figure(runs, theme="dark")
    names = [t.name.replace("<br>", " ") for t in fig.data]  # legend names wrap on a phone
    assert names[:3] == ["Weights", "KV cache (allocated)",
                         "Activations / other (model peak − weights − KV)"]
    labels = ["cpu · float32", "cuda:0 · bfloat16", "cuda:0 · float16"]
    # one bar per run, a row each, named on the axis; the hover names it in full (model, hardware)
    assert [h.split("<br>")[0] for h in fig.data[0].hovertext] == [f"<b>{label}</b>" for label in labels]
    assert all(model_size(run["model"]["parameters"]) in h for h in fig.data[0].hovertext)
    assert [t.replace("<br>", " · ") for t in fig.layout.yaxis.ticktext] == labels
    scale = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[fig.layout.xaxis.title.text]  # the table's units
    stacked = fig.data[2].base[0] + fig.data[2].x[0]  # weights + KV + activations, run 0
    mem = run["memory"]
    assert stacked * scale == pytest.approx(mem["model_peak_bytes"], rel=1e-6)
    assert mem["model_peak_bytes"] == max(mem["peak_bytes"] - mem["process_baseline_bytes"],
                                          mem["weights_bytes"] + mem["kv_cache_bytes"])
    process = next(t for t in fig.data if "whole-process peak RSS" in t.name)
    assert process.x[0] * scale == pytest.approx(mem["peak_bytes"], rel=1e-6)
    kv_alone = [t for t in fig.data if t.xaxis == "x2"]  # the KV cache on its own scale
    assert kv_alone and kv_alone[0].x[0] > 0


def test_throughput_figure_is_linear_and_says_when_outputs_diverge(runs):
    fig = charts.throughput_figure(runs)
    names = [t.name for t in fig.data]
    assert any("roofline" in n for n in names)
    ours = fig.data[names.index("decode (ours, eager; p10–p90 whiskers)")]
    assert list(ours.x) == pytest.approx([r["decode_tokens_per_s"] for r in runs])  # bars per run
    assert "% of roofline" in ours.text[0] and ours.error_x.visible
    written = [t for t in fig.data if t.type == "scatter" and t.mode == "text"]  # values past the bars
    assert any(ours.text[0] in v for t in written for v in t.text)
    base = fig.data[names.index("decode (transformers)")]
    assert "⚠" in base.text[1] and "token 5" in base.customdata[1]
    assert "diverge at token 5" in fig.layout.title.subtitle.text.replace("<br>", " ")
    assert fig.layout.xaxis.type == "linear" and fig.layout.xaxis.rangemode == "tozero"


def test_sweep_figure_is_linear_from_zero_with_spread(runs):
    fig = charts.sweep_figure(runs)
    lines = [t for t in fig.data if t.type == "scatter"]
    assert len(lines) == 2 and list(lines[0].x) == SWEEP  # only the run with a sweep
    assert lines[0].error_y.visible and len(lines[0].error_y.array) == len(SWEEP)
    assert fig.layout.xaxis.type == "linear" and fig.layout.yaxis.rangemode == "tozero"
    empty = charts.sweep_figure(runs[1:])
    assert any("no sweep data" in a.text for a in empty.layout.annotations)


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_every_chart_follows_the_theme_and_leaves_room_for_its_title(runs, theme):
    for fn in (charts.layer_latency_figure, charts.memory_figure, charts.throughput_figure,
               charts.sweep_figure):
        fig = fn(runs, theme=theme)
        template = pio.templates["plotly_dark" if theme == "dark" else "plotly_white"]
        assert fig.layout.template.layout.plot_bgcolor == template.layout.plot_bgcolor
        assert fig.layout.margin.t >= 100 and fig.layout.title.text
    with pytest.raises(ValueError, match="theme"):
        charts.memory_figure(runs, theme="blue")


def test_charts_accept_no_runs():
    for fn in (charts.layer_latency_figure, charts.memory_figure, charts.throughput_figure,
               charts.sweep_figure):
        assert fn([]).layout.annotations


def test_headline_rows(runs, run):
    columns, rows = charts.headline_rows(runs)
    assert columns[0] == "run" and len(rows) == 3 and all(len(r) == len(columns) for r in rows)
    row = dict(zip(columns, rows[0]))
    assert row["run"] == run_label(run)
    assert row["time to first token (ms)"] == pytest.approx(run["ttft_s"] * 1e3, abs=0.1)
    assert row["decode tok/s"] == pytest.approx(run["decode_tokens_per_s"], abs=0.1)
    assert row["ms per decode step"] == pytest.approx(run["decode"]["step_ms"]["median"], abs=0.01)
    assert row["weights MB"] == pytest.approx(run["memory"]["weights_bytes"] / 1e6, abs=0.1)
    assert row["peak MB (model)"] == pytest.approx(run["memory"]["model_peak_bytes"] / 1e6, abs=0.1)
    assert row["model"] == f"{Path(run['model']['source']).name} · {model_size(run['model']['parameters'])}"
    assert row["hardware"].endswith(f"{run['environment']['torch_threads']} threads")
    assert row["hook overhead"].startswith("within noise") or row["hook overhead"].endswith(")")


def test_run_label_says_which_run_is_which(run):
    label = run_label(run)
    assert label.startswith(f"cpu · float32 · {PROMPT}+{NEW} tok · real weights · ")
    assert run["environment"]["timestamp"][:10] in label
    q = copy.deepcopy(run)
    q["quantize"], q["model"]["random_weights"] = "int8", True
    assert run_label(q).startswith("cpu · float32 · int8 · ") and "random weights" in run_label(q)


def test_chart_labels_are_short_unique_and_name_what_differs(run):
    q = copy.deepcopy(run)
    q["quantize"] = "int8"
    assert charts.run_labels([run, copy.deepcopy(run), q]) == [
        "cpu · float32", "cpu · float32 #2", "cpu · float32 · int8"]
    longer = copy.deepcopy(run)
    longer["new_tokens"] = 32
    assert charts.run_labels([run, longer]) == [f"cpu · float32 · {PROMPT}+{NEW} tok",
                                                f"cpu · float32 · {PROMPT}+32 tok"]


# -- shipped reference runs (docs/runs/) -----------------------------------------------------
def test_shipped_runs_load_and_validate():
    paths = shipped_runs()
    assert paths, "docs/runs/ ships no reference run"
    runs = [profiling.load_run(p) for p in paths]
    for path, shipped in zip(paths, runs):
        assert shipped["device"] == "cpu" or shipped["environment"]["gpu_name"], path
        assert shipped["decode_tokens_per_s"] > 0 and shipped["ttft_s"] > 0, path
        assert shipped["memory"]["model_peak_bytes"] >= shipped["memory"]["weights_bytes"], path
        assert path.stat().st_size < 200_000, path  # run files stay small
        trace = profiling.runfile.trace_file(shipped, path)
        if shipped.get("trace"):
            assert trace is not None and trace.stat().st_size < 2_000_000, path
            assert top_ops(trace, n=3)
    for fn in (charts.layer_latency_figure, charts.memory_figure, charts.throughput_figure):
        fn(runs)
    assert charts.headline_rows(runs)[1]


def test_shipped_runs_without_a_gpu_run_or_any_run(run, tmp_path, monkeypatch):
    monkeypatch.setattr(profiling.runfile, "SHIPPED_RUNS_DIR", tmp_path / "nowhere")
    assert shipped_runs() == []
    monkeypatch.setattr(profiling.runfile, "SHIPPED_RUNS_DIR", tmp_path)
    profiling.save_run(run, tmp_path / "cpu.json")
    assert shipped_runs() == [tmp_path / "cpu.json"]  # CPU only: every chart still draws
    cpu_only = [profiling.load_run(p) for p in shipped_runs()]
    for fn in (charts.layer_latency_figure, charts.memory_figure, charts.throughput_figure):
        assert fn(cpu_only).data


def test_report_renders(runs, tmp_path):
    path = write_report(runs, tmp_path / "report.html")
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>") and "plotly" in text.lower()
    for run_ in runs:
        assert run_label(run_) in text
    assert text.count("<table>") == 2
    assert text.count("class=\"plotly-graph-div\"") == 4


def test_report_cli(run, tmp_path, capsys):
    from profiling.report import main

    runs_path = profiling.save_run(run, tmp_path / "a.json")
    assert main([str(runs_path), "-o", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").is_file()
    (tmp_path / "bad.json").write_text("[]")
    assert main([str(runs_path), str(tmp_path / "bad.json"), "-o", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "bad.json" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.html").exists()


# -- CUDA (run by the lead on a GPU box) -----------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_run_uses_events_and_one_sync_per_step(ckpt, monkeypatch):
    model = qwen2.load_model(ckpt, device="cuda", dtype="bfloat16")
    run = profiling.profile_model(model, prompt_tokens=16, new_tokens=6, warmup=1)
    assert run["instrumentation"]["timer"] == "cuda_events"
    assert run["environment"]["gpu_name"] and run["memory"]["peak_bytes"] > 0
    assert run["memory"]["peak_source"] == "torch.cuda.max_memory_allocated"
    for phase in ("prefill", "decode"):
        b = run["breakdown"][phase]
        assert 0 < b["accounted_ms"] <= b["step_ms"] * 1.01 + 1e-3
    from profiling.timers import make_clock

    calls = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: (calls.append(1), real(*a, **k)))
    clock = make_clock(model.device)
    ids = seeded_prompt_ids(model.config.vocab_size, 8, model.device)
    with torch.inference_mode(), ModuleHooks(model, clock) as hooks:
        timed_run(model, ids, 4, clock, hooks=hooks)
    assert len(calls) == 1 + 4  # one per prefill and per decode step, none per hook


@cuda
def test_cuda_bandwidth_limit_from_the_table_or_measured():
    bandwidth, source = memory_bandwidth_limit(torch.device("cuda"))
    assert source in ("table", "measured") and bandwidth > 1e10
    if "H200" in torch.cuda.get_device_name():
        assert (bandwidth, source) == (4.8e12, "table")


def test_the_fast_paths_runs_report_every_step_so_a_cancel_is_heard(model):
    """The fast path's runs are not counted in the plan; each step still reports (heartbeat), at
    the plan's fraction, so that the app's cancel, raised from the callback, stops them mid-run."""
    from profiling.measure import _Stages
    from profiling.progress import Plan
    from profiling.settings import check_settings

    class Cancelled(Exception):
        pass

    heard = []

    def callback(fraction, desc):
        heard.append((fraction, desc))
        if len(heard) == 4:
            raise Cancelled

    plan = Plan(callback, total=10)
    plan.advance(3)
    heard.clear()
    stages = _Stages(model, check_settings(model, prompt_tokens=PROMPT, new_tokens=NEW), plan)
    with pytest.raises(Cancelled):
        stages.fast_run(None)  # eager steps: the same loop a fast path runs
    assert heard == [(0.3, "")] * 4  # the prefill and three steps, then the cancel; nothing advanced
