"""The knobs of one walk through the model, checked once, apart from the model it runs on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from qwen2.errors import GenerationError
from qwen2.sampling import SamplingSettings, check_seed

SAMPLING_KEYWORDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def _count(name: str, value, minimum: int = 1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise GenerationError(f"{name}={value!r} is invalid; expected an integer >= {minimum}")


@dataclass(frozen=True)
class InsideSettings:
    """How an InsideSession draws its tokens and how much its views show.

    sampling and seed: as qwen2.generate's, so that the chosen tokens are the ones it would yield.
    max_tokens: the whole walk's context (prompt + stepped tokens); None is the model's context.
    The session allocates its KV cache for this many tokens at start, so a cap is what keeps a
    kept session small (the app passes 512).
    candidates: tokens in the candidates view; lens_top: tokens per logit-lens row.
    full_map_max: the context up to which q of every position is kept, for the T x T maps.
    full_maps: which T x T maps start/step's views include (see InsideSession.view).
    """

    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    seed: int | None = None
    max_tokens: int | None = None
    candidates: int = 10
    lens_top: int = 5
    full_map_max: int = 64
    full_maps: bool | int | Sequence[int] | None = None

    def __post_init__(self):
        if not isinstance(self.sampling, SamplingSettings):
            raise GenerationError("sampling must be a qwen2.sampling.SamplingSettings; "
                                  f"got {type(self.sampling).__name__}")
        check_seed(self.seed)
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int)
                                            or self.max_tokens < 1):
            raise GenerationError(f"max_tokens={self.max_tokens!r} is invalid; expected an integer >= 1 "
                                  "(or None: the model's context)")
        _count("candidates", self.candidates)
        _count("lens_top", self.lens_top)
        _count("full_map_max", self.full_map_max, minimum=0)
        if not (self.full_maps is None or isinstance(self.full_maps, (bool, int))):
            # a frozen dataclass is compared and hashed by value: a list would make it unhashable
            object.__setattr__(self, "full_maps", tuple(int(i) for i in self.full_maps))

    @classmethod
    def of(cls, sampling: SamplingSettings | None = None, **options) -> InsideSettings:
        """From flat keywords: the sampling ones (temperature, top_k, top_p, min_p,
        repetition_penalty) or `sampling=`, not both, and the other fields by name."""
        given = {k: options.pop(k) for k in SAMPLING_KEYWORDS if k in options}
        if sampling is not None and given:
            raise GenerationError(f"pass the sampling settings either as sampling= or as keywords, not both "
                                  f"(got sampling= and {', '.join(given)})")
        try:
            return cls(sampling=SamplingSettings(**given) if sampling is None else sampling, **options)
        except TypeError as exc:  # an unknown keyword: name it as the session's, not the dataclass's
            raise GenerationError(f"InsideSettings: {exc}") from None

    def cap(self, context: int) -> int:
        """The walk's token cap on a model of `context` tokens: never more than the context."""
        return context if self.max_tokens is None else min(self.max_tokens, context)
