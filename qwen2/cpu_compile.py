"""Compiled CPU decode: the decode step compiled once with Inductor and reused for every token.

At one token per step a CPU decode is a string of matrix-vector products, one per weight matrix, and
its speed is how fast those stream their weights from memory. torch's eager kernels reach a fraction
of the machine's bandwidth at one row; Inductor, with the weights frozen into the compiled graph
(`freezing`: constants it may pre-pack into the layout its GEMM kernels want) and the small ops
between the products fused, gets closer. The math is the model's own forward, unchanged.

Inductor specialises the step to its shapes, so the step always has the same ones: the KV cache is
one of the pool's fixed-size caches (qwen2/fast_path.py: a power-of-two length bucket) and attention
reads all of it under a mask (kv_len=None). One compiled step serves a (batch size, bucket, padded)
combination; a new combination compiles once, on first use. `warm_up` pays the first compile at
start-up, with progress messages, so the first reply does not.

Prefill stays eager (its shapes change with every prompt; its products are matrix-matrix and
already near peak). int8 / int4 weights (qwen2/quant.py) go through the same path: their kernels are
calls in the graph, and Inductor fuses what surrounds them.

What it gains and what it costs (decode speed, compile time per (batch, bucket)) is measured in
docs/benchmarks.md. Frozen bf16 weights are a second, prepacked copy of the weights in memory (the
eager prefill keeps using the originals).
"""

from __future__ import annotations

import os
import threading
import time

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from .cpu_attention import decode_backend
from .fast_path import CacheLease, FastPath, cache_bucket

# Inductor options per compile mode. "max-autotune" times Inductor's own C++ GEMM templates against
# the library kernels for every product and keeps the faster: slower to compile, the faster step
# (per-product timings: docs/benchmarks.md). On CPU "max-autotune-no-cudagraphs" is the same thing
# (CUDA graphs do not apply).
COMPILE_MODES = {
    "default": {},
    "max-autotune": {"max_autotune": True},
    "max-autotune-no-cudagraphs": {"max_autotune": True},
}
DEFAULT_MODE = "max-autotune"


def default_mode() -> str:
    """The compile mode when none is given: $QWEN2_COMPILE_MODE where set (the test suite sets
    "default": it checks the compiled step, not its speed), else DEFAULT_MODE."""
    return os.environ.get("QWEN2_COMPILE_MODE") or DEFAULT_MODE


def checked_mode(model, mode: str | None) -> str:
    """`mode` (default_mode() when None) once it and the model's device are known to compile; both
    compiled CPU decoders (CompiledCpuPath here, the engine's CompiledCpuSteps) start with this."""
    from .errors import ConfigError

    if model.device.type != "cpu":
        raise ConfigError(f"the compiled CPU decode needs a CPU model; this one is on {model.device}")
    mode = mode or default_mode()
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile mode {mode!r} is unknown; expected one of {sorted(COMPILE_MODES)}")
    return mode


# One compiled step per (batch size, bucket, padded): allow more than dynamo's default of 8.
_RECOMPILE_LIMIT = 64


def _recompile_limit_name() -> str:
    config = torch._dynamo.config
    return "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"


def recompile_limit_raised():
    """Dynamo's limit of compiles per function raised to _RECOMPILE_LIMIT, around a compile only."""
    config, name = torch._dynamo.config, _recompile_limit_name()
    return config.patch(**{name: max(getattr(config, name), _RECOMPILE_LIMIT)})


class CacheKeyTag(CustomGraphPass):
    """A post-grad pass that changes nothing; its tag joins Inductor's cache key (custom passes'
    uuid() do). Inductor's cache takes a stored graph whose shape guards hold for the compile's
    example, whatever range the compile asked for (torch._dynamo.mark_dynamic's min and max): a
    graph stored for another range of key counts would be taken, and its guards would break this
    one (ConstraintViolationError). Tagged with its range, each compile finds only its own."""

    def __init__(self, tag: str):
        self.tag = tag

    def __call__(self, graph: torch.fx.graph.Graph) -> None:
        pass

    def uuid(self) -> str:
        return self.tag


class CompiledCpuPath(FastPath):
    """Runs DecodeSession's steps through an Inductor-compiled forward on pooled, fixed-size caches."""

    name = "cpu-compile"
    # The step reads its whole bucket under a mask, and that is not free on CPU: a large bucket
    # decodes markedly slower than a small one (docs/benchmarks.md). So buckets stay
    # small (a chat moves up as it grows: qwen2/chat.py) and warm_up compiles the first few.
    warm_buckets = (256, 512, 1024)
    # The compiled step is specialised to shapes, not to one cache: every live conversation the app
    # keeps (four) decodes through it, each in a cache of its own.
    leases_per_bucket = 4

    def __init__(self, model, mode: str | None = None, attention: str | None = None):
        mode = checked_mode(model, mode)
        super().__init__(model)
        self.mode = mode
        # for the compiled step's calls only (prefill, T > 1, goes to SDPA anyway): our kernel for one
        # query row where it builds, else the model's math for it, which Inductor fuses
        self.attention = attention or decode_backend(model.device)
        # Inductor reads `freezing` from its global config while it compiles (torch.compile's
        # options= does not reach it: measured, the weights then stay graph inputs and the products
        # plain aten::mm), so a compile runs under a patch of the config; a compiled step needs none.
        # cpp.enable_kernel_profile: each generated kernel is a named profiler range, so a trace of
        # the step can be cut at its products (profiling/compiled_step.py); it costs nothing unless
        # a profiler is running.
        self.inductor_config = {"freezing": True, "cpp.enable_kernel_profile": True, **COMPILE_MODES[mode]}
        self.step_fn = torch.compile(self._forward, fullgraph=True, dynamic=False)
        self.compiled: dict[tuple, float] = {}  # (batch, bucket, padded) -> seconds its compile took
        self._compile_lock = threading.Lock()

    def _forward(self, ids, cache, slots, positions):
        return self.model(ids, cache=cache, slots=slots, positions=positions, kv_len=None, last_only=True,
                          attention=self.attention)[:, -1]

    def step(self, lease: CacheLease, token_ids, slot, positions):
        cache, state = lease.cache, lease.state
        # The step reads its inputs from buffers of the lease: the compiled graph is guarded on
        # how its input tensors were made (an inference-mode tensor or not), and the caller's ids
        # may be either (the warm-up's argmax vs a sampler's), which would recompile in the first reply.
        if "ids" not in state:  # a lease's batch size never changes (it is part of its pool key)
            state["ids"] = torch.zeros(token_ids.shape[0], 1, dtype=torch.long)
            state["positions"] = torch.zeros(token_ids.shape[0], 1, dtype=torch.long)
            state["slots"] = torch.zeros(1, dtype=torch.long)
        ids, slots = state["ids"], state["slots"]
        ids.copy_(token_ids[:, None])
        positions = state["positions"].copy_(positions)
        slots.fill_(slot)
        key = (cache.batch_size, cache.max_len, bool(cache.padded))
        if key in self.compiled:
            return self.step_fn(ids, cache, slots, positions)
        # one compile at a time; the options and the raised recompile limit hold for the compile only
        with self._compile_lock, torch._inductor.config.patch(self.inductor_config), recompile_limit_raised():
            start = time.perf_counter()
            logits = self.step_fn(ids, cache, slots, positions)
            self.compiled[key] = time.perf_counter() - start
        return logits

    def warm_up(self, progress=None, prompt_len: int = 16, new_tokens: int = 4, buckets=None):
        """Compile the step for one row and each of `buckets` (cache lengths; default warm_buckets)
        now, not in a reply. progress(fraction, message) is told before each compile and when done."""
        limit = self.model.config.max_position_embeddings
        sizes = sorted({cache_bucket(b, limit, self.min_bucket) for b in buckets or self.warm_buckets})
        self._warm_up(sizes, progress, prompt_len, new_tokens)
        if progress is not None:
            progress(1.0, f"CPU decode step compiled in {sum(self.compiled.values()):.0f} s")

    def _warm_up(self, sizes, progress, prompt_len, new_tokens):
        from .generate import DecodeSession

        for i, size in enumerate(sizes):
            if progress is not None:
                progress(i / len(sizes), f"compiling the CPU decode step (Inductor, {self.mode}) for "
                                         f"{size}-token caches ({i + 1}/{len(sizes)})…")
            with DecodeSession(self.model, 1, size, fast_path=self) as session:
                n_prompt = max(1, min(prompt_len, size - new_tokens))
                logits = session.prefill(torch.zeros(1, n_prompt, dtype=torch.long))
                for _ in range(min(new_tokens, session.cache.max_len - n_prompt)):
                    logits = session.step(logits.argmax(-1))
