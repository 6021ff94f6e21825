"""Our quantized kernels built for AVX-512 with VNNI (two panels and up to eight rows at once) give
the AVX2 build's results bit for bit: the same exact integer sums and the same float32 steps in the
same order (qwen2/csrc/panels.h). Both builds run here, the AVX2 one in a child process built with
QWEN2_KERNEL_AVX512=0, on every tile shape the walk makes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen2 import cpu_kernels
from qwen2.quant import quantize_blocks, quantize_int4_blocks, to_panels
from tests.helpers import ROOT, needs_kernel

ROWS = range(0, 21)  # below the pair walk (0-3), one pair tile of 4-9 rows, two (10-18) and three (19, 20)
SHAPES = [(40, 96), (48, 1600), (64, 4864)]  # 5 panels (a last one alone), 6 and 8 (pairs only)

PRODUCTS = """
import sys
import torch
from safetensors.torch import load_file, save_file
from qwen2 import cpu_kernels

assert cpu_kernels.kernel_error() is None, cpu_kernels.kernel_error()
inputs = load_file(sys.argv[1])
outputs = {}
for name, x in inputs.items():
    if name.startswith("x/"):
        _, kind, shape, rows, dtype = name.split("/")
        weights = [inputs[f"w/{kind}/{shape}/{i}"] for i in range(3 if kind == "int4" else 2)]
        product = torch.ops.qwen2.int8_block_mm if kind == "int8" else torch.ops.qwen2.int4_block_mm
        outputs[name] = product(x, *weights).contiguous()
save_file(outputs, sys.argv[2])
print(cpu_kernels.instruction_set())
"""


def _inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    tensors = {}
    for n, k in SHAPES:
        w = torch.randn(n, k) * 0.05
        tensors[f"f/{n}x{k}"] = w
        for kind, weights in (("int8", to_panels(*quantize_blocks(w))), ("int4", quantize_int4_blocks(w))):
            for i, t in enumerate(weights):
                tensors[f"w/{kind}/{n}x{k}/{i}"] = t.contiguous()
            for rows in ROWS:
                for dtype in (torch.float32, torch.bfloat16):
                    x = torch.randn(rows, k).to(dtype)
                    if rows > 5:
                        x[5, :32] = 0  # an all-zero block of x
                    tensors[f"x/{kind}/{n}x{k}/{rows}/{str(dtype)[6:]}"] = x
    return tensors


def _products_in(tmp_path, env_extra: dict[str, str], inputs: str, name: str) -> tuple[dict, str]:
    out = str(tmp_path / f"{name}.safetensors")
    env = {**os.environ, **env_extra}
    done = subprocess.run([sys.executable, "-c", PRODUCTS, inputs, out], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return load_file(out), done.stdout.strip().splitlines()[-1]


@needs_kernel
@pytest.mark.skipif(cpu_kernels.kernel_error() is not None or cpu_kernels.instruction_set() != "avx512-vnni",
                    reason="this CPU has no AVX-512 VNNI: only the AVX2 kernels are built here")
def test_avx512_kernels_equal_the_avx2_build_bit_for_bit(tmp_path):
    inputs = str(tmp_path / "inputs.safetensors")
    save_file(_inputs(), inputs)
    wide, wide_isa = _products_in(tmp_path, {}, inputs, "avx512")
    narrow, narrow_isa = _products_in(tmp_path, {"QWEN2_KERNEL_AVX512": "0"}, inputs, "avx2")
    assert (wide_isa, narrow_isa) == ("avx512-vnni", "avx2")
    assert wide.keys() == narrow.keys() and len(wide) == 2 * len(SHAPES) * len(ROWS) * 2
    different = [name for name in wide if not torch.equal(wide[name], narrow[name])]
    assert not different, f"{len(different)} products differ between the builds, e.g. {different[:5]}"
    # and they are the products they stand for: x through the float weights, to int8's and int4's error
    tensors = load_file(inputs)
    for kind, error in (("int8", 0.01), ("int4", 0.15)):
        for n, k in SHAPES:
            x, w = tensors[f"x/{kind}/{n}x{k}/9/float32"], tensors[f"f/{n}x{k}"]
            exact = x @ w.t()
            assert (wide[f"x/{kind}/{n}x{k}/9/float32"] - exact).norm() < error * exact.norm()
