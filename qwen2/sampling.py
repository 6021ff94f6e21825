"""From logits to the next token.

Applied in this order, each as its reference (transformers' logits processors) defines it:
repetition penalty, temperature, top-k, top-p, min-p, then a draw. temperature=0 is greedy
(argmax after the repetition penalty). Everything stays on the model's device: no host sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import GenerationError


@dataclass(frozen=True)
class SamplingSettings:
    """The sampling knobs, checked once at construction. Each default leaves the logits as they are
    (temperature 0 means greedy: argmax after the repetition penalty)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off

    def __post_init__(self):
        def bad(name, value, expected):
            raise GenerationError(f"{name}={value!r} is invalid; expected {expected}")

        def number(name, value):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                bad(name, value, "a finite number")

        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            number(name, getattr(self, name))
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            bad("top_k", self.top_k, "an integer >= 0 (0 = off)")
        if self.temperature < 0:
            bad("temperature", self.temperature, ">= 0 (0 = greedy)")
        if self.top_k < 0:
            bad("top_k", self.top_k, ">= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "in (0, 1] (1 = off)")
        if not 0 <= self.min_p < 1:
            bad("min_p", self.min_p, "in [0, 1) (0 = off)")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", self.repetition_penalty, "> 0 (1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_generation_config(cls, config: dict | None, **overrides) -> SamplingSettings:
        """The checkpoint's own sampling, read as transformers' `generate` reads generation_config.json:
        `do_sample` false (or absent) is greedy, with the repetition penalty still applied; true samples
        with the file's temperature / top_k / top_p / min_p (transformers' defaults 1.0 / 50 / 1.0 / off
        where it names none). `overrides` (None: keep) win; a temperature given samples even where the
        file says greedy. The one default policy of the terminal chat, the app and the API."""
        config = config or {}
        chosen = {k: v for k, v in overrides.items() if v is not None}
        sample = bool(config.get("do_sample")) or chosen.get("temperature", 0) > 0

        def pick(name, default):
            value = chosen.get(name, config.get(name))
            return default if value is None else value

        try:
            return cls(temperature=float(pick("temperature", 1.0)) if sample else 0.0,
                       top_k=int(pick("top_k", 50)) if sample else 0,
                       top_p=float(pick("top_p", 1.0)) if sample else 1.0,
                       min_p=float(pick("min_p", 0.0)) if sample else 0.0,
                       repetition_penalty=float(pick("repetition_penalty", 1.0)))
        except (TypeError, ValueError) as exc:
            raise GenerationError(f"generation_config.json: a sampling value is not a number ({exc})") from None


def apply_repetition_penalty(logits, seen, penalty: float):
    """Tokens already in the text: positive logits divided by the penalty, negative ones multiplied."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits, k: int):
    """Keep the k largest logits (ties with the k-th kept too)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits, p: float):
    """Keep the smallest set of most likely tokens whose probability sums to at least p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1 - p
    drop[..., -1:] = False  # always keep the most likely token
    return logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)


def apply_min_p(logits, min_p: float):
    """Drop tokens less likely than min_p times the most likely one."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), -math.inf)


def process_logits(logits, settings: SamplingSettings, seen=None):
    """All processors in order; returns the logits the draw is made from.  (B, V) -> (B, V)"""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
    if settings.greedy:
        return logits
    logits = logits / settings.temperature
    logits = apply_top_k(logits, settings.top_k)
    logits = apply_top_p(logits, settings.top_p)
    return apply_min_p(logits, settings.min_p)


PROCESSORS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p")


def processor_stages(logits, settings: SamplingSettings, seen=None) -> list[tuple[str, torch.Tensor]]:
    """The logits before the processors and after each one, in process_logits' order.

    Returns [("logits", raw), ("repetition_penalty", ...), ("temperature", ...), ("top_k", ...),
    ("top_p", ...), ("min_p", ...)]: every processor appears (an "off" setting leaves the logits as
    they were), and the last entry equals process_logits(logits, settings, seen). Greedy settings
    (temperature=0) stop after the repetition penalty, as process_logits does: the draw is argmax.
    (B, V) -> list of (name, (B, V)).
    """
    stages = [("logits", logits)]
    penalised = logits if seen is None else apply_repetition_penalty(logits, seen, settings.repetition_penalty)
    stages.append(("repetition_penalty", penalised))
    if settings.greedy:
        return stages
    x = penalised / settings.temperature
    stages.append(("temperature", x))
    for name, fn, value in (("top_k", apply_top_k, settings.top_k), ("top_p", apply_top_p, settings.top_p),
                            ("min_p", apply_min_p, settings.min_p)):
        x = fn(x, value)
        stages.append((name, x))
    return stages


SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes a 64-bit integer


def check_seed(seed) -> int | None:
    """`seed` if it is None or an integer in [0, 2**63); GenerationError naming it otherwise."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT):
        shown = repr(seed) if len(repr(seed)) <= 30 else f"{repr(seed)[:27]}..."
        raise GenerationError(f"seed={shown} is invalid; expected an integer in [0, 2**63) or None")
    return seed


class Sampler:
    """Picks next tokens for a batch, tracking which tokens each row has seen (for the penalty)."""

    def __init__(self, settings: SamplingSettings, prompt_ids: torch.Tensor, vocab_size: int,
                 seed: int | None = None, prompt_mask: torch.Tensor | None = None):
        self.settings = settings
        device = prompt_ids.device
        self.seen = None
        if settings.repetition_penalty != 1.0:
            real = prompt_mask.long() if prompt_mask is not None else torch.ones_like(prompt_ids)
            counts = torch.zeros(prompt_ids.shape[0], vocab_size, dtype=torch.long, device=device)
            self.seen = counts.scatter_add_(1, prompt_ids, real) > 0  # padding marks nothing
        self.generator = None
        check_seed(seed)
        if seed is not None and not settings.greedy:
            self.generator = torch.Generator(device=device).manual_seed(int(seed))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) float logits -> (B,) token ids."""
        ids = self.draw(logits)
        self.mark(ids)
        return ids

    def draw(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) float logits -> (B,) token ids, picked as __call__ picks them but not yet counted
        as seen: for a caller that may feed another token than the one drawn (mark what it feeds)."""
        logits = process_logits(logits.float(), self.settings, self.seen)
        if self.settings.greedy:
            return logits.argmax(dim=-1)
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=self.generator).squeeze(-1)

    def mark(self, ids: torch.Tensor) -> None:
        """Count (B,) token ids, one per row, as seen by the repetition penalty (a no-op without one)."""
        if self.seen is not None:
            self.seen.scatter_(1, ids.to(self.seen.device)[:, None], True)
