"""Inside the model: one token being made, captured from outside the model's math.

    from profiling.inside import InsideSession
    with InsideSession(model, tokenizer, temperature=0.7, top_p=0.8, seed=0, max_tokens=512) as session:
        view = session.start("The capital of France is")   # prefill; a JSON-serialisable dict
        view = session.step()                               # feed the chosen token, one decode step

Forward hooks on the existing modules (embedding, rotary embedding, each layer's norms, q/k/v or
the fused qkv_proj, o_proj, gate/up or gate_up_proj, down_proj, the final norm and the LM head)
record the shape every stage produced, the residual stream at the last position (for the logit
lens) and q (for the attention maps). The forward runs through an eager `qwen2.DecodeSession`
(plain module calls, so the hooks fire) and the views are computed afterwards:

- path: every stage with its captured shape, the shape the config implies, and its parameter count;
  the KV cache's size per layer.
- candidates: the top tokens before and after each sampling processor (qwen2.sampling.processor_stages).
- logit_lens: the final norm + LM head applied to the residual stream after each layer.
- attention: softmax(q k^T / sqrt(hd)) recomputed from the hooked q (RoPE applied with
  qwen2.model.apply_rope) and the keys in the KV cache (the mask from qwen2.model.visibility_mask),
  since the SDPA backend does not expose its probabilities; equal to the eager backend's
  (tests/test_inside.py).

Memory: a session is meant to be kept between clicks (the app keeps a few), so it holds only what
its views need, and no more than `max_tokens` tokens of context: the KV cache (at most max_tokens
slots), q of the last position per layer (every position while the context is at most
full_map_max tokens, for the T x T maps), the residual rows at the last position (the logit lens,
(L + 1, D)), the last logits and the reduced lens view. The capture's activations are dropped after
each forward; attention probabilities, the (L + 1, V) lens and the processors' stages are computed
again when asked (`attention_probs`, `lens_logits`, `stage_probs`). `close()` (or leaving a `with`
block) lets the KV cache go.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from qwen2.cache import kv_bytes_per_token
from qwen2.errors import GenerationError, LimitError
from qwen2.generate import DecodeSession, default_stop_ids
from qwen2.model import apply_rope, visibility_mask
from qwen2.sampling import Sampler, SamplingSettings, processor_stages

GROWTH = 256          # cache slots kept free for steps; a full cache is rebuilt bigger (one re-prefill)
FULL_MAP_CELLS = 250_000  # view(full_maps=None) includes every layer's T x T maps up to this many numbers


# ----------------------------------------------------------------------------- model facts


def model_facts(model) -> dict:
    """Source, random_weights and quantization, from model.info."""
    info = model.info
    return {"source": info.source, "random_weights": bool(info.random_weights), "quantization": info.quantization}


def parameter_counts(config) -> dict[str, int]:
    """Parameters of each stage, from the config (so right for any size): per layer and model-level."""
    D, I, V = config.hidden_size, config.intermediate_size, config.vocab_size
    H, Hkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    counts = {
        "embedding": V * D,
        "input_layernorm": D,
        "q_proj": D * H * hd + H * hd,
        "k_proj": D * Hkv * hd + Hkv * hd,
        "v_proj": D * Hkv * hd + Hkv * hd,
        "o_proj": H * hd * D,
        "post_attention_layernorm": D,
        "gate_proj": D * I,
        "up_proj": D * I,
        "down_proj": I * D,
        "final_norm": D,
        "lm_head": 0 if config.tie_word_embeddings else V * D,
    }
    layer_keys = ("input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj", "post_attention_layernorm",
                  "gate_proj", "up_proj", "down_proj")
    counts["layer"] = sum(counts[k] for k in layer_keys)
    counts["total"] = (counts["embedding"] + config.num_hidden_layers * counts["layer"] + counts["final_norm"]
                       + counts["lm_head"])
    return counts


# ----------------------------------------------------------------------------- the capture


class Capture:
    """Forward hooks on the model's modules for one forward; removed on exit.

    shapes[(name, layer)] = the output shape (batch dim dropped) of every call; q[layer] the raw q
    projection and cos/sin from the rotary embedding, of every new position or (last_only) of the
    last one; resid[0] the embedding's last row, resid[i + 1] layer i's output at the last position.
    What is kept is copied out of the forward's activations, so none of those outlives the forward;
    release() drops the tensors (the shapes stay).
    """

    def __init__(self, model, last_only: bool = False):
        self.model = model
        self.last_only = last_only
        self.handles = []
        self.shapes: dict[tuple[str, int | None], list[int]] = {}
        self.q: dict[int, torch.Tensor] = {}
        self.cos = self.sin = None
        self.resid: dict[int, torch.Tensor] = {}

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> a copy of the rows kept: the last one, or all."""
        return (t[:, -1:] if self.last_only else t).clone()

    def release(self):
        self.q.clear()
        self.resid.clear()
        self.cos = self.sin = None

    def _shape(self, key, t):
        self.shapes[key] = list(t.shape[1:])  # batch of one: drop it

    def _post(self, module, fn):
        self.handles.append(module.register_forward_hook(lambda m, args, out: fn(out)))

    def _pre(self, module, fn):
        self.handles.append(module.register_forward_pre_hook(lambda m, args: fn(args[0])))

    def __enter__(self):
        m = self.model.model

        def embed(out):
            self._shape(("embedding", None), out)
            self.resid[0] = out[:, -1].clone()  # a view would keep the whole (T, D) output alive

        def rope(out):
            self.cos, self.sin = self._rows(out[0]), self._rows(out[1])
            self._shape(("rope", None), out[0])

        self._post(m.embed_tokens, embed)
        self._post(m.rotary_emb, rope)
        for i, layer in enumerate(m.layers):
            self._hook_layer(i, layer)
        self._post(m.norm, lambda out: self._shape(("final_norm", None), out))
        self._post(self.model.lm_head, lambda out: self._shape(("lm_head", None), out))
        return self

    def _hook_layer(self, i, layer):
        attn, mlp = layer.self_attn, layer.mlp

        def record(name):
            return lambda out: self._shape((name, i), out)

        def keep(name, store):
            def fn(out):
                self._shape((name, i), out)
                if store is not None:
                    store[i] = self._rows(out)
            return fn

        self._post(layer.input_layernorm, record("input_layernorm"))
        if attn.fused:
            q_size, kv_size = attn.q_size, attn.kv_size

            def qkv(out):
                self._shape(("qkv_proj", i), out)
                q, k, v = out.split([q_size, kv_size, kv_size], dim=-1)
                keep("q_proj", self.q)(q)
                keep("k_proj", None)(k)  # the keys are read back from the KV cache
                keep("v_proj", None)(v)
            self._post(attn.qkv_proj, qkv)
        else:
            self._post(attn.q_proj, keep("q_proj", self.q))
            self._post(attn.k_proj, keep("k_proj", None))
            self._post(attn.v_proj, keep("v_proj", None))
        self._pre(attn.o_proj, record("attention"))
        self._post(attn.o_proj, record("o_proj"))
        self._post(attn, record("attn_residual"))
        self._post(layer.post_attention_layernorm, record("post_attention_layernorm"))
        if mlp.fused:
            def gate_up(out):
                self._shape(("gate_up_proj", i), out)
                gate, up = out.chunk(2, dim=-1)
                record("gate_proj")(gate)
                record("up_proj")(up)
            self._post(mlp.gate_up_proj, gate_up)
        else:
            self._post(mlp.gate_proj, record("gate_proj"))
            self._post(mlp.up_proj, record("up_proj"))
        self._pre(mlp.down_proj, record("swiglu"))
        self._post(mlp.down_proj, record("down_proj"))

        def layer_out(out):
            self._shape(("layer_out", i), out)
            self.resid[i + 1] = out[:, -1].clone()
        self._post(layer, layer_out)

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()


# ----------------------------------------------------------------------------- the session


def _probs_list(t: torch.Tensor, digits: int = 5) -> list:
    return torch.round(t.double(), decimals=digits).tolist()  # float64: short reprs in JSON


_UNSET = object()
_SAMPLING_KEYWORDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


class InsideSession:
    """One prompt's walk through the model, advanced a decode step at a time.

    start(prompt) prefills and returns the view; step(token_id=None) feeds the chosen token (or the
    one given) through the KV cache and returns the new view; view(full_maps=...) rebuilds the dict
    from what was kept; attention_layer(i) is one layer's maps; close() lets the KV cache go. Sampling
    settings are those of qwen2.generate (`settings=` a SamplingSettings, or the keywords); with the
    same seed, the chosen tokens are what qwen2.generate would yield.

    max_tokens caps the session's whole context (prompt + stepped tokens; None: the model's
    context, and never more than it): start refuses a longer prompt and step a token past it, with a
    qwen2.errors.LimitError (a GenerationError). It bounds what a session holds (the KV cache) and
    how long a prefill holds the model.
    """

    def __init__(self, model, tokenizer=None, *, settings: SamplingSettings | None = None,
                 temperature: float = _UNSET, top_k: int = _UNSET, top_p: float = _UNSET,
                 min_p: float = _UNSET, repetition_penalty: float = _UNSET, seed: int | None = None,
                 candidates: int = 10, lens_top: int = 5, full_map_max: int = 64, full_maps=None,
                 max_tokens: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.config = model.config
        given = {k: v for k, v in zip(_SAMPLING_KEYWORDS, (temperature, top_k, top_p, min_p, repetition_penalty))
                 if v is not _UNSET}
        if settings is not None:
            if not isinstance(settings, SamplingSettings):
                raise GenerationError("settings must be a qwen2.sampling.SamplingSettings; "
                                      f"got {type(settings).__name__}")
            if given:
                raise GenerationError(f"pass the sampling settings either as settings= or as keywords, not both "
                                      f"(got settings= and {', '.join(given)})")
            self.settings = settings
        else:
            self.settings = SamplingSettings(**given)
        context = self.config.max_position_embeddings
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens < 1):
            raise GenerationError(f"max_tokens={max_tokens!r} is invalid; expected an integer >= 1 "
                                  "(or None: the model's context)")
        self.max_tokens = context if max_tokens is None else min(max_tokens, context)
        self.seed = seed
        self.n_candidates, self.lens_top, self.full_map_max = candidates, lens_top, full_map_max
        self.full_maps = full_maps  # what start/step's views include; see view()
        self.ids: list[int] = []
        self.prompt_len = 0
        self.session: DecodeSession | None = None
        self.sampler: Sampler | None = None
        self.closed = False
        self._text_cache: dict[int, str] = {}
        self._clear()

    def _clear(self):
        """Drop everything a forward left (the KV cache included)."""
        if getattr(self, "session", None) is not None:
            self.session.close()
        self.session = None
        self.q_all: list[torch.Tensor | None] = [None] * self.config.num_hidden_layers
        self.lens_rows: torch.Tensor | None = None  # (L + 1, D): the residual stream at the last position
        self.logits: torch.Tensor | None = None  # (1, V) float32
        self.capture: Capture | None = None  # its shapes only
        self._seen_before: torch.Tensor | None = None
        self._lens: tuple | None = None

    def close(self):
        """Let the KV cache and every kept tensor go; the session can start() again afterwards."""
        self._clear()
        self.sampler = None
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _cap_phrase(self) -> str:
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
        V = self.config.vocab_size
        if not ids:
            raise GenerationError("the prompt is empty: nothing to run")
        if min(ids) < 0 or max(ids) >= V:
            raise GenerationError(f"token ids must be in [0, {V})")
        if len(ids) > self.max_tokens:
            raise LimitError(f"the prompt has {len(ids)} tokens, more than {self._cap_phrase()}; shorten it "
                             f"to at most {self.max_tokens} tokens (e.g. keep its end)")
        if len(ids) >= self.config.max_position_embeddings:
            raise GenerationError(f"the prompt ({len(ids)} tokens) leaves no room in the context of "
                                  f"{self.config.max_position_embeddings}")
        self._clear()  # a session started again lets its previous cache go first
        self.closed = False
        self.ids, self.prompt_len = list(ids), len(ids)
        prompt_t = torch.tensor([ids], device=self.model.device)
        self.sampler = Sampler(self.settings, prompt_t, V, self.seed)
        self._prefill()
        return self.view(self.full_maps)

    def _require_started(self):
        if self.session is None:
            raise GenerationError("this session was closed: start(prompt) again" if self.closed
                                  else "start(prompt) first")

    def step(self, token_id: int | None = None) -> dict:
        """Feed the chosen token (or `token_id`) as one decode step; return the new view."""
        self._require_started()
        token = self.chosen if token_id is None else int(token_id)
        if not 0 <= token < self.config.vocab_size:
            raise GenerationError(f"token id {token} is outside the vocab [0, {self.config.vocab_size})")
        if len(self.ids) + 1 > self.max_tokens:
            raise LimitError(f"no room for another token: {len(self.ids)} tokens ({self.prompt_len} prompt + "
                             f"{len(self.ids) - self.prompt_len} stepped) fill {self._cap_phrase()}; start "
                             "again with a shorter prompt to step further")
        self._mark_fed(token)
        self.ids.append(token)
        if self.session.length + 1 > self.session.cache.max_len:
            self._prefill()  # cache full: rebuild a bigger one from all tokens (rare)
        else:
            self._forward(lambda: self.session.step(torch.tensor([token], device=self.model.device)),
                          phase="decode", new=1)
        return self.view(self.full_maps)

    def _mark_fed(self, token: int):
        """The repetition penalty sees the token fed: the draw marked the chosen token seen; another
        token fed replaces that mark. (The one place that writes the Sampler's state: a
        Sampler.mark(ids) / draw-without-marking interface in qwen2.sampling would replace it.)"""
        if token != self.chosen and self.sampler.seen is not None:
            self.sampler.seen = self._seen_before.clone()
            self.sampler.seen[0, token] = True

    def _prefill(self):
        self._clear()  # the old cache goes before the new one is allocated
        self.session = DecodeSession(self.model, 1, min(self.max_tokens, len(self.ids) + GROWTH))
        prompt = torch.tensor([self.ids], device=self.model.device)
        self._forward(lambda: self.session.prefill(prompt), phase="prefill", new=len(self.ids))

    @torch.inference_mode()
    def _forward(self, run, phase: str, new: int):
        t0 = time.perf_counter()
        keep_all = len(self.ids) <= self.full_map_max  # q of every position only for the T x T maps
        with Capture(self.model, last_only=not keep_all) as cap:
            logits = run()  # (1, V) float32
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        self.phase, self.new_tokens, self.capture, self.logits = phase, new, cap, logits.float()
        self._rope_and_append(cap, keep_all)
        L = self.config.num_hidden_layers
        self.lens_rows = torch.cat([cap.resid[i] for i in range(L + 1)])  # (L + 1, D)
        self._last_row_shape = list(cap.resid[L].shape[1:])
        cap.release()  # the capture keeps its shapes only
        self._draw()
        self._reduce_lens()
        t2 = time.perf_counter()
        self.timing = {"forward_s": t1 - t0, "views_s": t2 - t1}

    def _rope_and_append(self, cap: Capture, keep_all: bool):
        H, hd = self.config.num_attention_heads, self.config.head_dim
        for i in range(self.config.num_hidden_layers):
            B, T, _ = cap.q[i].shape
            q = apply_rope(cap.q[i].reshape(B, T, H, hd).transpose(1, 2), cap.cos, cap.sin)  # (1, H, T, hd)
            if keep_all and self.q_all[i] is not None:
                q = torch.cat([self.q_all[i], q], dim=2)
            self.q_all[i] = q  # every position while T <= full_map_max, else the last one

    # -- the views' numbers ---------------------------------------------------------------

    def _window(self, layer: int) -> int | None:
        return self.config.sliding_window if self.config.layer_types[layer] == "sliding_attention" else None

    def full_maps_available(self) -> bool:
        """Whether the T x T maps can be computed: q of every position is kept up to full_map_max."""
        return self.session is not None and self.q_all[0] is not None and self.q_all[0].shape[2] == len(self.ids)

    @torch.inference_mode()
    def attention_probs(self, layer: int, last_only: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs (H, Tq, S) float32, visible (Tq, S) bool) of layer `layer` for the last query
        (last_only) or every query (while the context is at most full_map_max tokens); softmax(q k^T /
        sqrt(hd)) under the causal (+ window) mask, the keys read from the KV cache."""
        self._require_started()
        T = len(self.ids)
        q = self.q_all[layer]  # (1, H, T or 1, hd)
        if last_only:
            q = q[:, :, -1:]
        elif q.shape[2] != T:
            raise GenerationError(f"the full attention maps are kept for contexts of at most {self.full_map_max} "
                                  f"tokens (full_map_max); this one has {T}: only the last row is available")
        k = self.session.cache.k[layer][:, :, :T]  # (1, Hkv, T, hd): RoPE'd keys, as the model wrote them
        slots = torch.arange(T, device=q.device)
        visible = visibility_mask(slots[T - q.shape[2]:], slots, None, self._window(layer))  # (1, 1, Tq, S)
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1).float()
        scores = (q.float() @ k.transpose(-2, -1)) / math.sqrt(self.config.head_dim)
        probs = scores.masked_fill(~visible, -math.inf).softmax(dim=-1)
        return probs[0], visible[0, 0]

    @property
    def lens_logits(self) -> torch.Tensor:
        """(L + 1, V) float32: the final norm + LM head on the residual stream after each layer
        (row 0: the embedding), at the last position; computed when asked, not kept."""
        self._require_started()
        with torch.inference_mode():
            return self.model.lm_head(self.model.model.norm(self.lens_rows[None]))[0].float()

    @property
    def lens_probs(self) -> torch.Tensor:
        return self.lens_logits.softmax(dim=-1)

    def _reduce_lens(self):
        """The logit lens's view, kept instead of its (L + 1, V) probabilities: each row's top
        lens_top and the chosen token's probability and rank."""
        probs = self.lens_probs
        top = probs.topk(self.lens_top, dim=-1)
        target_p = probs[:, self.chosen].clone()  # a copy: a view would keep the whole (L + 1, V) alive
        ranks = (probs > target_p[:, None]).sum(-1) + 1
        self._lens = (top.indices, top.values, target_p, ranks)

    def _draw(self):
        seen = self.sampler.seen
        self._seen_before = seen.clone() if seen is not None else None
        self.chosen = int(self.sampler(self.logits)[0])  # the draw qwen2.generate would make (marks seen)

    @property
    def stage_logits(self) -> list[tuple[str, torch.Tensor]]:
        """(name, (1, V) logits) before and after each sampling processor, for the latest forward."""
        self._require_started()
        return processor_stages(self.logits, self.settings, self._seen_before)

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
        FULL_MAP_CELLS numbers (else none: ask attention_layer(i) for the one on screen).
        """
        self._require_started()
        c = self.config
        facts = model_facts(self.model)
        T = len(self.ids)
        if full_maps is None:
            full_maps = c.num_hidden_layers * c.num_attention_heads * T * T <= FULL_MAP_CELLS
        if full_maps is True:
            layers = set(range(c.num_hidden_layers))
        elif full_maps is False:
            layers = set()
        else:
            layers = {int(full_maps)} if isinstance(full_maps, int) else {int(x) for x in full_maps}
        t0 = time.perf_counter()
        stages = self.stage_probs()  # computed once per view, from the kept logits
        attention = [self.attention_layer(i, full=i in layers) for i in range(c.num_hidden_layers)]
        timing = {"forward_s": self.timing["forward_s"],
                  "views_s": self.timing["views_s"] + time.perf_counter() - t0}
        notice = None
        if facts["random_weights"]:
            notice = ("Random weights: every number here is really computed, but the model was never "
                      "trained, so its tokens and attention patterns are noise.")
        return {
            "model": self._model_summary(facts),
            "notice": notice,
            "phase": self.phase,
            "step": len(self.ids) - self.prompt_len,
            "tokens": [{"id": t, "text": self.token_text(t), "position": p, "generated": p >= self.prompt_len}
                       for p, t in enumerate(self.ids)],
            "settings": {"temperature": self.settings.temperature, "top_k": self.settings.top_k,
                         "top_p": self.settings.top_p, "min_p": self.settings.min_p,
                         "repetition_penalty": self.settings.repetition_penalty, "seed": self.seed},
            "max_tokens": self.max_tokens,
            "path": self._path(stages),
            "kv_cache": self._kv_cache(),
            "candidates": self._candidates_view(stages),
            "logit_lens": self._lens_view(),
            "attention": {
                "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
                "groups": c.num_attention_heads // c.num_key_value_heads,
                "full_map_max": self.full_map_max,
                "layers": attention,
            },
            "chosen": self._chosen_view(stages),
            "timing": {k: round(v, 4) for k, v in timing.items()},
        }

    def _model_summary(self, facts) -> dict:
        c = self.config
        counts = parameter_counts(c)
        return {
            **facts,
            "device": str(self.model.device), "dtype": str(self.model.dtype).removeprefix("torch."),
            "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "layers": c.num_hidden_layers, "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
            "head_dim": c.head_dim, "sliding_window": c.sliding_window, "layer_types": list(c.layer_types),
            "tie_word_embeddings": c.tie_word_embeddings, "rope_theta": c.rope_theta,
            "fused": self.model.model.layers[0].self_attn.fused,
            "parameters": counts["total"], "parameters_per_layer": counts["layer"],
        }

    def _path(self, stages) -> list[dict]:
        """Every stage in execution order: captured shape, expected shape, parameters, detail."""
        c, cap = self.config, self.capture
        D, I, V, L = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
        H, Hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        T, S = self.new_tokens, len(self.ids)
        counts = parameter_counts(c)
        fused_attn = self.model.model.layers[0].self_attn.fused
        fused_mlp = self.model.model.layers[0].mlp.fused
        windows = [i for i in range(L) if c.layer_types[i] == "sliding_attention"]

        def stage(key, label, module, expected, params, detail, layer_stage=False, shape=None):
            if layer_stage:
                shapes = [cap.shapes.get((key, i)) for i in range(L)]
                got = shapes[0]
                ok = all(s == expected for s in shapes)
            else:
                got = shape if shape is not None else cap.shapes.get((key, None))
                ok = got == expected
            return {"key": key, "label": label, "module": module, "scope": "layer" if layer_stage else "model",
                    "shape": got, "expected": expected, "ok": bool(ok), "params": int(params), "detail": detail}

        lay = "model.layers.*"
        attn_mod = lay + ".self_attn"
        qkv_name = attn_mod + (".qkv_proj" if fused_attn else ".{}_proj")
        mlp_mod = lay + ".mlp"
        gu_name = mlp_mod + (".gate_up_proj" if fused_mlp else ".{}_proj")
        final = stages[-1][1]
        chosen_p = float(final[self.chosen])
        window_note = (f"; layers {windows[0]}..{windows[-1]} attend within a sliding window of "
                       f"{c.sliding_window} tokens" if windows else "")
        path = [
            stage("tokens", "Token ids", "", [T], 0,
                  f"{T} new token{'s' if T != 1 else ''} ({self.phase}); {S} in the context",
                  shape=[T]),
            stage("embedding", "Embedding", "model.embed_tokens", [T, D], counts["embedding"],
                  f"one row of the {V} x {D} table per token"),
            stage("input_layernorm", "RMSNorm", lay + ".input_layernorm", [T, D],
                  counts["input_layernorm"], "x / rms(x) * weight", True),
            stage("q_proj", "q projection", qkv_name.format("q"), [T, H * hd], counts["q_proj"],
                  f"{H} query heads x {hd} dims" + (" (slice of the fused q|k|v product)" if fused_attn else ""),
                  True),
            stage("k_proj", "k projection", qkv_name.format("k"), [T, Hkv * hd], counts["k_proj"],
                  f"{Hkv} key heads x {hd} dims", True),
            stage("v_proj", "v projection", qkv_name.format("v"), [T, Hkv * hd], counts["v_proj"],
                  f"{Hkv} value heads x {hd} dims", True),
            stage("rope", "RoPE", "model.rotary_emb", [T, hd], 0,
                  f"cos/sin per position (theta={c.rope_theta:g}) rotate each (i, i+{hd // 2}) pair of q and k"),
            stage("attention", "Grouped-query attention", attn_mod, [T, H * hd], 0,
                  f"{H} query heads share {Hkv} KV heads ({H // Hkv} per group); scores (H, T, S) = "
                  f"({H}, {T}, {S}); softmax(q k^T / sqrt({hd})) v over {S} cached keys{window_note}",
                  True),
            stage("o_proj", "o projection", attn_mod + ".o_proj", [T, D], counts["o_proj"],
                  f"{H * hd} -> {D}", True),
            stage("attn_residual", "+ residual", attn_mod, [T, D], 0, "h = h + attention(norm(h))", True),
            stage("post_attention_layernorm", "RMSNorm", lay + ".post_attention_layernorm", [T, D],
                  counts["post_attention_layernorm"], "x / rms(x) * weight", True),
            stage("gate_proj", "gate projection", gu_name.format("gate"), [T, I], counts["gate_proj"],
                  f"{D} -> {I}" + (" (half of the fused gate|up product)" if fused_mlp else ""), True),
            stage("up_proj", "up projection", gu_name.format("up"), [T, I], counts["up_proj"],
                  f"{D} -> {I}", True),
            stage("swiglu", "SwiGLU", mlp_mod, [T, I], 0, "silu(gate) * up", True),
            stage("down_proj", "down projection", mlp_mod + ".down_proj", [T, D], counts["down_proj"],
                  f"{I} -> {D}", True),
            stage("layer_out", "+ residual", lay, [T, D], 0, f"h = h + mlp(norm(h)); x {L} layers", True),
            stage("final_norm", "Final RMSNorm", "model.norm", [T, D], counts["final_norm"], "x / rms(x) * weight"),
            stage("last_row", "Last row", "", [D], 0, "only the last position predicts the next token",
                  shape=self._last_row_shape),
            stage("lm_head", "LM head", "lm_head", [V], counts["lm_head"],
                  f"{D} -> {V} logits" + ("; weights shared with the embedding" if c.tie_word_embeddings else "")),
            stage("softmax", "Softmax", "", [V], 0, "probabilities after the sampling processors",
                  shape=list(final.shape)),
            stage("chosen", "Chosen token", "", [1], 0,
                  f"{self.token_text(self.chosen)!r} (id {self.chosen}, p={chosen_p:.3f})", shape=[1]),
        ]
        return path

    def _kv_cache(self) -> dict:
        c = self.config
        total = kv_bytes_per_token(c, self.model.dtype)
        per_layer = total // c.num_hidden_layers
        S = len(self.ids)
        return {"bytes_per_token": total, "bytes_per_token_per_layer": per_layer,
                "tokens": S, "bytes_per_layer": per_layer * S, "bytes": total * S,
                "layer_shape": [c.num_key_value_heads, S, c.head_dim],
                "allocated_tokens": self.session.cache.max_len,
                "detail": f"K and V of {c.num_key_value_heads} heads x {c.head_dim} dims per token per layer"}

    def stage_probs(self) -> list[tuple[str, torch.Tensor]]:
        """(name, (V,) probabilities) before and after each processor; greedy adds ("greedy", one-hot).
        The last entry is the distribution the token is drawn from."""
        stage_logits = self.stage_logits
        out = [(name, logits[0].softmax(dim=-1)) for name, logits in stage_logits]
        if self.settings.greedy:
            logits = stage_logits[-1][1]
            out.append(("greedy", torch.nn.functional.one_hot(logits[0].argmax(), logits.shape[-1]).float()))
        return out

    def _final_probs(self) -> torch.Tensor:
        return self.stage_probs()[-1][1]

    def _candidates_view(self, stages) -> dict:
        s = self.settings
        raw, final = stages[0][1], stages[-1][1]
        n = self.n_candidates
        ids: list[int] = []
        for source in (final, stages[1][1], raw):  # the draw's favourites, then the model's
            for t in source.topk(min(n, source.shape[0])).indices.tolist():
                if len(ids) >= n:
                    break
                if t not in ids and (source is raw or float(source[t]) > 0):
                    ids.append(t)
        idx = torch.tensor(ids, device=raw.device)
        labels = {"logits": ("model", True),
                  "repetition_penalty": (f"repetition penalty {s.repetition_penalty:g}", s.repetition_penalty != 1.0),
                  "temperature": (f"temperature {s.temperature:g}", s.temperature != 1.0),
                  "top_k": (f"top-k {s.top_k}" if s.top_k else "top-k off", s.top_k > 0),
                  "top_p": (f"top-p {s.top_p:g}", s.top_p < 1.0),
                  "min_p": (f"min-p {s.min_p:g}", s.min_p > 0.0),
                  "greedy": ("greedy (temperature 0): argmax", True)}
        out = []
        for name, probs in stages:
            label, active = labels[name]
            picked = probs[idx]
            out.append({"name": name, "label": label, "active": bool(active), "probs": _probs_list(picked),
                        "other": round(max(0.0, 1.0 - float(picked.sum())), 5),
                        "kept": int((probs > 0).sum())})
        return {"tokens": [{"id": t, "text": self.token_text(t)} for t in ids], "stages": out}

    def _lens_view(self) -> dict:
        L = self.config.num_hidden_layers
        top_ids, top_probs, target_p, ranks = self._lens  # reduced right after the forward
        target = self.chosen
        return {"rows": ["embedding"] + [f"layer {i}" for i in range(L)],
                "top_ids": top_ids.tolist(),
                "top_texts": [[self.token_text(t) for t in row] for row in top_ids.tolist()],
                "top_probs": _probs_list(top_probs),
                "target": {"id": target, "text": self.token_text(target), "probs": _probs_list(target_p),
                           "ranks": ranks.tolist()}}

    def attention_layer(self, layer: int, full: bool = True) -> dict:
        """One layer's maps: last_row (H, S) always; full (H, T, T) and its mask when asked and T is
        short enough (at most full_map_max); masked cells are 0 in the probabilities and False in the
        masks. Computed from the kept q and the KV cache at each call."""
        c = self.config
        probs, visible = self.attention_probs(layer, last_only=True)
        entry = {"layer": layer, "type": c.layer_types[layer], "window": self._window(layer),
                 "kv_head_of": [h // (c.num_attention_heads // c.num_key_value_heads)
                                for h in range(c.num_attention_heads)],
                 "last_row": _probs_list(probs[:, 0]), "last_visible": visible[0].tolist(),
                 "full": None, "full_visible": None}
        if full and len(self.ids) <= self.full_map_max and self.full_maps_available():
            fprobs, fvisible = self.attention_probs(layer, last_only=False)
            entry["full"], entry["full_visible"] = _probs_list(fprobs), fvisible.tolist()
        return entry

    def _chosen_view(self, stages) -> dict:
        stop = default_stop_ids(self.model, self.tokenizer)
        return {"id": self.chosen, "text": self.token_text(self.chosen),
                "prob": round(float(stages[-1][1][self.chosen]), 6),
                "model_prob": round(float(stages[0][1][self.chosen]), 6),
                "greedy": self.settings.greedy, "stop": self.chosen in stop}


def inside_view(model, tokenizer, prompt, steps: int = 0, full_maps=None, **options) -> dict:
    """One call: prefill `prompt`, take `steps` decode steps, return the view (for API endpoints);
    the session is closed afterwards. options: InsideSession's keyword arguments (settings= or the
    sampling keywords, seed, candidates, max_tokens, ...)."""
    with InsideSession(model, tokenizer, full_maps=full_maps, **options) as session:
        view = session.start(prompt)
        for _ in range(steps):
            view = session.step()
    return view
