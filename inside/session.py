"""One prompt's walk through the model, a decode step at a time.

    from inside import InsideSession, InsideSettings
    settings = InsideSettings.of(temperature=0.7, top_p=0.8, seed=0, max_tokens=512)
    with InsideSession(model, tokenizer, settings) as session:
        view = session.start("The capital of France is")   # prefill; a JSON-serialisable dict
        view = session.step()                               # feed the chosen token, one decode step

The forward runs through an eager qwen2.DecodeSession (plain module calls, so inside.capture's
hooks fire) and the draw through a qwen2.sampling.Sampler; the views (inside.views) are computed
from what the session keeps.

Memory: a session is meant to be kept between clicks (the app keeps a few), so it holds only what
its views need: the KV cache (allocated once for the cap, settings.max_tokens), q of the last
position per layer (every position while the context is at most full_map_max tokens, for the T x T
maps) and the latest forward's record (Forward: the residual rows at the last position, (L + 1, D),
the logits and the reduced lens). The capture's activations are dropped after each forward;
attention probabilities, the (L + 1, V) lens and the processors' stages are computed again when
asked (attention_probs, lens_logits, stage_probs). close() (or leaving a `with` block) lets the KV
cache go.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qwen2.errors import GenerationError, LimitError
from qwen2.generate import DecodeSession
from qwen2.model import apply_rope, visibility_mask
from qwen2.sampling import Sampler, processor_stages

from . import views
from .capture import Capture
from .settings import InsideSettings


@dataclass(frozen=True)
class Forward:
    """What the latest forward left for the views (replaced whole by the next one)."""

    phase: str                    # "prefill" or "decode"
    new_tokens: int               # tokens this forward fed
    shapes: dict                  # Capture.shapes: (stage, layer or None) -> shape
    last_row_shape: list[int]
    logits: torch.Tensor          # (1, V) float32, the model's
    lens_rows: torch.Tensor       # (L + 1, D): the residual stream at the last position
    chosen: int                   # the token drawn from these logits
    lens: views.LensTop           # the logit lens, reduced right after the forward
    forward_s: float
    views_s: float


class InsideSession:
    """start(prompt) prefills and returns the view; step(token_id=None) feeds the chosen token (or
    the one given) through the KV cache and returns the new view; view(full_maps=...) rebuilds the
    dict from what was kept; attention_layer(i) is one layer's maps; close() lets the KV cache go.
    With the same settings and seed, the chosen tokens are what qwen2.generate would yield.

    The cap (max_tokens: settings.max_tokens, never more than the model's context) bounds the whole
    context: start refuses a longer prompt and step a token past it, with a qwen2.errors.LimitError
    (a GenerationError). It bounds what a session holds and how long a prefill holds the model.
    """

    def __init__(self, model, tokenizer=None, settings: InsideSettings | None = None):
        if settings is None:
            settings = InsideSettings()
        elif not isinstance(settings, InsideSettings):
            raise GenerationError(f"settings must be an inside.InsideSettings; got {type(settings).__name__}")
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.config = model.config
        self.max_tokens = settings.cap(self.config.max_position_embeddings)
        self.ids: list[int] = []
        self.prompt_len = 0
        self.decode: DecodeSession | None = None
        self.sampler: Sampler | None = None
        self.q_all: list[torch.Tensor | None] = [None] * self.config.num_hidden_layers
        self.latest: Forward | None = None
        self.closed = False
        self._text_cache: dict[int, str] = {}

    def _clear(self):
        """Drop everything the forwards left, the KV cache included."""
        if self.decode is not None:
            self.decode.close()
        self.decode = None
        self.q_all = [None] * self.config.num_hidden_layers
        self.latest = None

    def close(self):
        """Let the KV cache and every kept tensor go; the session can start() again afterwards."""
        self._clear()
        self.sampler = None
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def chosen(self) -> int:
        """The token drawn from the latest forward's logits: what step() feeds by default."""
        self._require_started()
        return self.latest.chosen

    @property
    def logits(self) -> torch.Tensor:
        """(1, V) float32: the latest forward's logits."""
        self._require_started()
        return self.latest.logits

    def _require_started(self):
        if self.decode is None:
            raise GenerationError("this session was closed: start(prompt) again" if self.closed
                                  else "start(prompt) first")

    def cap_phrase(self) -> str:
        context = self.config.max_position_embeddings
        if self.max_tokens < context:
            return f"this view's cap of {self.max_tokens} tokens (prompt and stepped tokens together)"
        return f"the model's context of {context} tokens"

    # -- driving the model ----------------------------------------------------------------

    def start(self, prompt: str | Sequence[int]) -> dict:
        """Prefill `prompt` (text, encoded with the tokenizer, or token ids); return the view."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise GenerationError("a text prompt needs a tokenizer; pass token ids instead")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        V, context = self.config.vocab_size, self.config.max_position_embeddings
        if not ids:
            raise GenerationError("the prompt is empty: nothing to run")
        if min(ids) < 0 or max(ids) >= V:
            raise GenerationError(f"token ids must be in [0, {V})")
        if len(ids) > self.max_tokens:
            raise LimitError(f"the prompt has {len(ids)} tokens, more than {self.cap_phrase()}; shorten it "
                             f"to at most {self.max_tokens} tokens (e.g. keep its end)")
        if len(ids) >= context:
            raise GenerationError(f"the prompt ({len(ids)} tokens) leaves no room in the context of {context}")
        self._clear()  # a session started again lets its previous cache go before the next one
        self.closed = False
        self.ids, self.prompt_len = list(ids), len(ids)
        prompt_t = torch.tensor([ids], device=self.model.device)
        self.sampler = Sampler(self.settings.sampling, prompt_t, V, self.settings.seed)
        # The cap bounds the whole walk, so one cache of that size serves every step: no regrowth.
        self.decode = DecodeSession(self.model, 1, self.max_tokens)
        self._forward(lambda: self.decode.prefill(prompt_t), phase="prefill", new=len(ids))
        return self.view(self.settings.full_maps)

    def step(self, token_id: int | None = None) -> dict:
        """Feed the chosen token (or `token_id`) as one decode step; return the new view."""
        self._require_started()
        token = self.chosen if token_id is None else int(token_id)
        if not 0 <= token < self.config.vocab_size:
            raise GenerationError(f"token id {token} is outside the vocab [0, {self.config.vocab_size})")
        if len(self.ids) + 1 > self.max_tokens:
            raise LimitError(f"no room for another token: {len(self.ids)} tokens ({self.prompt_len} prompt + "
                             f"{len(self.ids) - self.prompt_len} stepped) fill {self.cap_phrase()}; start "
                             "again with a shorter prompt to step further")
        fed = torch.tensor([token], device=self.model.device)
        self._forward(lambda: self.decode.step(fed), phase="decode", new=1, fed=fed)
        return self.view(self.settings.full_maps)

    @torch.inference_mode()
    def _forward(self, run, phase: str, new: int, fed: torch.Tensor | None = None):
        t0 = time.perf_counter()
        keep_all = len(self.ids) + (fed is not None) <= self.settings.full_map_max  # q of every position: T x T maps
        with Capture(self.model, last_only=not keep_all) as cap:
            logits = run()  # (1, V) float32
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        if fed is not None:
            # The penalty counts the token fed, which may not be the one drawn: the draw left it unmarked.
            self.sampler.mark(fed)
            self.ids.append(int(fed[0]))
        self._rope_and_append(cap, keep_all)
        L = self.config.num_hidden_layers
        lens_rows = torch.cat([cap.resid[i] for i in range(L + 1)])  # (L + 1, D)
        last_row_shape = list(cap.resid[L].shape[1:])
        cap.release()  # the capture keeps its shapes only
        logits = logits.float()
        chosen = int(self.sampler.draw(logits)[0])  # the draw qwen2.generate would make
        lens = views.reduce_lens(self._lens_logits(lens_rows).softmax(dim=-1), self.settings.lens_top, chosen)
        self.latest = Forward(phase, new, cap.shapes, last_row_shape, logits, lens_rows, chosen, lens,
                              forward_s=t1 - t0, views_s=time.perf_counter() - t1)

    def _rope_and_append(self, cap: Capture, keep_all: bool):
        H, hd = self.config.num_attention_heads, self.config.head_dim
        for i in range(self.config.num_hidden_layers):
            B, T, _ = cap.q[i].shape
            q = apply_rope(cap.q[i].reshape(B, T, H, hd).transpose(1, 2), cap.cos, cap.sin)  # (1, H, T, hd)
            if keep_all and self.q_all[i] is not None:
                q = torch.cat([self.q_all[i], q], dim=2)
            self.q_all[i] = q  # every position while T <= full_map_max, else the last one

    # -- the views' numbers, computed when asked --------------------------------------------

    def window(self, layer: int) -> int | None:
        return self.config.sliding_window if self.config.layer_types[layer] == "sliding_attention" else None

    def full_maps_available(self) -> bool:
        """Whether the T x T maps can be computed: q of every position is kept up to full_map_max."""
        return self.decode is not None and self.q_all[0] is not None and self.q_all[0].shape[2] == len(self.ids)

    @torch.inference_mode()
    def attention_probs(self, layer: int, last_only: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs (H, Tq, S) float32, visible (Tq, S) bool) of layer `layer` for the last query
        (last_only) or every query (while the context is at most full_map_max tokens); softmax(q k^T /
        sqrt(hd)) under the causal (+ window) mask, the keys read from the KV cache. Recomputed, since
        the SDPA backend does not expose its probabilities; equal to the eager backend's."""
        self._require_started()
        T = len(self.ids)
        q = self.q_all[layer]  # (1, H, T or 1, hd)
        if last_only:
            q = q[:, :, -1:]
        elif q.shape[2] != T:
            raise GenerationError(f"the full attention maps are kept for contexts of at most "
                                  f"{self.settings.full_map_max} tokens (full_map_max); this one has {T}: "
                                  "only the last row is available")
        k = self.decode.cache.k[layer][:, :, :T]  # (1, Hkv, T, hd): RoPE'd keys, as the model wrote them
        slots = torch.arange(T, device=q.device)
        visible = visibility_mask(slots[T - q.shape[2]:], slots, None, self.window(layer))  # (1, 1, Tq, S)
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1).float()
        scores = (q.float() @ k.transpose(-2, -1)) / math.sqrt(self.config.head_dim)
        probs = scores.masked_fill(~visible, -math.inf).softmax(dim=-1)
        return probs[0], visible[0, 0]

    @torch.inference_mode()
    def _lens_logits(self, rows: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(rows[None]))[0].float()

    @property
    def lens_logits(self) -> torch.Tensor:
        """(L + 1, V) float32: the final norm + LM head on the residual stream after each layer
        (row 0: the embedding), at the last position; computed when asked, not kept."""
        self._require_started()
        return self._lens_logits(self.latest.lens_rows)

    @property
    def lens_probs(self) -> torch.Tensor:
        return self.lens_logits.softmax(dim=-1)

    @property
    def stage_logits(self) -> list[tuple[str, torch.Tensor]]:
        """(name, (1, V) logits) before and after each sampling processor, for the latest forward.
        The sampler's marks are those the draw saw: the token fed is marked only at the next step."""
        self._require_started()
        return processor_stages(self.latest.logits, self.settings.sampling, self.sampler.seen)

    def stage_probs(self) -> list[tuple[str, torch.Tensor]]:
        """(name, (V,) probabilities) before and after each processor; greedy adds ("greedy", one-hot).
        The last entry is the distribution the token is drawn from."""
        stage_logits = self.stage_logits
        out = [(name, logits[0].softmax(dim=-1)) for name, logits in stage_logits]
        if self.settings.sampling.greedy:
            logits = stage_logits[-1][1]
            out.append(("greedy", torch.nn.functional.one_hot(logits[0].argmax(), logits.shape[-1]).float()))
        return out

    # -- the JSON view --------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        text = self._text_cache.get(token_id)
        if text is None:
            text = ""
            if self.tokenizer is not None:
                try:
                    text = self.tokenizer.decode([token_id], skip_special_tokens=False)
                except Exception:  # an id past the tokenizer's table: no text
                    text = ""
            text = text or f"[{token_id}]"
            self._text_cache[token_id] = text
        return text

    def view(self, full_maps: bool | int | Sequence[int] | None = None) -> dict:
        """The JSON-serialisable view of the latest forward.

        full_maps: the T x T attention maps to include (when T <= full_map_max): True every layer,
        False none, an int or list those layers, None every layer when that is at most
        views.FULL_MAP_CELLS numbers (else none: ask attention_layer(i) for the one on screen).
        """
        self._require_started()
        return views.build_view(self, full_maps)

    def attention_layer(self, layer: int, full: bool = True) -> dict:
        """One layer's maps (views.attention_layer), computed from the kept q and the KV cache."""
        self._require_started()
        return views.attention_layer(self, layer, full)


def inside_view(model, tokenizer, prompt, steps: int = 0, settings: InsideSettings | None = None,
                **options) -> dict:
    """One call: prefill `prompt`, take `steps` decode steps, return the view (for API endpoints);
    the session is closed afterwards. settings, or options: InsideSettings.of's keywords (the
    sampling ones, seed, candidates, max_tokens, full_maps, ...)."""
    if settings is None:
        settings = InsideSettings.of(**options)
    elif options:
        raise GenerationError(f"pass settings= or keywords, not both (got settings= and {', '.join(options)})")
    with InsideSession(model, tokenizer, settings) as session:
        view = session.start(prompt)
        for _ in range(steps):
            view = session.step()
    return view
