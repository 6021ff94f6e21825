"""The timing hooks' cost, said no more precisely than the measurement allows.

The cost is the hooked steps' time against the clean ones'. Two short runs on a shared machine
differ by more than the hooks cost, so the ratio of two runs' medians alone came out anywhere from
-22 % to +18 % for a true ~2 %: hooks only add work, so a negative figure is noise, not a speed-up.
Profiles now time each call with and without hooks side by side (profiling.steps.paired_runs), and
the figure is the median of the per-pair ratios (for each of the two orders, then averaged) with a
bootstrap over pairs (`paired_median_ratio`); for two independent runs (a compiled step against its traced run, older
run files) both medians are resampled on their own (`median_ratio_interval`). The table writes
"within noise" whenever the interval reaches zero.
"""

from __future__ import annotations

import math
import random
import statistics

RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0  # the same samples always give the same interval (run files are compared, re-rendered)


def median_ratio_interval(clean: list[float], hooked: list[float], resamples: int = RESAMPLES,
                          confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The bootstrap interval of median(hooked) / median(clean) - 1, or None without two steps in
    each run (one step has no spread)."""
    clean = [x for x in clean if _finite(x)]
    hooked = [x for x in hooked if _finite(x)]
    if len(clean) < 2 or len(hooked) < 2:
        return None
    draw = random.Random(SEED)
    ratios = []
    for _ in range(resamples):
        base = statistics.median(draw.choices(clean, k=len(clean)))
        if base > 0:
            ratios.append(statistics.median(draw.choices(hooked, k=len(hooked))) / base - 1.0)
    if not ratios:
        return None
    ratios.sort()
    tail = (1.0 - confidence) / 2
    return ratios[int(tail * (len(ratios) - 1))], ratios[math.ceil((1 - tail) * (len(ratios) - 1))]


def paired_median_ratio(clean: list[float], hooked: list[float], resamples: int = RESAMPLES,
                        confidence: float = CONFIDENCE) -> tuple[float, float, float] | None:
    """For runs made call by call (profiling.steps.paired_runs: hooked[i] and clean[i] timed a step
    apart at the same position, the hooked call first at even i): the hooks' cost, hooked / clean - 1,
    and its bootstrap interval, or None without two pairs. The median ratio is taken for each order
    and the two averaged, so that whatever the second call of a pair gains or loses by coming
    second cancels out; the bootstrap resamples each order's pairs. Pairing takes the machine's
    drift out, so the interval is a fraction of two independent runs' one."""
    pairs = [(i % 2, h / c - 1.0) for i, (c, h) in enumerate(zip(clean, hooked))
             if _finite(c) and _finite(h) and c > 0]
    if len(pairs) < 2:
        return None
    groups = [ratios for ratios in ([r for order, r in pairs if order == o] for o in (0, 1)) if ratios]

    def estimate(samples) -> float:
        return statistics.fmean(statistics.median(ratios) for ratios in samples)

    draw = random.Random(SEED)
    estimates = sorted(estimate([draw.choices(ratios, k=len(ratios)) for ratios in groups])
                       for _ in range(resamples))
    tail = (1.0 - confidence) / 2
    return (estimate(groups), estimates[int(tail * (len(estimates) - 1))],
            estimates[math.ceil((1 - tail) * (len(estimates) - 1))])


def old_file_interval(fraction: float, clean: list[float]) -> tuple[float, float] | None:
    """For a run file written before the hooked run's steps were kept: the clean run's own noise
    (its median's bootstrap interval) taken as the hooked run's too, around the recorded figure."""
    spread = median_ratio_interval(clean, clean)
    if spread is None:
        return None
    half = (spread[1] - spread[0]) / 2
    return fraction - half, fraction + half


def overhead_interval(run: dict) -> tuple[float, float] | None:
    """The decode overhead's interval: recorded (new runs), estimated (older files), else None."""
    inst = run.get("instrumentation") or {}
    low, high = inst.get("overhead_fraction_decode_low"), inst.get("overhead_fraction_decode_high")
    if _finite(low) and _finite(high):
        return float(low), float(high)
    fraction = inst.get("overhead_fraction_decode")
    clean = ((run.get("decode") or {}).get("step_ms_list")) or []
    return old_file_interval(float(fraction), clean) if _finite(fraction) else None


def overhead_text(run: dict) -> str | None:
    """The headline table's cell: "2.1 % (1.0 to 3.4)", "within noise (−3 to +2 %)", "within
    noise" (a negative figure with no samples to size it), or None where not measured."""
    fraction = (run.get("instrumentation") or {}).get("overhead_fraction_decode")
    if not _finite(fraction):
        return None
    interval = overhead_interval(run)
    if interval is None:
        return "within noise" if fraction <= 0 else f"{100 * fraction:.1f} %"
    low, high = (100 * x for x in interval)
    if fraction <= 0 or low <= 0:
        return f"within noise ({_signed(low)} to {_signed(high)} %)"
    return f"{100 * fraction:.1f} % ({low:.1f} to {high:.1f})"


def _signed(x: float) -> str:
    return f"{x:+.1f}".replace("-", "\u2212")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
