"""What one profiling run is asked to do, checked before anything is loaded or timed."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ProfilingError

TRACE_DECODE_STEPS = 4  # decode steps recorded in a torch.profiler trace (after the prefill)


@dataclass(frozen=True)
class Settings:
    prompt_tokens: int
    new_tokens: int
    warmup: int = 1
    seed: int = 0
    baseline: str | None = None               # None or "transformers"
    contexts: tuple[int, ...] = ()            # context sweep lengths, sorted; () = no sweep
    trace_dir: str | None = None

    @property
    def warm_steps(self) -> int:
        """Decode steps of each untimed warm-up run."""
        return min(self.new_tokens, 2)

    @property
    def sweep_steps(self) -> int:
        return sweep_steps(self.new_tokens)

    @property
    def trace_steps(self) -> int:
        return min(self.new_tokens, TRACE_DECODE_STEPS)

    def work_units(self) -> int:
        """Units of progress: one per timed prefill or step, a few per slower stage."""
        units = 1 + self.warmup * 2 * (1 + self.warm_steps) + 2 * (1 + self.new_tokens)
        units += len(self.contexts) * (1 + self.sweep_steps)
        units += (2 + self.trace_steps) if self.trace_dir else 0
        return units + (10 if self.baseline else 0)


def check_count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ProfilingError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def parse_sweep(sweep) -> tuple[int, ...]:
    """None, "128,512,2048" or a list of ints -> sorted unique context lengths (() for none)."""
    if sweep is None or sweep == "" or sweep == []:
        return ()
    items = sweep.split(",") if isinstance(sweep, str) else list(sweep)
    out = []
    for item in items:
        try:
            value = int(str(item).strip())
        except ValueError:
            raise ProfilingError(f"sweep context lengths must be integers, got {item!r}") from None
        if value < 1:
            raise ProfilingError(f"sweep context lengths must be >= 1, got {value}")
        out.append(value)
    return tuple(sorted(set(out)))


def sweep_steps(new_tokens: int) -> int:
    """Decode steps timed at each sweep context: 3 to 16."""
    return max(3, min(new_tokens, 16))


def check_settings(model, *, prompt_tokens: int, new_tokens: int, warmup: int = 1, seed: int = 0,
                   baseline: str | None = None, sweep=None, trace_dir=None) -> Settings:
    """Settings for `model`, or a ValueError saying what is wrong (bad counts, a prompt or sweep
    context beyond the model's context, an unknown baseline or one that cannot run here)."""
    from qwen2.generate import check_budget

    check_count("prompt_tokens", prompt_tokens)
    check_count("new_tokens", new_tokens)
    check_count("warmup", warmup, minimum=0)
    check_budget(model, prompt_tokens, new_tokens)
    settings = Settings(prompt_tokens, new_tokens, warmup, seed,
                        baseline=None if baseline in (None, "", "none") else baseline,
                        contexts=parse_sweep(sweep),
                        trace_dir=str(trace_dir) if trace_dir else None)
    for context in settings.contexts:
        try:
            check_budget(model, context, settings.sweep_steps)
        except ValueError as exc:
            raise ProfilingError(f"sweep context {context}: {exc}") from None
    if settings.baseline:
        from .baseline import check_baseline

        check_baseline(settings.baseline)
    return settings
