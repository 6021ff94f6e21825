"""Inside the model: one token being made, captured from outside the model's math.

    from profiling.inside import InsideSession
    session = InsideSession(model, tokenizer, temperature=0.7, top_p=0.8, seed=0)
    view = session.start("The capital of France is")   # prefill; a JSON-serialisable dict
    view = session.step()                               # feed the chosen token, one decode step

Forward hooks on the existing modules (embedding, rotary embedding, each layer's norms, q/k/v or
the fused qkv_proj, o_proj, gate/up or gate_up_proj, down_proj, the final norm and the LM head)
record the shape every stage produced, the residual stream at the last position (for the logit
lens) and q/k (for the attention maps). The forward runs through an eager `qwen2.DecodeSession`
(plain module calls, so the hooks fire) and the views are computed afterwards:

- path: every stage with its captured shape, the shape the config implies, and its parameter count;
  the KV cache's size per layer.
- candidates: the top tokens before and after each sampling processor (qwen2.sampling.processor_stages).
- logit_lens: the final norm + LM head applied to the residual stream after each layer.
- attention: softmax(q k^T / sqrt(hd)) recomputed from the hooked q and k (RoPE applied with
  qwen2.model.apply_rope, the mask from qwen2.model.visibility_mask), since the SDPA backend does not
  expose its probabilities; equal to the eager backend's (tests/test_inside.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from qwen2.cache import kv_bytes_per_token
from qwen2.errors import GenerationError
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

    shapes[(name, layer)] = the output shape (batch dim dropped) of every call; q/k/v raw projections
    per layer; cos/sin from the rotary embedding; resid[0] the embedding's last row, resid[i + 1]
    layer i's output at the last position; logits the LM head's output.
    """

    def __init__(self, model):
        self.model = model
        self.handles = []
        self.shapes: dict[tuple[str, int | None], list[int]] = {}
        self.q: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}
        self.cos = self.sin = None
        self.resid: dict[int, torch.Tensor] = {}

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
            self.resid[0] = out[:, -1]

        def rope(out):
            self.cos, self.sin = out
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
                    store[i] = out
            return fn

        self._post(layer.input_layernorm, record("input_layernorm"))
        if attn.fused:
            q_size, kv_size = attn.q_size, attn.kv_size

            def qkv(out):
                self._shape(("qkv_proj", i), out)
                q, k, v = out.split([q_size, kv_size, kv_size], dim=-1)
                keep("q_proj", self.q)(q)
                keep("k_proj", self.k)(k)
                keep("v_proj", None)(v)
            self._post(attn.qkv_proj, qkv)
        else:
            self._post(attn.q_proj, keep("q_proj", self.q))
            self._post(attn.k_proj, keep("k_proj", self.k))
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
            self.resid[i + 1] = out[:, -1]
        self._post(layer, layer_out)

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()


# ----------------------------------------------------------------------------- the session


def _probs_list(t: torch.Tensor, digits: int = 5) -> list:
    return torch.round(t.double(), decimals=digits).tolist()  # float64: short reprs in JSON


class InsideSession:
    """One prompt's walk through the model, advanced a decode step at a time.

    start(prompt) prefills and returns the view; step(token_id=None) feeds the chosen token (or the
    one given) through the KV cache and returns the new view; view(full_maps=...) rebuilds the dict
    from what was captured; attention_layer(i) is one layer's maps. Sampling settings are those of
    qwen2.generate; with the same seed, the chosen tokens are what qwen2.generate would yield.
    """

    def __init__(self, model, tokenizer=None, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 candidates: int = 10, lens_top: int = 5, full_map_max: int = 64, full_maps=None):
        self.model, self.tokenizer = model, tokenizer
        self.config = model.config
        self.settings = SamplingSettings(temperature, top_k, top_p, min_p, repetition_penalty)
        self.seed = seed
        self.n_candidates, self.lens_top, self.full_map_max = candidates, lens_top, full_map_max
        self.full_maps = full_maps  # what start/step's views include; see view()
        self.ids: list[int] = []
        self.prompt_len = 0
        self.session: DecodeSession | None = None
        self.sampler: Sampler | None = None
        self._text_cache: dict[int, str] = {}

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
        if len(ids) >= self.config.max_position_embeddings:
            raise GenerationError(f"the prompt ({len(ids)} tokens) leaves no room in the context of "
                                  f"{self.config.max_position_embeddings}")
        self.ids, self.prompt_len = list(ids), len(ids)
        prompt_t = torch.tensor([ids], device=self.model.device)
        self.sampler = Sampler(self.settings, prompt_t, V, self.seed)
        self._prefill()
        return self.view(self.full_maps)

    def step(self, token_id: int | None = None) -> dict:
        """Feed the chosen token (or `token_id`) as one decode step; return the new view."""
        if self.session is None:
            raise GenerationError("start(prompt) first")
        token = self.chosen if token_id is None else int(token_id)
        if not 0 <= token < self.config.vocab_size:
            raise GenerationError(f"token id {token} is outside the vocab [0, {self.config.vocab_size})")
        if token != self.chosen and self.sampler.seen is not None:  # the penalty sees the token fed
            self.sampler.seen = self._seen_before.clone()
            self.sampler.seen[0, token] = True
        if len(self.ids) + 1 > self.config.max_position_embeddings:
            raise GenerationError(f"the context of {self.config.max_position_embeddings} tokens is full")
        self.ids.append(token)
        if self.session.length + 1 > self.session.cache.max_len:
            self._prefill()  # cache full: rebuild a bigger one from all tokens (rare)
        else:
            self._forward(lambda: self.session.step(torch.tensor([token], device=self.model.device)),
                          phase="decode", new=1)
        return self.view(self.full_maps)

    def _prefill(self):
        limit = self.config.max_position_embeddings
        self.session = DecodeSession(self.model, 1, min(limit, len(self.ids) + GROWTH))
        self.q_all: list[torch.Tensor | None] = [None] * self.config.num_hidden_layers
        self.k_all: list[torch.Tensor | None] = [None] * self.config.num_hidden_layers
        prompt = torch.tensor([self.ids], device=self.model.device)
        self._forward(lambda: self.session.prefill(prompt), phase="prefill", new=len(self.ids))

    @torch.inference_mode()
    def _forward(self, run, phase: str, new: int):
        t0 = time.perf_counter()
        with Capture(self.model) as cap:
            logits = run()  # (1, V) float32
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        self.phase, self.new_tokens, self.capture, self.logits = phase, new, cap, logits.float()
        self._rope_and_append(cap)
        self._attention()
        self._lens(cap)
        self._candidates()
        t2 = time.perf_counter()
        self.timing = {"forward_s": t1 - t0, "views_s": t2 - t1}

    def _rope_and_append(self, cap: Capture):
        H, Hkv, hd = self.config.num_attention_heads, self.config.num_key_value_heads, self.config.head_dim
        for i in range(self.config.num_hidden_layers):
            B, T, _ = cap.q[i].shape
            q = apply_rope(cap.q[i].reshape(B, T, H, hd).transpose(1, 2), cap.cos, cap.sin)  # (1, H, T, hd)
            k = apply_rope(cap.k[i].reshape(B, T, Hkv, hd).transpose(1, 2), cap.cos, cap.sin)  # (1, Hkv, T, hd)
            self.q_all[i] = q if self.q_all[i] is None else torch.cat([self.q_all[i], q], dim=2)
            self.k_all[i] = k if self.k_all[i] is None else torch.cat([self.k_all[i], k], dim=2)

    # -- the views' numbers ---------------------------------------------------------------

    def _window(self, layer: int) -> int | None:
        return self.config.sliding_window if self.config.layer_types[layer] == "sliding_attention" else None

    def attention_probs(self, layer: int, last_only: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs (H, Tq, S) float32, visible (Tq, S) bool) of layer `layer` for the last query
        (last_only) or every query; softmax(q k^T / sqrt(hd)) under the causal (+ window) mask."""
        q, k = self.q_all[layer], self.k_all[layer]  # (1, H, T, hd), (1, Hkv, T, hd)
        T = k.shape[2]
        if last_only:
            q = q[:, :, -1:]
        slots = torch.arange(T, device=q.device)
        visible = visibility_mask(slots[T - q.shape[2]:], slots, None, self._window(layer))  # (1, 1, Tq, S)
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1).float()
        scores = (q.float() @ k.transpose(-2, -1)) / math.sqrt(self.config.head_dim)
        probs = scores.masked_fill(~visible, -math.inf).softmax(dim=-1)
        return probs[0], visible[0, 0]

    def _attention(self):
        L = self.config.num_hidden_layers
        T = len(self.ids)
        self.attn_last = [self.attention_probs(i, last_only=True) for i in range(L)]
        self.attn_full = [self.attention_probs(i, last_only=False) for i in range(L)] \
            if T <= self.full_map_max else None

    def _lens(self, cap: Capture):
        rows = torch.cat([cap.resid[i] for i in range(self.config.num_hidden_layers + 1)])  # (L + 1, D)
        lens_logits = self.model.lm_head(self.model.model.norm(rows[None]))[0].float()  # (L + 1, V)
        self.lens_logits = lens_logits
        self.lens_probs = lens_logits.softmax(dim=-1)

    def _candidates(self):
        seen = self.sampler.seen
        self._seen_before = seen.clone() if seen is not None else None
        stages = processor_stages(self.logits, self.settings, seen)
        self.stage_logits = stages
        self.chosen = int(self.sampler(self.logits)[0])  # the draw qwen2.generate would make (marks seen)

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
        if self.session is None:
            raise GenerationError("start(prompt) first")
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
            "path": self._path(),
            "kv_cache": self._kv_cache(),
            "candidates": self._candidates_view(),
            "logit_lens": self._lens_view(),
            "attention": {
                "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
                "groups": c.num_attention_heads // c.num_key_value_heads,
                "full_map_max": self.full_map_max,
                "layers": [self.attention_layer(i, full=i in layers) for i in range(c.num_hidden_layers)],
            },
            "chosen": self._chosen_view(),
            "timing": {k: round(v, 4) for k, v in self.timing.items()},
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

    def _path(self) -> list[dict]:
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
        chosen_p = float(self._final_probs()[self.chosen])
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
                  shape=list(cap.resid[L].shape[1:])),
            stage("lm_head", "LM head", "lm_head", [V], counts["lm_head"],
                  f"{D} -> {V} logits" + ("; weights shared with the embedding" if c.tie_word_embeddings else "")),
            stage("softmax", "Softmax", "", [V], 0, "probabilities after the sampling processors",
                  shape=list(self._final_probs().shape)),
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

    def _final_probs(self) -> torch.Tensor:
        name, logits = self.stage_logits[-1]
        if self.settings.greedy:
            return torch.nn.functional.one_hot(logits[0].argmax(), logits.shape[-1]).float()
        return logits[0].softmax(dim=-1)

    def stage_probs(self) -> list[tuple[str, torch.Tensor]]:
        """(name, (V,) probabilities) before and after each processor; greedy adds ("greedy", one-hot)."""
        out = [(name, logits[0].softmax(dim=-1)) for name, logits in self.stage_logits]
        if self.settings.greedy:
            out.append(("greedy", self._final_probs()))
        return out

    def _candidates_view(self) -> dict:
        s = self.settings
        stages = self.stage_probs()
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
        top = self.lens_probs.topk(self.lens_top, dim=-1)
        target = self.chosen
        target_p = self.lens_probs[:, target]
        ranks = (self.lens_probs > target_p[:, None]).sum(-1) + 1
        return {"rows": ["embedding"] + [f"layer {i}" for i in range(L)],
                "top_ids": top.indices.tolist(),
                "top_texts": [[self.token_text(t) for t in row] for row in top.indices.tolist()],
                "top_probs": _probs_list(top.values),
                "target": {"id": target, "text": self.token_text(target), "probs": _probs_list(target_p),
                           "ranks": ranks.tolist()}}

    def attention_layer(self, layer: int, full: bool = True) -> dict:
        """One layer's maps: last_row (H, S) always; full (H, T, T) and its mask when asked and T is
        short enough; masked cells are 0 in the probabilities and False in the masks."""
        c = self.config
        probs, visible = self.attn_last[layer]
        entry = {"layer": layer, "type": c.layer_types[layer], "window": self._window(layer),
                 "kv_head_of": [h // (c.num_attention_heads // c.num_key_value_heads)
                                for h in range(c.num_attention_heads)],
                 "last_row": _probs_list(probs[:, 0]), "last_visible": visible[0].tolist(),
                 "full": None, "full_visible": None}
        if full and self.attn_full is not None:
            fprobs, fvisible = self.attn_full[layer]
            entry["full"], entry["full_visible"] = _probs_list(fprobs), fvisible.tolist()
        return entry

    def _chosen_view(self) -> dict:
        stop = default_stop_ids(self.model, self.tokenizer)
        return {"id": self.chosen, "text": self.token_text(self.chosen),
                "prob": round(float(self._final_probs()[self.chosen]), 6),
                "model_prob": round(float(self.stage_probs()[0][1][self.chosen]), 6),
                "greedy": self.settings.greedy, "stop": self.chosen in stop}


def inside_view(model, tokenizer, prompt, steps: int = 0, full_maps=None, **options) -> dict:
    """One call: prefill `prompt`, take `steps` decode steps, return the view (for API endpoints).
    options: InsideSession's keyword arguments (sampling settings, seed, candidates, ...)."""
    session = InsideSession(model, tokenizer, full_maps=full_maps, **options)
    view = session.start(prompt)
    for _ in range(steps):
        view = session.step()
    return view
