"""int8 in blocks of 32 (qwen2/quant.py, the kernel in qwen2/csrc/int8_blocks.cpp): the rounding,
the panel order, the kernel against the float64 sum it stands for (x rounded to int16 per block),
the prompt path, whole models, and the fallback to per-channel int8 where the kernel cannot be built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import qwen2
from qwen2 import cpu_kernels
from qwen2.errors import ConfigError
from qwen2.quant import (BLOCK, Int8BlockLinear, Int8Linear, dequantize, panel_rows, quantize_blocks, quantize_model,
                         to_panels)
from tests.helpers import (ROOT, float_model_holding_rounded_weights, make_checkpoint, needs_kernel, rand_ids,
                           round_x_in_blocks)


def test_quantize_blocks_error_is_within_half_a_step_of_each_blocks_stored_scale():
    w = torch.randn(48, 128) * torch.rand(48, 4).repeat_interleave(BLOCK, 1) * 3
    w[5, 32:64] = 0  # an all-zero block
    q, scales = quantize_blocks(w)
    assert q.dtype == torch.int8 and scales.dtype == torch.float16 and scales.shape == (48, 4)
    blocks = q.view(48, 4, BLOCK)
    assert blocks.abs().amax(-1)[scales != 1].eq(127).all()  # each block's largest weight takes the full range
    assert blocks[5, 1].eq(0).all() and scales[5, 1] == 1
    err = (dequantize(q, scales, torch.float32) - w).abs().view(48, 4, BLOCK)
    assert (err <= scales.float()[..., None] / 2 * (1 + 1e-6)).all()


def round_x_to_int16(x: torch.Tensor) -> torch.Tensor:
    """The kernel's rounding of x (M, K) to int16 per block, back in float64."""
    levels, dx, _ = round_x_in_blocks(x, 32767)
    return (levels.double() * dx.double()[..., None]).view(x.shape)


def test_panel_order_round_trips_and_is_the_documented_one():
    q, scales = quantize_blocks(torch.randn(16, 64))
    panels, panel_scales = to_panels(q, scales)
    runs = panels.view(2, 2, 16, 8, 2)  # [panel, block, run, channel in panel, input of the pair]
    for panel, block, run, c, j in [(0, 0, 0, 0, 0), (1, 1, 15, 7, 1), (0, 1, 3, 5, 0), (1, 0, 9, 2, 1)]:
        assert runs[panel, block, run, c, j] == q[8 * panel + c, BLOCK * block + 2 * run + j]
        assert panel_scales.view(2, 2, 8)[panel, block, c] == scales[8 * panel + c, block]
    ids = torch.tensor([[3, 15], [8, 0]])
    rows, row_scales = panel_rows(panels, panel_scales, ids)
    assert torch.equal(rows, q[ids]) and torch.equal(row_scales, scales[ids])


@needs_kernel
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 7, 13, 32])  # tiles of 4, 3, 2 and 1
@pytest.mark.parametrize("shape", [(40, 96), (24, 1600)], ids=["narrow", "wide"])  # 5 and 3 panels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_the_float64_product_over_int16_rounded_x(rows, shape, dtype):
    q, scales = quantize_blocks(torch.randn(*shape))
    x = torch.randn(rows, shape[1]).to(dtype)
    if rows > 1:
        x[1, :BLOCK] = 0  # an all-zero block of x
    y = torch.ops.qwen2.int8_block_mm(x, *to_panels(q, scales))
    assert y.dtype == dtype and y.shape == (rows, shape[0])
    w = dequantize(q, scales, torch.float64)
    rounded = round_x_to_int16(x)
    expected = rounded @ w.t()
    # Exact integer sums per block, then float32 across blocks: within float32 rounding of the sum of
    # the terms' sizes (a block left out or counted twice is far outside), then one rounding to x's dtype.
    bound = 1e-6 * (rounded.abs() @ w.abs().t()) + (2 ** -8 if dtype == torch.bfloat16 else 0) * expected.abs()
    assert ((y.double() - expected).abs() <= bound).all()
    # and x's rounding is within half a level, 1 / 65534 of each block's largest value (and float32's
    # rounding of x times the scale: up to 32767 * 2^-24 of a level)
    amax = x.float().abs().view(rows, shape[1] // BLOCK, BLOCK).amax(-1).double().repeat_interleave(BLOCK, 1)
    assert ((rounded - x.double()).abs() <= amax / 65534 * 1.005).all()


@needs_kernel
def test_kernel_refuses_wrong_shapes_and_dtypes_with_what_it_expected():
    q, scales = to_panels(*quantize_blocks(torch.randn(8, 64)))
    with pytest.raises(RuntimeError, match=r"q must be \(N, 96\)"):
        torch.ops.qwen2.int8_block_mm(torch.randn(1, 96), q, scales)
    with pytest.raises(RuntimeError, match=r"scales must be \(8, 2\)"):
        torch.ops.qwen2.int8_block_mm(torch.randn(1, 64), q, scales[:, :1])
    with pytest.raises(RuntimeError, match="int8 and scales float16"):
        torch.ops.qwen2.int8_block_mm(torch.randn(1, 64), q, scales.float())


@needs_kernel
@pytest.mark.parametrize("rows", [1, 9, 70], ids=["decode", "draft", "prompt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_linear_equals_its_dequantized_float_linear(rows, dtype):
    linear = torch.nn.Linear(96, 40, bias=True).to(dtype)
    layer = Int8BlockLinear.from_linear(linear)
    x = torch.randn(2, rows, 96).to(dtype)
    assert torch.equal(layer.dequantize(), dequantize(*quantize_blocks(linear.weight.data), torch.float32))
    rounded = round_x_to_int16(x.reshape(-1, 96)).float().view(x.shape)
    expected = F.linear(rounded, layer.dequantize(), linear.bias.float())
    got = layer(x)
    assert got.dtype == dtype and got.shape == (2, rows, 40)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7  # bf16: the product's rounding, then the bias sum's
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)


@needs_kernel
@pytest.mark.parametrize("tied", [True, False])
def test_block_int8_model_matches_its_dequantized_weights(tmp_path, tied):
    directory = make_checkpoint(tmp_path, with_tokenizer=False, tie_word_embeddings=tied)
    q8 = qwen2.load_model(directory, dtype="float32", quantize="int8")
    assert q8.info.quant_layout == "blocks of 32"
    assert isinstance(q8.lm_head, Int8BlockLinear) and isinstance(q8.model.layers[0].mlp.down_proj, Int8BlockLinear)
    ref = float_model_holding_rounded_weights(directory, quantize_blocks)
    for ids in (rand_ids(1, (2, 12)), rand_ids(2, (1, 40))):
        torch.testing.assert_close(q8(ids), ref(ids), atol=1e-4, rtol=0)
    assert list(qwen2.generate(q8, ids, max_new_tokens=10, stop_token_ids=[])) == \
        list(qwen2.generate(ref, ids, max_new_tokens=10, stop_token_ids=[]))

    def nbytes(model):
        return sum(p.numel() * p.element_size() for p in model.parameters())

    per_channel = quantize_model(qwen2.load_model(directory, dtype="float32"), "int8", blocks=False)
    assert per_channel.info.quant_layout == "per channel" and isinstance(per_channel.lm_head, Int8Linear)
    extra = nbytes(q8) - nbytes(per_channel)  # a float16 scale per 32 weights instead of a float32 one per row
    int8_weights = sum(p.numel() for p in q8.parameters() if p.dtype == torch.int8)
    assert 0 < extra <= int8_weights * 2 / BLOCK


@needs_kernel
def test_compiled_step_calls_the_kernel_and_matches_eager(tiny_model_dir):
    model = qwen2.load_model(tiny_model_dir, dtype="float32", quantize="int8")
    ids = rand_ids(3, (1, 9))
    step = torch.compile(model, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        torch.testing.assert_close(step(ids), model(ids), atol=1e-5, rtol=0)


def test_asking_for_blocks_where_the_kernel_is_missing_names_why(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "kernel_error", lambda: "building int8_blocks.cpp failed: no compiler")
    model = qwen2.load_model(tiny_model_dir, dtype="float32")
    with pytest.raises(ConfigError, match="blocks=True needs our CPU kernels.*no compiler"):
        quantize_model(model, "int8", blocks=True)
    assert quantize_model(model, "int8").info.quant_layout == "per channel"  # the default falls back


@pytest.mark.parametrize("env, why", [({"QWEN2_NO_KERNELS": "1"}, "turned off by QWEN2_NO_KERNELS"),
                                      ({"CXX": "/bin/false"},
                                       f"building {', '.join(source.name for source in cpu_kernels.SOURCES)} failed")],
                         ids=["turned-off", "no-compiler"])
def test_without_the_kernels_int8_and_int4_fall_back_to_torchs_and_say_why(tiny_model_dir, tmp_path, env, why):
    code = ("import warnings, qwen2\n"
            "from qwen2 import cpu_kernels\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            f"    m = qwen2.load_model({str(tiny_model_dir)!r}, dtype='bfloat16', quantize='int8')\n"
            f"    m4 = qwen2.load_model({str(tiny_model_dir)!r}, dtype='bfloat16', quantize='int4')\n"
            "print(m.info.quant_layout, '|', m4.info.quant_layout, '|', cpu_kernels.kernel_error(), '|',"
            " [str(w.message) for w in caught])\n")
    env = {**os.environ, "QWEN2_KERNEL_CACHE": str(tmp_path / "kernels"), **env}  # an empty cache: it must build
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    layout, layout4, error, warned = done.stdout.strip().splitlines()[-1].split(" | ")
    assert layout == "per channel" and layout4 == "groups of 32" and error.startswith(why)
    if "CXX" in env:  # a build that fails is warned about
        assert "int8 falls back to per-channel scales, int4 to torch's kernel" in warned


def test_the_build_finds_the_pip_installed_ninja_when_it_is_not_on_path(monkeypatch):
    # torch's extension builder runs plain `ninja`; a virtual environment used without activating
    # it has requirements.txt's ninja beside its python, not on PATH
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    try:
        import ninja
        expected = ninja.BIN_DIR
    except ImportError:
        expected = os.path.dirname(sys.executable)
    assert cpu_kernels._ninja_dir() == expected
    monkeypatch.undo()
    assert (cpu_kernels._ninja_dir() is None) == (shutil.which("ninja") is not None)  # on PATH: nothing to add


@needs_kernel
def test_a_damaged_library_in_the_cache_is_built_anew(tmp_path):
    key = cpu_kernels._build_key()
    library = tmp_path / key / f"qwen2_kernels_{key}.so"
    library.parent.mkdir()
    library.write_bytes(b"not a shared library")
    code = "from qwen2 import cpu_kernels; print(cpu_kernels.kernel_error())"
    env = {**os.environ, "QWEN2_KERNEL_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "None", done.stderr[-2000:]
    assert library.stat().st_size > 10_000


def _our_products():
    """Each of our product kernels as (name, x -> y) over random weights of 24 outputs and 2048 inputs."""
    from qwen2.quant import quantize_int4_blocks
    from qwen2.upcast import to_panels as bf16_panels

    w = torch.randn(24, 2048)
    int8 = to_panels(*quantize_blocks(w))
    int4 = quantize_int4_blocks(w)
    bf16 = bf16_panels(w.bfloat16())
    return [("int8_block_mm", lambda x: torch.ops.qwen2.int8_block_mm(x, *int8)),
            ("int4_block_mm", lambda x: torch.ops.qwen2.int4_block_mm(x, *int4)),
            ("bf16_panel_mm", lambda x: torch.ops.qwen2.bf16_panel_mm(x, bf16))]


@needs_kernel
def test_each_kernel_takes_x_in_its_dtype_and_keeps_no_state_between_calls():
    """bf16 x is read and y written in bf16 by the kernels themselves: y is the float32 product of the
    same x, rounded once. Small calls reuse the calling thread's working memory, a prompt's larger
    one gets its own: calls of any size, in any order, give the same results."""
    torch.manual_seed(0)
    xs = [torch.randn(rows, 2048) for rows in (1, 300, 2, 1, 150, 4)]  # 300 x 2048 int16: past the kept 1 MB
    for name, product in _our_products():
        first = [product(x) for x in xs]
        again = [product(x) for x in reversed(xs)][::-1]
        for x, y, y_again in zip(xs, first, again):
            assert torch.equal(y, y_again), (name, x.shape)
            x16 = x.bfloat16()
            assert torch.equal(product(x16), product(x16.float()).bfloat16()), (name, x.shape)
        # a float16 x takes float32 copies: the same product, in float16
        x = xs[0].half()
        assert torch.equal(product(x), product(x.float()).half()), name
        # a non-contiguous x (a view) reads as its contiguous copy
        wide = torch.randn(3, 4096)[:, ::2]
        assert torch.equal(product(wide), product(wide.contiguous())), name
