"""Step runners: how the serving engine's forwards are launched. The math is the model's own.

Two kinds of forward run on the engine's RowCache (qwen2/cache.py):
  prefill(cache, row, ids, start)          one conversation's next prompt chunk (1, T) at `start`
  decode(cache, rows, ids, positions)      one new token for each of B conversations, one batched forward

EagerSteps calls the modules as they are. CompiledCpuSteps compiles the decode step with Inductor
twice: for one row, and for 2 to `max_batch` rows with the batch size left symbolic (a batch of
3 is 3 rows, no padding), and the number of keys read symbolic in both, so a joining or leaving
conversation or one growing longer never recompiles. The two compiles run on a thread of their own
while the engine serves eagerly; each is used from the first step after it is ready. Prefill stays
eager: its shapes change with every prompt, and its products are matrix-matrix, already near peak.
"""

from __future__ import annotations

import contextlib
import threading
import time

import torch

from .cache import RowBatch, RowCache
from .errors import ConfigError
from .generate import eager_attention_kernels
from .model import attention_mask_for, visibility_mask


def rows_forward(model, cache: RowCache, rows, ids, positions, key_slots, attention=None):
    """Logits (B, V) after the last of `ids` (B, T), each entry written at `positions` (B, T) of its
    row of `cache` and reading that row's slots [0, S) (key_slots = arange(S)) up to its own position."""
    if ids.shape[0] == 1:  # one row: the masks that let SDPA pick its fastest kernels
        masks = {kind: attention_mask_for(positions[0], key_slots, None, window, reads_exact_past=True)
                 for kind, window in model.layer_windows()}
    else:
        masks = {kind: visibility_mask(positions, key_slots, None, window) for kind, window in model.layer_windows()}
    batch = RowBatch(cache, rows, positions, key_slots)
    return model.run(ids, positions, masks, batch, last_only=True, attention=attention)[:, -1]


MAX_COMPILED_KEYS = 4096


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

    def compiled_for(self, cache: RowCache, batch: int, n_keys: int) -> bool:
        """Whether a decode of `batch` rows reading `n_keys` keys runs compiled (never, here)."""
        return False

    def prepare(self, pool, progress=None):
        """Start whatever makes later steps faster (nothing here)."""

    def stop(self):
        """Stop preparing."""

    @contextlib.contextmanager
    def paused(self):
        yield


class CompiledCpuSteps(EagerSteps):
    """Decode steps compiled by Inductor (one row; 2 to max_batch rows), in the background by `prepare`."""

    name = "cpu-compile"

    def __init__(self, model, max_batch: int, mode: str | None = None):
        from .cpu_compile import COMPILE_MODES, checked_mode

        mode = checked_mode(model, mode)
        super().__init__(model)
        self.mode, self.buckets = mode, batch_buckets(max_batch)
        # Inductor reads `freezing` (weights as constants it may pre-pack for its GEMM kernels) from its
        # global config while it compiles: set around each compile only, never per step.
        # (cpp.enable_kernel_profile: kernels named in a profiler's trace, as in cpu_compile.py)
        self.inductor_config = {"freezing": True, "compile_threads": 1, "cpp.enable_kernel_profile": True,
                                **COMPILE_MODES[mode]}
        self.step_fn = torch.compile(self._step, fullgraph=True, dynamic=False)
        self.ready: dict[int, float] = {}  # bucket (1, or max_batch for 2..max_batch) -> seconds its compile took
        self.failed: Exception | None = None
        self._hold = 0  # paused() holders: no new compile starts
        self._compile_lock = threading.Lock()  # held while one bucket compiles
        self._stopping = False
        self._thread: threading.Thread | None = None

    def _step(self, cache, rows, ids, positions, key_slots):
        return rows_forward(self.model, cache, rows, ids, positions, key_slots, attention="single_query")

    @property
    def compiling(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def state(self) -> str:
        if self.failed is not None:
            return f"eager (compile failed: {type(self.failed).__name__})"
        if len(self.ready) == len(self.buckets):
            return "compiled"
        if self.compiling:
            return f"compiling {len(self.ready) + 1}/{len(self.buckets)}"
        return "eager"

    def decode(self, cache, rows, ids, positions):
        n_keys = max(positions) + 1
        if not self.compiled_for(cache, len(rows), n_keys):
            return super().decode(cache, rows, ids, positions)
        return self._run(cache, rows, ids, positions, n_keys)

    def compiled_for(self, cache, batch, n_keys):
        bucket = next(b for b in self.buckets if b >= batch)
        return bucket in self.ready and n_keys <= self._max_keys(cache)

    @staticmethod
    def _max_keys(cache) -> int:
        """The most keys the compiled step reads; longer rows decode eagerly. Inductor specialises
        the step to key counts unlike the row's whole length and, on the real 0.5B model, to at
        most 4096 (guards it adds while compiling): the symbolic range is kept inside both."""
        return min(cache.row_len - 1, MAX_COMPILED_KEYS)

    def _run(self, cache, rows, ids, positions, n_keys):
        rows, ids, positions = torch.tensor(rows), torch.tensor(ids)[:, None], torch.tensor(positions)[:, None]
        key_slots = torch.arange(n_keys)
        torch._dynamo.mark_dynamic(key_slots, 0, min=2, max=self._max_keys(cache))
        if self.buckets[-1] > 2 and len(rows) > 1:  # one compiled step for every batch of 2 or more rows
            for tensor in (rows, ids, positions):
                torch._dynamo.mark_dynamic(tensor, 0, min=2, max=self.buckets[-1])
        return self.step_fn(cache, rows, ids, positions, key_slots)

    # -- background compile --------------------------------------------------------------------
    def prepare(self, pool, progress=None):
        """Compile each bucket on a thread of its own; progress(fraction, message) hears of each."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._compile_all, args=(pool, progress),
                                            name="qwen2-compile", daemon=True)
            self._thread.start()

    def compile_now(self, pool, progress=None):
        """Compile every bucket on this thread (tests, benchmarks, `python -m qwen2`)."""
        self._compile_all(pool, progress)

    def _compile_all(self, pool, progress):
        say = progress or (lambda fraction, message: None)
        with torch.inference_mode():
            for i, bucket in enumerate(self.buckets):
                if bucket in self.ready:
                    continue
                say(i / len(self.buckets), f"compiling the decode step for {self._rows_text(bucket)} "
                                           f"({i + 1}/{len(self.buckets)}, Inductor {self.mode})")
                try:
                    while not self._compile_unless_held(pool, bucket):
                        if self._stopping:
                            return
                        time.sleep(0.1)
                except Exception as exc:  # noqa: BLE001 - no C++ compiler, say: the eager steps still answer
                    self.failed = exc
                    say(1.0, f"compile failed ({type(exc).__name__}: {exc}); decoding eagerly")
                    return
            say(1.0, f"decode step compiled for {' and '.join(map(self._rows_text, self.buckets))} in "
                     f"{sum(self.ready.values()):.0f} s")

    @staticmethod
    def _rows_text(bucket: int) -> str:
        return "1 row" if bucket == 1 else "2 rows" if bucket == 2 else f"2-{bucket} rows"

    def _compile_unless_held(self, pool, bucket: int) -> bool:
        """Compile `bucket` unless paused() is held (then False: try again later)."""
        with self._compile_lock:
            if self._hold or self._stopping:
                return False
            self._compile(pool(), bucket)
            return True

    def _compile(self, cache: RowCache, bucket: int):
        from .cpu_compile import recompile_limit_raised

        start = time.perf_counter()
        with torch._inductor.config.patch(self.inductor_config), recompile_limit_raised():
            batch = min(bucket, 2)
            self._run(cache, [cache.scratch] * batch, [0] * batch, [1] * batch, 16)
        self.ready[bucket] = time.perf_counter() - start

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


def make_steps(model, fast_decode: str = "auto", max_batch: int = 4, mode: str | None = None) -> EagerSteps:
    """The step runner for fast_decode `mode`: "auto" compiles on CPU and runs eagerly elsewhere
    (batched CUDA graphs are not in the engine yet), "compile" (CPU), "off"."""
    from .options import check_fast_decode

    fast_decode = check_fast_decode(fast_decode)
    device = model.device.type
    if fast_decode == "auto":
        fast_decode = "compile" if device == "cpu" else "off"
    if fast_decode == "off":
        return EagerSteps(model)
    if fast_decode == "compile":
        return CompiledCpuSteps(model, max_batch, mode)
    raise ConfigError(f"fast_decode={fast_decode!r}: the serving engine runs 'compile' (CPU) or 'off'; "
                      "CUDA graphs serve single-stream decoding (qwen2.generate) only")
