"""Per-block figures of the compiled CPU decode step (profiling/compiled_step.py): a step's trace cut
at its matrix products. The cut is checked on made-up traces (every stretch lands in its block, a
trace with the wrong products is refused) and on the real thing: a profile of the tiny model's
compiled step, unquantized and quantized, gives every layer its attention and MLP time."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import profiling
import qwen2
from profiling import compiled_step
from profiling.charts import layer_latency_figure
from profiling.compiled_step import Layout, layout_of, step_parts
from profiling.schema import problems
from qwen2.cpu_compile import CompiledCpuPath

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _event(name, start, end):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end))


def _trace(layout: Layout, kernel="graph_0_cpp_fused_add_mean_mul_pow_rsqrt_0", product="aten::mm"):
    """A made-up compiled call [0, end] µs: before each product a 1 µs fused kernel (then 1 µs of
    wrapper), each product p lasting 10 + p µs; after the last one a cast. (children, end)."""
    children, at = [], 0.0
    for p in range(layout.products):
        children.append(_event(kernel, at, at + 1))
        at += 2
        children.append(_event(product, at, at + 10 + p))
        at += 10 + p
    children.append(_event("graph_0_cpp_fused__to_copy_7", at, at + 1))
    return children, at + 3


def test_each_stretch_of_a_step_goes_to_its_block():
    layout = Layout(layers=2, attention_products=2, mlp_products=2)  # qkv, o_proj | gate_up, down
    children, end = _trace(layout)
    parts = {key: round(seconds * 1e6, 6) for key, seconds in step_parts(children, 0.0, end, layout).items()}
    assert parts == {
        ("input_layernorm", 0): 2,               # before layer 0's q|k|v product (with the embedding)
        ("attention", 0): 10 + 2 + 11,           # q|k|v, the attention kernels, o_proj
        ("post_attention_layernorm", 0): 2,
        ("mlp", 0): 12 + 2 + 13,                 # gate|up, SwiGLU, down
        ("input_layernorm", 1): 2,               # layer 0's residual add and layer 1's norm
        ("attention", 1): 14 + 2 + 15,
        ("post_attention_layernorm", 1): 2,
        ("mlp", 1): 16 + 2 + 17,
        ("final_norm", None): 2,
        ("lm_head", None): 18 + 3,               # the head's product and the cast after it
    }
    assert sum(parts.values()) == end  # every microsecond of the call is somebody's


def test_unfused_layers_have_more_products_per_block():
    layout = Layout(layers=1, attention_products=4, mlp_products=3)  # q, k, v, o_proj | gate, up, down
    parts = step_parts(*_trace(layout)[:1], 0.0, _trace(layout)[1], layout)
    # q, k and v and the stretches between them are attention; only after o_proj comes the norm
    assert parts[("attention", 0)] * 1e6 == pytest.approx((10 + 11 + 12 + 13) + 3 * 2)
    assert parts[("mlp", 0)] * 1e6 == pytest.approx((14 + 15 + 16) + 2 * 2)


def test_a_trace_without_the_models_products_is_refused():
    layout = Layout(layers=2, attention_products=2, mlp_products=2)
    children, end = _trace(layout)
    with pytest.raises(ValueError, match=r"8 matrix products in the step's trace, the model has 9 \(2 layers x 4"):
        step_parts(children[2:], 0.0, end, layout)  # one product missing
    children, end = _trace(layout, product="aten::bmm_extra")  # nothing recognised as a product
    with pytest.raises(ValueError, match="0 matrix products"):
        step_parts(children, 0.0, end, layout)


@pytest.mark.parametrize("kernel", ["aten::addmm", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu",
                                    "qwen2::int8_block_mm", "qwen2::int4_block_mm",
                                    "quantized::int4mm_packed_weight_cpu",
                                    "mkldnn::_linear_pointwise", "graph_0_kernel",
                                    "graph_0_cpp_CppMicroGemmAMX_template_3"])
def test_the_products_of_every_precision_are_recognised(kernel):
    assert compiled_step.PRODUCT.search(kernel)
    assert not compiled_step.PRODUCT.search("graph_0_cpp_fused__softmax_add_index_copy_mul_sum_1")


def test_layout_of_fused_and_unfused_models(tiny_model_dir):
    fused = qwen2.load_model(tiny_model_dir, dtype="float32")
    unfused = qwen2.load_model(tiny_model_dir, dtype="float32", fuse=False)
    assert layout_of(fused) == Layout(2, 2, 2) and layout_of(unfused) == Layout(2, 4, 3)
    assert layout_of(qwen2.load_model(tiny_model_dir, dtype="float32", quantize="int8")) == Layout(2, 2, 2)


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_a_profile_gives_the_compiled_step_per_block(tiny_model_dir, quantize):
    model = qwen2.load_model(tiny_model_dir, dtype="float32", quantize=quantize)
    run = profiling.profile_model(model, prompt_tokens=6, new_tokens=6, warmup=0,
                                  fast_path=CompiledCpuPath(model, mode="default"))
    fast = run["fast_decode"]
    assert fast["decoder"] == "cpu-compile" and "cut at its matrix products" in fast["note"], fast["note"]
    assert [layer["index"] for layer in fast["layers"]] == list(range(model.config.num_hidden_layers))
    for layer in fast["layers"]:
        assert layer["attention_ms"] > 0 and layer["mlp_ms"] > 0
        assert layer["total_ms"] == pytest.approx(layer["attention_ms"] + layer["mlp_ms"] + layer["input_layernorm_ms"]
                                                  + layer["post_attention_layernorm_ms"])
    breakdown = fast["breakdown"]
    assert breakdown["lm_head_ms"] > 0 and 0 < breakdown["accounted_fraction"] <= 1
    assert breakdown["accounted_ms"] == pytest.approx(breakdown["layers_ms"] + breakdown["embedding_ms"]
                                                      + breakdown["final_norm_ms"] + breakdown["lm_head_ms"])
    assert fast["instrumentation"]["decode_step_ms_traced"] > 0
    assert problems(run) == []
    # the per-layer chart shows both paths, side by side
    names = [trace.name for trace in layer_latency_figure([run]).data if trace.name]
    assert any(name.endswith("· eager") for name in names) and any(name.endswith("· cpu-compile") for name in names)
    prefill = layer_latency_figure([run], phase="prefill")  # prefill is eager on both paths: no compiled entry
    assert [trace.visible for trace in prefill.data if (trace.name or "").endswith("· cpu-compile")] == [False]


@pytest.mark.slow
def test_a_fast_path_whose_trace_is_not_cut_says_why(tiny_model_dir):
    from tests.test_fast import FullCacheDecoder

    model = qwen2.load_model(tiny_model_dir, dtype="float32")
    run = profiling.profile_model(model, prompt_tokens=6, new_tokens=3, warmup=0, fast_path=FullCacheDecoder(model))
    fast = run["fast_decode"]
    assert "layers" not in fast and "only the compiled CPU step's trace is cut into blocks" in fast["note"]
    names = [trace.name for trace in layer_latency_figure([run]).data if trace.name]
    assert not any("· eager" in name for name in names)  # one path, no pairs
