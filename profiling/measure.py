"""`profile_model`: one profiling run of a loaded qwen2 model, returned as a JSON-ready dict.

Order: warm up (with and without hooks) -> the clean run (no hooks: the speed figures) and the
same run with timing hooks (per-block figures; their cost against the clean run is the
instrumentation overhead), made together call by call (steps.paired_runs) -> the model's fast decode path, if it has one (timed, then traced: a
compiled CPU step's per-block figures, profiling.compiled_step) -> optional
torch.profiler trace, context sweep, transformers baseline. `profiling.assemble` turns the
measurements into the run dict.
"""

from __future__ import annotations

import torch

from qwen2.cpu_compile import CompiledCpuPath

from . import compiled_step
from .assemble import Measurements, assemble, fast_decode_section
from .device import memory_bandwidth_limit
from .hooks import ModuleHooks
from .memory import PeakMemory, weight_bytes
from .progress import Plan
from .prompts import seeded_prompt_ids
from .settings import Settings, check_settings
from .steps import EngineDecode, RunTimes, paired_runs, timed_run
from .timers import make_clock


def profile_model(model, *, prompt_tokens: int = 32, new_tokens: int = 8, warmup: int = 1,
                  baseline: str | None = None, sweep=None, trace_dir=None, progress=None,
                  seed: int = 0, fast_path=None) -> dict:
    """Profile one loaded qwen2 model on its own device and dtype; return the run dict.

    progress: optional callable(fraction: float, desc: str).
    baseline: None or "transformers". sweep: None, "128,512" or a list of context lengths.
    trace_dir: write one torch.profiler trace file (TensorBoard + Perfetto) into this directory.
    fast_path: a fast decode path (qwen2.fast.make_fast_path), or the serving engine's decode step
    (profiling.steps.EngineDecode), timed too, as `fast_decode`, without hooks; a compiled CPU
    step is then traced for its per-block figures (profiling.compiled_step).
    """
    settings = check_settings(model, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                              warmup=warmup, seed=seed, baseline=baseline, sweep=sweep,
                              trace_dir=trace_dir)
    plan = Plan(progress, settings.work_units())
    measured = measure(model, settings, plan, fast_path)
    plan.finish()
    return assemble(model, settings, measured)


class _Stages:
    """The measuring stages of one run, sharing the model, the prompt, a clock and the plan."""

    def __init__(self, model, settings: Settings, plan: Plan, fast_path=None):
        self.model, self.settings, self.plan, self.fast_path = model, settings, plan, fast_path
        self.ids = seeded_prompt_ids(model.config.vocab_size, settings.prompt_tokens,
                                     model.device, settings.seed)
        self.clock = make_clock(model.device)

    def tick(self) -> None:
        self.plan.advance(1)

    def run(self, steps: int, hooks=None):
        return timed_run(self.model, self.ids, steps, self.clock, hooks=hooks, on_step=self.tick)

    def bandwidth_limit(self) -> tuple[float, str]:
        self.plan.stage("measuring memory bandwidth")
        limit = memory_bandwidth_limit(self.model.device)
        self.tick()
        return limit

    def warm_up(self) -> None:
        for i in range(self.settings.warmup):
            self.plan.stage(f"warm-up {i + 1}/{self.settings.warmup}")
            self.run(self.settings.warm_steps)
            with ModuleHooks(self.model, self.clock) as hooks:
                self.run(self.settings.warm_steps, hooks=hooks)

    def clean_and_hooked(self):
        """(clean run, hooked run, the peak memory over both)."""
        with PeakMemory(self.model.device) as peak:
            self.plan.stage("timing prefill + decode, each call without and with hooks")
            clean, hooked = paired_runs(self.model, self.ids, self.settings.new_tokens, self.clock,
                                        on_step=self.tick)
        return clean, hooked, peak

    def fast_run(self, fast_path) -> RunTimes:
        """One greedy run of the timed length on `fast_path`: a FastPath (a pooled cache of its own,
        through DecodeSession) or the serving engine's step runner (EngineDecode)."""
        beat = self.plan.heartbeat
        if isinstance(fast_path, EngineDecode):
            return fast_path.timed_run(self.ids, self.settings.new_tokens, self.clock, on_step=beat)
        return timed_run(self.model, self.ids, self.settings.new_tokens, self.clock, on_step=beat,
                         fast_path=fast_path)

    def fast_decode(self) -> dict | None:
        """The fast decode path given to profile_model, timed without hooks, then traced (per block)."""
        fast_path = self.fast_path
        if fast_path is None:
            return None
        if isinstance(fast_path, EngineDecode):
            why_not = fast_path.why_not(self.ids.shape[1] + self.settings.new_tokens)
            if why_not:
                self.plan.stage(f"the engine's {fast_path.name} decode step is not timed: {why_not}")
                return None
        self.plan.stage(f"timing the model's fast decode path ({fast_path.name})")
        # Warm with the timed run's own length: the same cache bucket, so its capture or compile
        # (once per bucket) is paid here, and no other bucket is compiled for nothing.
        self.fast_run(fast_path)
        times = self.fast_run(fast_path)
        if not times.on_fast_path:  # its caches are lent to live sessions (kept chats), or not compiled yet
            self.plan.stage(f"the {fast_path.name} decode path did not run (its caches are lent to live "
                            "sessions, or its step is still compiling): not timed")
            return None
        traced, why_not = self.traced_fast_run(fast_path)
        return fast_decode_section(fast_path.name, times, traced, self.model.config.num_hidden_layers, why_not)

    def traced_fast_run(self, fast_path) -> tuple[RunTimes | None, str]:
        """The fast path's run again under torch.profiler, each step cut into blocks
        (profiling.compiled_step); (None, why) where it cannot be."""
        if fast_path.name != CompiledCpuPath.name:
            return None, "only the compiled CPU step's trace is cut into blocks"
        self.plan.stage(f"tracing the {fast_path.name} decode path (per block)")
        try:
            with compiled_step.profiler() as prof:
                traced = self.fast_run(fast_path)
            traced.step_parts = compiled_step.traced_step_parts(prof.events(), compiled_step.layout_of(self.model))
        except ValueError as exc:  # the trace is not the model's products
            return None, str(exc)
        except RuntimeError as exc:  # torch.profiler could not run here (one profiler at a time)
            return None, f"torch.profiler: {exc}"
        if len(traced.step_parts) != len(traced.step_s) or not traced.on_fast_path:
            return None, f"the trace holds {len(traced.step_parts)} compiled steps for {len(traced.step_s)} decode steps"
        return traced, ""

    def trace(self) -> dict | None:
        if not self.settings.trace_dir:
            return None
        from .trace import run_trace

        self.plan.stage("torch.profiler trace")
        return run_trace(self.model, self.ids, self.settings.trace_steps, self.settings.trace_dir,
                         on_step=self.tick)

    def sweep(self) -> list[dict] | None:
        if not self.settings.contexts:
            return None
        from .sweep import run_sweep

        return run_sweep(self.model, self.settings.contexts, self.settings.sweep_steps,
                         self.clock, self.settings.seed, plan=self.plan)

    def baseline(self, reference_tokens: list[int]) -> dict | None:
        if not self.settings.baseline:
            return None
        from .baseline import run_transformers_baseline

        return run_transformers_baseline(self.model, self.ids, self.settings.new_tokens,
                                         warmup=max(self.settings.warmup, 1), plan=self.plan,
                                         reference_tokens=reference_tokens)


def measure(model, settings: Settings, plan: Plan, fast_path=None) -> Measurements:
    """Run every stage the settings ask for; return what was measured."""
    stages = _Stages(model, settings, plan, fast_path)
    with torch.inference_mode():
        limit, source = stages.bandwidth_limit()
        stages.warm_up()
        clean, hooked, peak = stages.clean_and_hooked()
        fast, trace, sweep = stages.fast_decode(), stages.trace(), stages.sweep()
    return Measurements(clean=clean, hooked=hooked, timer=stages.clock.kind,
                        weights=weight_bytes(model), peak=peak, bandwidth_limit=limit,
                        bandwidth_source=source, fast_decode=fast, trace=trace, sweep=sweep,
                        baseline=stages.baseline(clean.tokens))
