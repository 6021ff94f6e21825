"""Two set-ups of one model decoding in one process, round after round: for A/B figures on machines
whose speed moves between processes (scripts/huge_pages_bench.py, scripts/bf16_dot_bench.py).

    speeds = decode_rounds({"before": (model_a, fast_path_a), "after": (model_b, fast_path_b)}, ids, 5, 64)
    print_speeds(speeds, "after", "before")
"""

from __future__ import annotations

import statistics
import time

import qwen2


def decode_rounds(runs: dict, ids, rounds: int, new_tokens: int) -> dict[str, list[float]]:
    """{name: decode tok/s of each round}: every run's greedy reply of `new_tokens` to `ids` (1, T),
    the runs alternating within each round; tok/s = (tokens - 1) / (time of the last - of the first)."""
    speeds = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (model, fast_path) in runs.items():
            times = [time.perf_counter() for _token in qwen2.generate(model, ids, max_new_tokens=new_tokens,
                                                                      fast_path=fast_path, stop_token_ids=[])]
            speeds[name].append((len(times) - 1) / (times[-1] - times[0]))
    return speeds


def print_speeds(speeds: dict[str, list[float]], new: str, old: str) -> None:
    """Each run's rounds and median, then the medians' ratio new / old."""
    for name, values in speeds.items():
        print(f"{name}: " + " ".join(f"{v:6.1f}" for v in values) + f"  median {statistics.median(values):.1f} tok/s")
    print(f"{new} / {old}: {statistics.median(speeds[new]) / statistics.median(speeds[old]):.2f}x")
