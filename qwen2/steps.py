"""Step runners: how the serving engine's forwards are launched. The math is the model's own.

Three kinds of forward run on the engine's RowCache (qwen2/cache.py):
  prefill(cache, row, ids, start)          one conversation's next prompt chunk (1, T) at `start`
  decode(cache, rows, ids, positions)      one new token for each of B conversations, one batched forward
  verify(cache, row, ids, position)        one conversation's pending token and its drafted guesses
                                           (speculative decoding): the logits after each of them

EagerSteps calls the modules as they are. CompiledCpuSteps compiles the decode step with Inductor
twice: for one row, and for 2 to `max_batch` rows with the batch size left symbolic (a batch of
3 is 3 rows, no padding), and the number of keys read symbolic in both, so a joining or leaving
conversation or one growing longer never recompiles. It compiles the verification too, for a fixed
width of VERIFY_WIDTH tokens (shorter drafts are padded: their extra keys land past the row's
length, where nothing reads them before they are written again), and a second time for
WIDE_VERIFY_WIDTH tokens where that costs little more (`verify_widths`): long drafts of code copied
from the prompt then go through in one forward. A decode step's attention is
our kernel where it builds (qwen2/cpu_attention.py), which does its own sums: one compile serves
every key count of a row. Inductor's own softmax (the verification, and the decode steps where the
kernel does not build) sums over more than 4096 keys in chunks, and guards the compiled step to the
side of that line its example fell on: the verification serves rows up to 4096 keys, and without
our kernel the one-row step is compiled a second time for the keys beyond (MAX_COMPILED_KEYS), so
a long conversation keeps its compiled step. The compiles run on a thread of
their own while the engine serves eagerly; each is used from the first step after it is ready.
Prefill stays eager: its shapes change with every prompt, and its products are matrix-matrix,
already near peak.

What verifying T tokens costs, in one-token steps, is the step runner's to say (`verify_cost`): the
engine's DraftGate (qwen2/speculative.py) verifies only the guesses expected to pay for it.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time

import torch

from .cache import RowBatch, RowCache
from .cpu_attention import PooledRowBatch, decode_backend
from .errors import ConfigError
from .generate import eager_attention_kernels
from .model import attention_mask_for, visibility_mask
from .speculative import CPU_VERIFY_COST


def rows_forward(model, cache: RowCache, rows, ids, positions, key_slots, attention=None, last_only=True):
    """Logits (B, V) after the last of `ids` (B, T) (last_only=False: (B, T, V), after each), each
    entry written at `positions` (B, T) of its row of `cache` and reading that row's slots [0, S)
    (key_slots = arange(S)) up to its own position."""
    if ids.shape[0] == 1:  # one row: the masks that let SDPA pick its fastest kernels
        masks = {kind: attention_mask_for(positions[0], key_slots, None, window, reads_exact_past=True)
                 for kind, window in model.layer_windows()}
    else:
        masks = {kind: visibility_mask(positions, key_slots, None, window) for kind, window in model.layer_windows()}
    # our kernel reads the rows in place (cpu_attention.PooledRows); the model's math gathers them
    batch = (PooledRowBatch if attention == "cpu_kernel" else RowBatch)(cache, rows, positions, key_slots)
    logits = model.run(ids, positions, masks, batch, last_only=last_only, attention=attention)
    return logits[:, -1] if last_only else logits


# Inductor's CPU sums of float32 switch to chunked (cascade) summation above 4096 terms, and the
# compiled step is guarded to its example's side of that line (torch 2.13, codegen/cpp.py
# need_use_acc_helper): one compile serves 2..4096 keys, a second one ("long") the rest of the row.
# Only where Inductor sums the softmax: our attention kernel sums it itself, and one compile serves
# the whole row (tests/test_engine.py).
MAX_COMPILED_KEYS = 4096

# The compiled verification's width: the pending token and up to 3 guesses. On a 2-vCPU AMD EPYC
# (AVX2), Qwen2.5-Coder-0.5B, max-autotune (docs/benchmarks.md, "compiled verification"), a
# verification cost, in one-token steps: int8 1.73 (2 tokens), 1.80 (4), 3.43 (8); bfloat16 1.27
# (3), 2.23 (5), 3.05 (9). Four tokens get the most guesses for the price of about two steps; what
# it costs on the machine at hand is timed as it runs (`verify_cost`).
VERIFY_WIDTH = 4

# The wide verification (up to 8 guesses), compiled beside the narrow one where our int8 / int4
# kernels are built for AVX-512 VNNI: they take up to nine rows of x against each weight in one pass
# (qwen2/csrc/panels.h), so nine tokens cost a fraction more than four. On a 2-vCPU AMD EPYC with
# AVX-512 (Zen 5), int8, a nine-token verification cost 1.58 steps against 1.24 for four, and code
# edits sped up 2.25x / 2.57x with both widths against 1.67x / 1.78x with four only
# (docs/benchmarks.md, fifteenth round). A bf16 model's dot products (qwen2/csrc/bf16_dot.cpp, CPUs
# with AVX-512 BF16) take up to nine rows the same way: nine tokens at ~1.25 steps
# (seventeenth round). Elsewhere nine rows cost 3-4 steps: the narrow width alone.
WIDE_VERIFY_WIDTH = 9


def verify_widths(model) -> tuple[int, ...]:
    """The verification widths worth compiling for `model`: VERIFY_WIDTH, and WIDE_VERIFY_WIDTH where
    its products run on our kernels that take nine rows in one pass over the weights: the quantized
    ones built for AVX-512 VNNI, or the bf16 dot products."""
    from . import cpu_kernels
    from .bf16_dot import Bf16DotLinear
    from .quant import Int4BlockLinear, Int8BlockLinear

    if model.device.type != "cpu":
        return (VERIFY_WIDTH,)
    vnni = cpu_kernels.instruction_set(build=False) == "avx512-vnni"
    wide = any(isinstance(module, Bf16DotLinear) or (vnni and isinstance(module, (Int8BlockLinear, Int4BlockLinear)))
               for module in model.modules())
    return (VERIFY_WIDTH, WIDE_VERIFY_WIDTH) if wide else (VERIFY_WIDTH,)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The compiled steps' batch sizes: 1, and max_batch standing for every size from 2 to it."""
    return (1,) if max_batch < 2 else (1, max_batch)


class EagerSteps:
    """Plain module calls: no preparation, any shape."""

    name = "eager"
    compiling = False

    def __init__(self, model):
        self.model = model

    @property
    def state(self) -> str:
        return self.name

    def prefill(self, cache: RowCache, row: int, ids: torch.Tensor, start: int) -> torch.Tensor:
        device = ids.device
        positions = torch.arange(start, start + ids.shape[1], device=device)[None]  # (1, T)
        key_slots = torch.arange(start + ids.shape[1], device=device)
        with eager_attention_kernels(device):
            return rows_forward(self.model, cache, torch.tensor([row], device=device), ids, positions, key_slots)

    def decode(self, cache: RowCache, rows: list[int], ids: list[int], positions: list[int]) -> torch.Tensor:
        device = self.model.device
        key_slots = torch.arange(max(positions) + 1, device=device)
        with eager_attention_kernels(device):
            return rows_forward(self.model, cache, torch.tensor(rows, device=device),
                                torch.tensor(ids, device=device)[:, None],
                                torch.tensor(positions, device=device)[:, None], key_slots)

    def verify(self, cache: RowCache, row: int, ids: list[int], position: int) -> torch.Tensor:
        """Logits (T, V) after each of `ids` (T tokens fed at positions position, position + 1, ...)."""
        device = self.model.device
        positions = torch.arange(position, position + len(ids), device=device)[None]  # (1, T)
        key_slots = torch.arange(position + len(ids), device=device)
        with eager_attention_kernels(device):
            return rows_forward(self.model, cache, torch.tensor([row], device=device),
                                torch.tensor([ids], device=device), positions, key_slots, last_only=False)[0]

    @property
    def verify_cost(self) -> tuple[float, ...]:
        """What verifying T = 1, 2, ... tokens costs, in one-token steps (the last figure beyond)."""
        return CPU_VERIFY_COST

    def max_guesses(self, cache: RowCache, position: int) -> int:
        """The most guesses one verification at `position` may carry (the row must hold them)."""
        return max(0, min(len(self.verify_cost) - 1, cache.row_len - position - 1))

    def compiled_for(self, cache: RowCache, batch: int, n_keys: int) -> bool:
        """Whether a decode of `batch` rows reading `n_keys` keys runs compiled (never, here)."""
        return False

    def prepare(self, pool, progress=None):
        """Start whatever makes later steps faster (nothing here)."""

    def compile_now(self, pool, progress=None):
        """prepare's work on this thread, done when it returns (nothing here)."""

    def stop(self):
        """Stop preparing."""

    @contextlib.contextmanager
    def paused(self):
        yield


class CompiledCpuSteps(EagerSteps):
    """Decode steps compiled by Inductor (one row; 2 to max_batch rows) and the verification of
    `verify_width` tokens (0: none) and of `wide_width` tokens (0: none), in the background by
    `prepare`. attention: the decode steps' ("cpu_kernel" or "single_query"; default: our kernel where
    it builds)."""

    name = "cpu-compile"

    def __init__(self, model, max_batch: int, mode: str | None = None, verify_width: int = VERIFY_WIDTH,
                 row_tokens: int = MAX_COMPILED_KEYS, attention: str | None = None, wide_width: int = 0):
        from .cpu_compile import COMPILE_MODES, checked_mode

        mode = checked_mode(model, mode)
        super().__init__(model)
        self.mode, self.buckets, self.verify_width = mode, batch_buckets(max_batch), verify_width
        self.wide_width = wide_width if verify_width >= 2 and wide_width > verify_width else 0
        # Inductor reads `freezing` (weights as constants it may pre-pack for its GEMM kernels) from its
        # global config while it compiles: set around each compile only, never per step.
        # (cpp.enable_kernel_profile: kernels named in a profiler's trace, as in cpu_compile.py)
        self.inductor_config = {"freezing": True, "compile_threads": 1, "cpp.enable_kernel_profile": True,
                                **COMPILE_MODES[mode]}
        # One query row's attention: our kernel where it builds. decode_backend may build the kernel
        # library (~15 s, once per machine; a bf16 or quantized model has built it at load). Chosen
        # here, not on the compile thread: there, in a full-suite run, the app's first reply stalled
        # for over a minute while the library loaded beside it (docs/benchmarks.md, tenth round).
        self.attention = attention or decode_backend(model.device)
        # what to compile, in order: the decode step per batch bucket, the verifications, then (where
        # Inductor sums the softmax and rows are longer) the one-row step for keys past MAX_COMPILED_KEYS
        long = self.attention != "cpu_kernel" and row_tokens - 1 > MAX_COMPILED_KEYS + 1
        self.verify_jobs = {job: width for job, width in (("verify", verify_width), ("wide", self.wide_width))
                            if width >= 2}  # the verifications to compile, narrowest first
        self.jobs: tuple = self.buckets + tuple(self.verify_jobs) + (("long",) if long else ())
        self.step_fn = torch.compile(self._step, fullgraph=True, dynamic=False)
        # one compiled function per width (a code object of its own: its own graph and guards)
        functions = {"verify": self._verify, "wide": self._verify_wide}
        self.verify_fns = {width: torch.compile(functions[job], fullgraph=True, dynamic=False)
                           for job, width in self.verify_jobs.items()}
        # running means of a compiled one-row step, and of a verification by width
        self._step_s: float | None = None
        self._verify_s: dict[int, float] = {}
        self.ready: dict = {}  # job (1, max_batch standing for 2..max_batch, "verify", "wide", "long") -> compile seconds
        self.failed: Exception | None = None
        self._hold = 0  # paused() holders: no new compile starts
        self._compile_lock = threading.Lock()  # held while one job compiles
        self._stopping = False
        self._thread: threading.Thread | None = None

    def _step(self, cache, rows, ids, positions, key_slots):
        return rows_forward(self.model, cache, rows, ids, positions, key_slots, attention=self.attention)

    def _verify(self, cache, rows, ids, positions, key_slots):
        return rows_forward(self.model, cache, rows, ids, positions, key_slots, last_only=False)[0]

    def _verify_wide(self, cache, rows, ids, positions, key_slots):
        return self._verify(cache, rows, ids, positions, key_slots)

    @property
    def compiling(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def state(self) -> str:
        if self.failed is not None:
            return f"eager (compile failed: {type(self.failed).__name__})"
        if len(self.ready) == len(self.jobs):
            return "compiled"
        if self.compiling:
            return f"compiling {len(self.ready) + 1}/{len(self.jobs)}"
        return "eager"

    def decode(self, cache, rows, ids, positions):
        n_keys = max(positions) + 1
        if not self.compiled_for(cache, len(rows), n_keys):
            return super().decode(cache, rows, ids, positions)
        if len(rows) > 1:
            return self._run(cache, rows, ids, positions, n_keys)
        start = time.perf_counter()
        logits = self._run(cache, rows, ids, positions, n_keys)
        if n_keys <= self._max_keys(cache, verify=True):  # the price of a verification is against these steps
            self._step_s = _running_mean(self._step_s, time.perf_counter() - start)
        return logits

    def compiled_for(self, cache, batch, n_keys):
        if n_keys > self._max_keys(cache):
            return batch == 1 and "long" in self.ready and n_keys <= self._key_range(cache, n_keys)[1]
        bucket = next(b for b in self.buckets if b >= batch)
        return bucket in self.ready

    def _max_keys(self, cache, verify: bool = False) -> int:
        """The most keys the compiled decode steps (verify: the verification) read, but for the one-row
        step's "long" compile. Inductor specialises a step to key counts unlike the row's whole length,
        and, where it sums the softmax itself, to one side of 4096 (MAX_COMPILED_KEYS): the symbolic
        range is kept inside both."""
        if verify or self.attention != "cpu_kernel":
            return min(cache.row_len - 1, MAX_COMPILED_KEYS)
        return cache.row_len - 1

    def _key_range(self, cache, n_keys: int) -> tuple[int, int]:
        """The symbolic range of key counts the compiled step serving `n_keys` was compiled for."""
        short = self._max_keys(cache)
        return (2, short) if n_keys <= short else (short + 1, cache.row_len - 1)

    def _run(self, cache, rows, ids, positions, n_keys):
        rows, ids, positions = torch.tensor(rows), torch.tensor(ids)[:, None], torch.tensor(positions)[:, None]
        key_slots = torch.arange(n_keys)
        low, high = self._key_range(cache, n_keys)
        torch._dynamo.mark_dynamic(key_slots, 0, min=low, max=high)
        if self.buckets[-1] > 2 and len(rows) > 1:  # one compiled step for every batch of 2 or more rows
            for tensor in (rows, ids, positions):
                torch._dynamo.mark_dynamic(tensor, 0, min=2, max=self.buckets[-1])
        return self.step_fn(cache, rows, ids, positions, key_slots)

    # -- verification ------------------------------------------------------------------------------
    def _fitting(self, cache, position: int) -> list[int]:
        """The widths of the verifications compiled so far that fit at `position`, narrowest first."""
        last = self._max_keys(cache, verify=True)
        return [width for job, width in self.verify_jobs.items() if job in self.ready and position + width <= last]

    @property
    def verify_cost(self):
        """One price for 2..W tokens (padded), and one for W+1..the wide width where it is compiled,
        in compiled one-row steps: timed after each compile, then kept up to date by every compiled
        one-row step and verification (so it follows this machine's load and the context lengths its
        chats reach; a profile's traced steps count too, ~6 % slower, and the mean forgets them within
        a few dozen steps)."""
        timed = [width for job, width in self.verify_jobs.items() if job in self.ready and width in self._verify_s]
        if not self._step_s or not timed or timed[0] != self.verify_width:
            return super().verify_cost
        costs, price = [1.0], 1.0
        for width in timed:  # a wider verification never priced below a narrower one
            price = max(price, self._verify_s[width] / self._step_s)
            costs += [price] * (width - len(costs))
        return tuple(costs)

    def _time_verify(self, cache, width: int, pairs: int = 5):
        """First figures for verify_cost: the medians of `pairs` alternating compiled one-row steps and
        verifications of `width` tokens on the scratch row."""
        steps, verifies = [], []
        row, position = cache.scratch, min(64, self._max_keys(cache, verify=True) - width)
        for _ in range(pairs):
            start = time.perf_counter()
            self._run(cache, [row], [0], [position], position + 1)
            steps.append(time.perf_counter() - start)
            start = time.perf_counter()
            self._run_verify(cache, row, [0], position, width)
            verifies.append(time.perf_counter() - start)
        self._step_s, self._verify_s[width] = statistics.median(steps), statistics.median(verifies)

    def max_guesses(self, cache, position):
        if "verify" in self.ready:
            fitting = self._fitting(cache, position)
            return fitting[-1] - 1 if fitting else 0
        return super().max_guesses(cache, position)

    def verify(self, cache, row, ids, position):
        width = next((width for width in self._fitting(cache, position) if len(ids) <= width), None)
        if width is None:
            return super().verify(cache, row, ids, position)
        start = time.perf_counter()
        logits = self._run_verify(cache, row, ids, position, width)[:len(ids)]
        self._verify_s[width] = _running_mean(self._verify_s.get(width), time.perf_counter() - start)
        return logits

    def _run_verify(self, cache, row, ids, position, width: int):
        """The compiled verification of `width` tokens: `ids` padded with copies of its last id, whose
        keys go to slots past the row's length (nothing reads a slot before its own token rewrites it)."""
        ids = torch.tensor([ids + ids[-1:] * (width - len(ids))])  # (1, W)
        positions = torch.arange(position, position + width)[None]
        key_slots = torch.arange(position + width)
        torch._dynamo.mark_dynamic(key_slots, 0, min=width + 1, max=self._max_keys(cache, verify=True))
        return self.verify_fns[width](cache, torch.tensor([row]), ids, positions, key_slots)

    # -- background compile --------------------------------------------------------------------
    def prepare(self, pool, progress=None):
        """Compile each job on a thread of its own; progress(fraction, message) hears of each."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._compile_all, args=(pool, progress),
                                            name="qwen2-compile", daemon=True)
            self._thread.start()

    def compile_now(self, pool, progress=None):
        """Compile every job on this thread (tests, benchmarks, `python -m qwen2`)."""
        self._compile_all(pool, progress)

    def _compile_all(self, pool, progress):
        say = progress or (lambda fraction, message: None)
        with torch.inference_mode():
            for i, job in enumerate(self.jobs):
                if job in self.ready:
                    continue
                say(i / len(self.jobs), f"compiling the {self._job_text(job)} "
                                        f"({i + 1}/{len(self.jobs)}, Inductor {self.mode})")
                try:
                    while not self._compile_unless_held(pool, job):
                        if self._stopping:
                            return
                        time.sleep(0.1)
                except Exception as exc:  # noqa: BLE001 - no C++ compiler, say: the eager steps still answer
                    self.failed = exc
                    say(1.0, f"compile failed ({type(exc).__name__}: {str(exc)[:200]}); decoding eagerly")
                    return
            verifications = [f"the {self._job_text(job)}" for job in self.verify_jobs]
            verify = "".join(f", {text}" for text in verifications[:-1]) + \
                (f", and {verifications[-1]}," if verifications else "")
            long = f" (1 row also past {MAX_COMPILED_KEYS} tokens)" if "long" in self.jobs else ""
            say(1.0, f"decode step compiled for {' and '.join(map(self._rows_text, self.buckets))}{long}{verify} "
                     f"in {sum(self.ready.values()):.0f} s")

    def _job_text(self, job) -> str:
        if job in self.verify_jobs:
            kind = "speculative decoding" if job == "verify" else "long drafts"
            return f"{self.verify_jobs[job]}-token verification ({kind})"
        if job == "long":
            return f"decode step for 1 row past {MAX_COMPILED_KEYS} tokens of context"
        return f"decode step for {self._rows_text(job)}"

    @staticmethod
    def _rows_text(bucket: int) -> str:
        return "1 row" if bucket == 1 else "2 rows" if bucket == 2 else f"2-{bucket} rows"

    def _compile_unless_held(self, pool, job) -> bool:
        """Compile `job` unless paused() is held (then False: try again later)."""
        with self._compile_lock:
            if self._hold or self._stopping:
                return False
            self._compile(pool(), job)
            return True

    def _compile(self, cache: RowCache, job):
        from .cpu_compile import CacheKeyTag, recompile_limit_raised

        start = time.perf_counter()
        # the job's range of key counts joins Inductor's cache key: a graph it stored for another
        # range (an older split at 4096 keys, say) is never taken for this one
        width = self.verify_jobs.get(job)  # a verification's, else None
        low, high = (width + 1, self._max_keys(cache, verify=True)) if width \
            else self._key_range(cache, self._max_keys(cache) + 1 if job == "long" else 2)
        tag = CacheKeyTag(f"qwen2 {self.attention} attention, keys {low}..{high}")
        with torch._inductor.config.patch({**self.inductor_config, "post_grad_custom_post_pass": tag}), \
                recompile_limit_raised():
            if width:
                self._run_verify(cache, cache.scratch, [0], 1, width)
            elif job == "long":
                n_keys = self._max_keys(cache) + 2
                self._run(cache, [cache.scratch], [0], [n_keys - 1], n_keys)
            else:
                batch = min(job, 2)
                self._run(cache, [cache.scratch] * batch, [0] * batch, [1] * batch, 16)
        self.ready[job] = time.perf_counter() - start
        if width and 1 in self.ready:  # against the compiled one-row step (compiled first)
            self._time_verify(cache, width)

    def stop(self):
        self._stopping = True
        if self._thread is not None:
            self._thread.join()

    @contextlib.contextmanager
    def paused(self):
        """No compile runs inside: the one in flight finishes first, the next waits for the exit."""
        self._hold += 1
        try:
            with self._compile_lock:
                pass
            yield
        finally:
            self._hold -= 1


def _running_mean(mean: float | None, seconds: float, memory: float = 0.9) -> float:
    return seconds if mean is None else memory * mean + (1 - memory) * seconds


def make_steps(model, fast_decode: str = "auto", max_batch: int = 4, mode: str | None = None,
               verify: bool = True, row_tokens: int = MAX_COMPILED_KEYS) -> EagerSteps:
    """The step runner for fast_decode `mode`: "auto" compiles on CPU and runs eagerly elsewhere
    (batched CUDA graphs are not in the engine yet), "compile" (CPU), "off". verify=False: no
    speculative decoding to serve, so no verification to compile. row_tokens: the cache's row
    length (past MAX_COMPILED_KEYS, without our attention kernel, the one-row step is compiled a
    second time for the rest)."""
    from .options import check_fast_decode

    fast_decode = check_fast_decode(fast_decode)
    device = model.device.type
    if fast_decode == "auto":
        fast_decode = "compile" if device == "cpu" else "off"
    if fast_decode == "off":
        return EagerSteps(model)
    if fast_decode == "compile":
        widths = verify_widths(model) if verify else (0,)
        return CompiledCpuSteps(model, max_batch, mode, verify_width=widths[0], row_tokens=row_tokens,
                                wide_width=widths[-1] if len(widths) > 1 else 0)
    raise ConfigError(f"fast_decode={fast_decode!r}: the serving engine runs 'compile' (CPU) or 'off'; "
                      "CUDA graphs serve single-stream decoding (qwen2.generate) only")
