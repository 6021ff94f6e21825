"""Our one-query-row attention kernel (qwen2/csrc/decode_attention.cpp, qwen2/cpu_attention.py): the
kernel against float64 attention, its masks and dtypes, rows read in place from the serving engine's
pool, its errors, and its place in the compiled CPU decode steps. The compiled steps' parity with
eager (which now runs through it) is in tests/test_cpu_compile.py and tests/test_engine.py."""

from __future__ import annotations

import pytest
import torch

import qwen2
from qwen2 import cpu_attention, cpu_kernels
from qwen2.cpu_compile import CompiledCpuPath
from qwen2.generate import DecodeSession
from qwen2.model import CAUSAL, single_query_attention
from tests.helpers import needs_kernel, rand_ids


def _reference(q, k, v, mask, scale):
    """The model's math in float64."""
    return single_query_attention(q.double(), k.double(), v.double(), mask, scale)


@needs_kernel
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(14, 2, 64), (12, 2, 128), (4, 4, 8), (18, 2, 16), (6, 2, 12)],
                         ids=["0.5B", "1.5B", "no-groups", "9-groups", "odd-head-dim"])
@pytest.mark.parametrize("keys", [1, 9, 300])
@pytest.mark.parametrize("masking", ["none", "per-row", "shared"])
def test_kernel_equals_float64_attention(heads, kv_heads, head_dim, keys, masking):
    torch.manual_seed(keys + heads)
    B = 3
    q = torch.randn(B, heads, 1, head_dim)
    k, v = torch.randn(B, kv_heads, keys, head_dim) * 3, torch.randn(B, kv_heads, keys, head_dim)
    mask = torch.rand(B, 1, 1, keys) > 0.4
    mask[..., -1] = True  # a row's own key
    mask = {"none": None, "per-row": mask, "shared": mask[:1]}[masking]
    out = cpu_attention.kernel_attention(q, k, v, mask, head_dim ** -0.5)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _reference(q, k, v, mask, head_dim ** -0.5), atol=1e-5, rtol=0)


@needs_kernel
def test_masked_keys_do_not_count_whatever_they_hold():
    q, k, v = torch.randn(1, 14, 1, 64), torch.randn(1, 2, 40, 64), torch.randn(1, 2, 40, 64)
    mask = torch.zeros(1, 1, 1, 40, dtype=torch.bool)
    mask[..., :25] = True
    before = cpu_attention.kernel_attention(q, k, v, mask, 0.125)
    k[:, :, 25:], v[:, :, 25:] = 1e30, float("nan")  # a fixed-size cache's unused slots hold anything
    assert torch.equal(cpu_attention.kernel_attention(q, k, v, mask, 0.125), before)
    torch.testing.assert_close(before, single_query_attention(q, k[:, :, :25], v[:, :, :25], None, 0.125),
                               atol=1e-6, rtol=0)


@needs_kernel
@pytest.mark.parametrize("head_dim, keys", [(64, 70), (64, 700), (12, 400)])
@pytest.mark.parametrize("masked", [False, True], ids=["all-keys", "masked"])
def test_a_bfloat16_cache_is_summed_in_float32(head_dim, keys, masked):
    """bf16 values widened a chunk at a time (several chunks at 700 keys; at head_dim 12, the plain
    C++ loops), masked or not: the float64 result of the same bf16 values, rounded once to bf16."""
    torch.manual_seed(keys + head_dim)
    q, k, v = (torch.randn(2, 14, 1, head_dim).bfloat16(), torch.randn(2, 2, keys, head_dim).bfloat16(),
               torch.randn(2, 2, keys, head_dim).bfloat16())
    mask = None
    if masked:
        mask = torch.rand(2, 1, 1, keys) > 0.5
        mask[..., -1] = True
    scale = head_dim ** -0.5
    out = cpu_attention.kernel_attention(q, k, v, mask, scale)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), _reference(q, k, v, mask, scale), atol=1e-6, rtol=2 ** -8)


@needs_kernel
def test_strided_cache_views_and_the_causal_marker():
    cache_k, cache_v = torch.randn(1, 2, 64, 64), torch.randn(1, 2, 64, 64)
    k, v = cache_k[:, :, :21], cache_v[:, :, :21]  # the first 21 slots of a larger cache: not contiguous
    q = torch.randn(1, 14, 1, 64)
    out = cpu_attention.kernel_attention(q, k, v, CAUSAL, 0.125)  # one query row: CAUSAL hides nothing
    torch.testing.assert_close(out.double(), _reference(q, k, v, None, 0.125), atol=1e-5, rtol=0)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masking", ["none", "per-row", "shared"])
def test_rows_read_in_place_from_the_pool_equal_the_gathered_rows(dtype, masking):
    """The serving engine's pool (rows, Hkv, slots, hd): the kernel reads each entry's row where it
    is (PooledRows), the same result as gathering the rows first; nothing past `keys` slots counts."""
    torch.manual_seed(3)
    pool_k, pool_v = torch.randn(5, 2, 96, 64).to(dtype), torch.randn(5, 2, 96, 64).to(dtype)
    rows, n = torch.tensor([4, 0, 2]), 70
    q = torch.randn(3, 14, 1, 64).to(dtype)
    mask = None
    if masking != "none":
        mask = torch.rand(3, 1, 1, n) > 0.3
        mask[..., -1] = True
        mask = mask if masking == "per-row" else mask[:1]  # one mask for every entry, whichever its row
    k, v = cpu_attention.PooledRows(pool_k, rows, n), cpu_attention.PooledRows(pool_v, rows, n)
    out = cpu_attention.kernel_attention(q, k, v, mask, 0.125)
    gathered = cpu_attention.kernel_attention(q, k.gathered(), v.gathered(), mask, 0.125)
    assert torch.equal(out, gathered)
    pool_k[:, :, n:], pool_v[:, :, n:] = 1e30, float("nan")  # slots past the keys read: never touched
    assert torch.equal(cpu_attention.kernel_attention(q, k, v, mask, 0.125), out)


@needs_kernel
def test_pooled_rows_with_several_query_rows_are_gathered_for_the_models_math():
    pool_k, pool_v = torch.randn(3, 2, 32, 64), torch.randn(3, 2, 32, 64)
    rows = torch.tensor([1])
    k, v = cpu_attention.PooledRows(pool_k, rows, 12), cpu_attention.PooledRows(pool_v, rows, 12)
    q, mask = torch.randn(1, 14, 3, 64), torch.ones(1, 1, 3, 12, dtype=torch.bool).tril(9)
    torch.testing.assert_close(cpu_attention.kernel_attention(q, k, v, mask, 0.125),
                               single_query_attention(q, pool_k[1:2, :, :12], pool_v[1:2, :, :12], mask, 0.125))


@needs_kernel
def test_several_query_rows_go_to_the_models_math():
    q, k, v = torch.randn(1, 14, 3, 64), torch.randn(1, 2, 12, 64), torch.randn(1, 2, 12, 64)
    mask = torch.ones(1, 1, 3, 12, dtype=torch.bool).tril(9)
    torch.testing.assert_close(cpu_attention.kernel_attention(q, k, v, mask, 0.125),
                               single_query_attention(q, k, v, mask, 0.125))


@needs_kernel
def test_kernel_refuses_wrong_shapes_and_dtypes_with_what_it_expected():
    k = v = torch.randn(1, 2, 8, 64)
    with pytest.raises(RuntimeError, match=r"q must be \(1, a multiple of 2, 64\)"):
        torch.ops.qwen2.decode_attention(torch.randn(1, 3, 64), k, v, None, 8, None, 0.125)
    with pytest.raises(RuntimeError, match="k and v must both be float32 or both bfloat16"):
        torch.ops.qwen2.decode_attention(torch.randn(1, 14, 64), k, v.bfloat16(), None, 8, None, 0.125)
    with pytest.raises(RuntimeError, match=r"valid must be a bool \(1 or 1, 8\)"):
        torch.ops.qwen2.decode_attention(torch.randn(1, 14, 64), k, v, None, 8, torch.ones(1, 9, dtype=torch.bool), 0.125)
    with pytest.raises(RuntimeError, match=r"keys must be 1 to 8 \(the slots of k and v\); got 9"):
        torch.ops.qwen2.decode_attention(torch.randn(1, 14, 64), k, v, None, 9, None, 0.125)
    with pytest.raises(RuntimeError, match=r"rows\[1\] = 3 is not a row of k and v \(0 to 0\)"):
        torch.ops.qwen2.decode_attention(torch.randn(2, 14, 64), k, v, torch.tensor([0, 3]), 8, None, 0.125)
    with pytest.raises(RuntimeError, match=r"rows must be an int64 \(2,\) tensor"):
        torch.ops.qwen2.decode_attention(torch.randn(2, 14, 64), k, v, torch.tensor([0, 0], dtype=torch.int32), 8,
                                         None, 0.125)
    with pytest.raises(RuntimeError, match="without rows, k and v must have q's 2 rows; got 1"):
        torch.ops.qwen2.decode_attention(torch.randn(2, 14, 64), k, v, None, 8, None, 0.125)
    with pytest.raises(RuntimeError, match="contiguous in head_dim"):
        columns = torch.randn(1, 2, 64, 8).transpose(2, 3)  # (1, 2, 8, 64), head_dim strided
        torch.ops.qwen2.decode_attention(torch.randn(1, 14, 64), columns, columns, None, 8, None, 0.125)


@needs_kernel
@pytest.mark.slow
def test_compiled_decode_step_calls_the_kernel_and_matches_the_models_math(tiny_model_dir):
    model = qwen2.load_model(tiny_model_dir, dtype="float32")
    ids = rand_ids(7, (1, 14))
    logits = {}
    for attention in ("cpu_kernel", "single_query"):
        path = CompiledCpuPath(model, mode="default", attention=attention)
        torch._dynamo.reset()  # each backend its own compile of the step
        with torch.inference_mode(), DecodeSession(model, 1, 256, fast_path=path) as session:
            out = [session.prefill(ids[:, :6])]
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for t in range(6, 14):
                    out.append(session.step(ids[:, t]))
        called = any(event.key == "qwen2::decode_attention" for event in prof.key_averages())
        assert called == (attention == "cpu_kernel")
        logits[attention] = torch.stack(out, 1)
    torch.testing.assert_close(logits["cpu_kernel"], logits["single_query"], atol=1e-5, rtol=0)
    assert CompiledCpuPath(model, mode="default").attention == "cpu_kernel"  # the default where the kernels build


def test_without_the_kernels_the_compiled_steps_keep_the_models_math(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "kernel_error", lambda: "turned off by QWEN2_NO_KERNELS")
    assert cpu_attention.decode_backend(torch.device("cpu")) == "single_query"
    assert cpu_attention.decode_backend(torch.device("meta")) == "single_query"
