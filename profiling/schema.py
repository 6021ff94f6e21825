"""The run file's typed schema: every field the charts, the report and the app read, with its type.

A run file may come from anywhere (a visitor's upload, another machine), so a field with the wrong
type (`"model": "x"`, `"ttft_s": "soon"`, `git.commit = 12345`) must be refused when the file is read,
not deep inside a chart for whoever opens the page next. Types are strict: no string is read as a
number and no bool as a count; NaN and infinity are refused (`runfile.save_run` writes them as null).
Unknown keys are kept (a newer writer may add some) and never read. Sizes are bounded so that one
file cannot make a page draw millions of points.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Number = float | None          # strict: an int is a number too, a string or a bool is not
Count = Annotated[int, Field(ge=0)] | None
Text = Annotated[str, Field(max_length=4_000)] | None
Flag = bool | None
MAX_LAYERS = 1_024             # Qwen2-72B has 80
MAX_STEPS = 100_000            # decode steps or token ids recorded in one run
MAX_SWEEP = 64


class Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


class StepStats(Section):
    n: Count = None
    median: Number = None
    mean: Number = None
    min: Number = None
    max: Number = None
    p10: Number = None
    p90: Number = None
    stdev: Number = None


class ModelFacts(Section):
    source: Text = None
    random_weights: Flag = None
    quantize: Text = None
    name: Text = None
    num_layers: Count = None
    hidden_size: Count = None
    intermediate_size: Count = None
    num_attention_heads: Count = None
    num_key_value_heads: Count = None
    head_dim: Count = None
    vocab_size: Count = None
    max_position_embeddings: Count = None
    tie_word_embeddings: Flag = None
    parameters: Count = None


class Prefill(Section):
    time_ms: Number = None
    tokens: Count = None


class DecodeSpeed(Section):
    median: Number = None
    p10: Number = None
    p90: Number = None
    min: Number = None
    max: Number = None


class Decode(Section):
    steps: Count = None
    step_ms: StepStats | None = None
    tokens_per_s: DecodeSpeed | None = None
    step_ms_list: Annotated[list[float], Field(max_length=MAX_STEPS)] | None = None


class Bandwidth(Section):
    bytes_per_token: Number = None
    weights_read_bytes: Number = None
    kv_read_bytes: Number = None
    mean_context_tokens: Number = None
    achieved_bytes_per_s: Number = None
    limit_bytes_per_s: Number = None
    limit_source: Text = None
    roofline_fraction: Number = None
    roofline_tokens_per_s: Number = None
    model: Text = None


class LayerParts(Section):
    input_layernorm_ms: Number = None
    attention_ms: Number = None
    post_attention_layernorm_ms: Number = None
    mlp_ms: Number = None
    total_ms: Number = None


class Layer(LayerParts):
    index: Count = None
    attention_ms: Number           # required: the per-layer chart's two bars
    mlp_ms: Number
    prefill: LayerParts | None = None


class PhaseBreakdown(Section):
    step_ms: Number = None
    embedding_ms: Number = None
    attention_ms: Number = None
    mlp_ms: Number = None
    norms_ms: Number = None
    final_norm_ms: Number = None
    lm_head_ms: Number = None
    layers_ms: Number = None
    accounted_ms: Number = None
    other_ms: Number = None
    accounted_fraction: Number = None


class Breakdown(Section):
    prefill: PhaseBreakdown | None = None
    decode: PhaseBreakdown | None = None
    note: Text = None


class Instrumentation(Section):
    timer: Text = None
    sync: Text = None
    prefill_ms_clean: Number = None
    prefill_ms_hooked: Number = None
    decode_step_ms_clean: Number = None
    decode_step_ms_hooked: Number = None
    overhead_fraction_prefill: Number = None
    overhead_fraction_decode: Number = None
    overhead_pairs: Text = None  # how the clean and hooked steps were paired (absent in older files)
    overhead_fraction_decode_low: Number = None     # the bootstrap interval (profiling.overhead)
    overhead_fraction_decode_high: Number = None
    decode_step_ms_hooked_list: Annotated[list[float], Field(max_length=MAX_STEPS)] | None = None


class TraceCost(Section):
    """What tracing the fast path cost: its traced steps against its clean ones."""
    profiler: Text = None
    decode_step_ms_clean: Number = None
    decode_step_ms_traced: Number = None
    overhead_fraction_decode: Number = None
    overhead_fraction_decode_low: Number = None
    overhead_fraction_decode_high: Number = None


class FastDecode(Section):
    decoder: Text = None
    decode_tokens_per_s: Number = None
    step_ms: StepStats | None = None
    ttft_s: Number = None
    note: Text = None
    # per block, from a trace of the compiled step (profiling.compiled_step); absent where not cut
    layers: Annotated[list[Layer], Field(max_length=MAX_LAYERS)] | None = None
    breakdown: PhaseBreakdown | None = None
    instrumentation: TraceCost | None = None


class Memory(Section):
    weights_bytes: Number          # required: the memory chart's bars
    kv_cache_bytes: Number
    peak_bytes: Number
    parameter_bytes: Number = None
    buffer_bytes: Number = None
    kv_cache_allocated_bytes: Number = None
    kv_cache_used_bytes: Number = None
    kv_cache_tokens: Count = None
    kv_bytes_per_token: Number = None
    peak_source: Text = None
    start_bytes: Number = None
    process_baseline_bytes: Number = None
    model_peak_bytes: Number = None
    activations_bytes: Number = None
    model_peak_note: Text = None


class Git(Section):
    commit: Text = None
    dirty: Flag = None


class Environment(Section):
    device: Text = None
    device_type: Text = None
    dtype: Text = None
    cpu_model: Text = None
    cpu_count: Count = None
    cpus_usable: Count = None      # the CPUs this process may run on (a container's share)
    torch_threads: Count = None
    cpu_kernels: Text = None       # the instructions our CPU kernels were built for (qwen2.cpu_kernels)
    gpu_name: Text = None
    gpu_memory_bytes: Number = None
    gpu_capability: Text = None
    torch_version: Text = None
    cuda_version: Text = None
    python_version: Text = None
    platform: Text = None
    git: Git | None = None
    load_average: Annotated[list[float], Field(max_length=3)] | None = None
    timestamp: Text = None
    device_name: Text = None


class TraceSteps(Section):
    prefill: Count = None
    decode: Count = None


class Trace(Section):
    file: Text = None              # read only beside the run file: see runfile.trace_file
    bytes: Count = None
    steps: TraceSteps | None = None
    activities: Annotated[list[Annotated[str, Field(max_length=40)]], Field(max_length=8)] | None = None
    open: dict[str, Annotated[str, Field(max_length=4_000)]] | None = None


class SweepPoint(Section):
    context_tokens: Count = None
    decode_steps: Count = None
    decode_tokens_per_s: Number = None
    decode_step_ms: StepStats | None = None
    prefill_ms: Number = None
    prefill_tokens_per_s: Number = None
    kv_cache_bytes: Number = None
    kv_cache_used_bytes: Number = None
    kv_cache_allocated_bytes: Number = None
    peak_bytes: Number = None


class Baseline(Section):
    engine: Text = None
    version: Text = None
    weights: Text = None
    method: Text = None
    ttft_s: Number = None
    prefill_tokens_per_s: Number = None
    decode_tokens_per_s: Number = None
    total_s: Number = None
    generated_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STEPS)] | None = None
    tokens_match: Flag = None
    diverged_at: Count = None
    divergence_note: Text = None


class ProfileRun(Section):
    """One profiling run (schema and version are checked before this model, by runfile)."""

    schema_: str = Field(alias="schema")
    schema_version: int
    device: Annotated[str, Field(max_length=200)]
    dtype: Annotated[str, Field(max_length=200)]
    ttft_s: Number
    prefill_tokens_per_s: Number
    decode_tokens_per_s: Number
    layers: Annotated[list[Layer], Field(max_length=MAX_LAYERS)]
    memory: Memory
    model: ModelFacts | None = None
    device_name: Text = None
    quantize: Text = None
    prompt_tokens: Count = None
    new_tokens: Count = None
    warmup: Count = None
    seed: int | None = None
    decode_path: Text = None
    fast_decode: FastDecode | None = None
    prefill: Prefill | None = None
    decode: Decode | None = None
    generated_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STEPS)] | None = None
    bandwidth: Bandwidth | None = None
    breakdown: Breakdown | None = None
    instrumentation: Instrumentation | None = None
    environment: Environment | None = None
    trace: Trace | None = None
    sweep: Annotated[list[SweepPoint], Field(max_length=MAX_SWEEP)] | None = None
    baseline: Baseline | None = None


def problems(run: dict) -> list[str]:
    """What is wrong with `run` against ProfileRun, a line per fault naming the field ([] if none).
    Missing fields are grouped the way a reader fixes them: "missing keys a, b" at the top level,
    "memory is missing peak_bytes" below it."""
    try:
        ProfileRun.model_validate(run)
    except ValidationError as exc:
        return _describe(exc.errors())
    return []


def _describe(errors: list[dict]) -> list[str]:
    missing: dict[str, list[str]] = {}
    lines = []
    for error in errors:
        where = _path(error["loc"][:-1]) if error["type"] == "missing" else _path(error["loc"])
        if error["type"] == "missing":
            missing.setdefault(where, []).append(str(error["loc"][-1]))
            continue
        got = error.get("input")
        shown = repr(got) if len(repr(got)) <= 40 else repr(got)[:37] + "..."
        message = re.sub(r"valid dictionary or instance of \w+", "JSON object", error["msg"]).lower()
        lines.append(f"{where}: {message} (got {type(got).__name__} {shown})")
    for where, keys in missing.items():
        lines.insert(0, f"missing keys {', '.join(keys)}" if not where else f"{where} is missing {', '.join(keys)}")
    return lines


def _path(loc) -> str:
    """('layers', 1, 'mlp_ms') -> 'layers[1].mlp_ms'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
