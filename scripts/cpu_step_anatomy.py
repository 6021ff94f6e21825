"""Where a compiled CPU decode step's time goes: its kernels by kind, and what is left outside them.

    python scripts/cpu_step_anatomy.py [--model .models/Qwen2.5-Coder-0.5B-Instruct] [--quantize int8]
                                       [--dtype bfloat16] [--bucket 256] [--steps 32] [--threads 2]
                                       [--attention cpu_kernel|single_query]

Compiles the step the way `python -m qwen2` does (CompiledCpuPath, Inductor with frozen weights,
max-autotune unless $QWEN2_COMPILE_MODE says otherwise), with Inductor's per-kernel profiling on
(`cpp.enable_kernel_profile`: each generated C++ kernel is a named profiler range), then:
1. times `--steps` steps (median ms per step, tok/s, GB/s of weights read);
2. runs them again under torch.profiler and sums each kernel's self time per step, grouped by kind:
   products (library GEMM / GEMV calls, Inductor's GEMM templates, the int8 / int4 kernels),
   attention (the fused softmax over the cache bucket), norms, the MLP's activation, RoPE, and the
   other fused kernels; "outside the kernels" is the step's wall time minus all of them (the
   Python call, dynamo's guards, the wrapper's allocations).

Kernel kinds come from names (Inductor names a fused kernel after the aten ops in it), so the
split is approximate where one kernel fuses ops of two kinds; the table lists the largest kernels
too. On a shared machine the shares are what to read, not the absolute times.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch._inductor.config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qwen2  # noqa: E402
from profiling.compiled_step import PRODUCT  # noqa: E402
from profiling.memory import weight_bytes  # noqa: E402
from qwen2.cpu_compile import CompiledCpuPath  # noqa: E402
from qwen2.generate import DecodeSession  # noqa: E402

DEBUG = os.environ.get("ANATOMY_DEBUG")  # print every profiler event
# profiler ranges that contain the kernels: their self time is time outside the kernels
CONTAINERS = ("Torch-Compiled Region", "TorchDynamo Cache Lookup", "Pregraph bytecode", "ProfilerStep",
              "## Call CompiledFxGraph", "CompiledFunction")
# (kind, pattern on the kernel name), first match wins
KINDS = [
    ("products", PRODUCT),  # library products, ours, Inductor's GEMM templates (profiling/compiled_step.py)
    ("attention", re.compile(r"softmax|_safe_softmax|scaled_dot|decode_attention")),
    ("norms", re.compile(r"rsqrt|mean|pow")),
    ("MLP activation", re.compile(r"silu|sigmoid")),
    ("RoPE", re.compile(r"cos|sin|cat|neg")),
]


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other fused kernels"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=".models/Qwen2.5-Coder-0.5B-Instruct")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantize", default=None, choices=(None, "int8", "int4"))
    p.add_argument("--bucket", type=int, default=256, help="the cache length the step is compiled for")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attention", default=None, choices=(None, "cpu_kernel", "single_query"),
                   help="the step's attention backend (default: our kernel where it builds)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = qwen2.load_model(args.model, dtype=args.dtype, quantize=args.quantize)
    path = CompiledCpuPath(model, attention=args.attention)  # with cpp.enable_kernel_profile, as every compiled step
    start = time.perf_counter()
    path.warm_up(buckets=[args.bucket])
    print(f"{args.model} {args.dtype} {args.quantize or ''} | compile ({path.mode}) {time.perf_counter() - start:.0f} s | "
          f"torch {torch.__version__} | {torch.get_num_threads()} threads | bucket {args.bucket} | "
          f"attention {path.attention}")

    with DecodeSession(model, 1, args.bucket, fast_path=path) as session:
        logits = session.prefill(torch.zeros(1, 16, dtype=torch.long))
        token = logits.argmax(-1)
        base = session.length

        def steps(n):
            nonlocal token
            session.rewind(base)
            times = []
            for _ in range(n):
                t = time.perf_counter()
                token = session.step(token).argmax(-1)
                times.append(time.perf_counter() - t)
            return times

        steps(4)
        wall = statistics.median(steps(args.steps)) * 1e3
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            steps(args.steps)
    per_kernel = defaultdict(float)
    for event in prof.key_averages():
        if DEBUG:
            print("event", event.key, event.self_cpu_time_total)
        if not event.key.startswith(CONTAINERS):
            per_kernel[event.key] += event.self_cpu_time_total / 1e3 / args.steps  # ms per step
    by_kind = defaultdict(float)
    for name, ms in per_kernel.items():
        by_kind[kind_of(name)] += ms
    inside = sum(by_kind.values())
    weights = weight_bytes(model)["weights_bytes"]
    print(f"step {wall:.1f} ms (median of {args.steps}) = {1e3 / wall:.1f} tok/s, weights read "
          f"{weights / wall / 1e6:.1f} GB/s")
    print(f"{'kind':<22}{'ms/step':>9}{'share':>8}")
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"{kind:<22}{ms:>9.2f}{ms / wall:>8.0%}")
    print(f"{'outside the kernels':<22}{wall - inside:>9.2f}{(wall - inside) / wall:>8.0%}")
    print("largest kernels (ms/step):")
    for name, ms in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {ms:7.2f}  {kind_of(name):<20} {name[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
