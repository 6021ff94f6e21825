"""The JSON view of an InsideSession's latest forward: the path table's rows, the KV cache, the
candidates before and after each sampling processor, the logit lens and the attention maps.

Every function reads a started session (inside.session.InsideSession) and changes nothing; the
dict they build is plain JSON, so inside.charts can draw it from an API call's answer too.

- path: every stage with its captured shape, the shape the config implies, and its parameter count.
- candidates: the top tokens before and after each processor (qwen2.sampling.processor_stages).
- logit_lens: the final norm + LM head applied to the residual stream after each layer.
- attention: the session's recomputed softmax(q k^T / sqrt(hd)) (InsideSession.attention_probs).

Tokens of equal probability are listed in the order the sampler breaks ties (top_tokens), so the
lens's last layer and the candidates agree with the chosen token.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from qwen2.cache import kv_bytes_per_token
from qwen2.config import parameter_counts
from qwen2.generate import default_stop_ids


FULL_MAP_CELLS = 250_000  # view(full_maps=None) includes every layer's T x T maps up to this many numbers


# ----------------------------------------------------------------------------- model facts


def model_facts(model) -> dict:
    """Source, random_weights and quantization, from model.info."""
    info = model.info
    return {"source": info.source, "random_weights": bool(info.random_weights), "quantization": info.quantization}


# ----------------------------------------------------------------------------- ranking


def top_tokens_row(row: torch.Tensor, k: int, first: int | None = None,
                   positive: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A row's k most likely tokens, (V,) -> (ids, probs), most likely first.

    Equal probabilities are ordered as the sampler breaks the tie: `first` (the token it chose)
    ahead of its equals, then lower ids first, the one argmax picks; topk leaves that order
    unspecified. positive: leave out tokens of probability 0 (then fewer than k may come back).
    """
    k = min(k, row.shape[-1])
    keep = row >= row.topk(k).values[-1]  # every token tied with the k-th too: the tie is broken below
    if positive:
        keep &= row > 0
    ids = keep.nonzero()[:, 0]  # ascending
    if first is not None:
        ids = ids[torch.sort((ids != first).to(torch.uint8), stable=True).indices]
    ids = ids[torch.sort(row[ids], descending=True, stable=True).indices[:k]]
    return ids, row[ids]


def top_tokens(probs: torch.Tensor, k: int, first: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """top_tokens_row of each row: (R, V) -> (ids (R, k), probs (R, k))."""
    rows = [top_tokens_row(row, k, first) for row in probs]
    return torch.stack([ids for ids, _ in rows]), torch.stack([p for _, p in rows])


class LensTop(NamedTuple):
    """The logit lens, reduced: each row's top tokens and the chosen token's probability and rank."""

    top_ids: torch.Tensor    # (L + 1, lens_top)
    top_probs: torch.Tensor  # (L + 1, lens_top)
    target_p: torch.Tensor   # (L + 1,)
    ranks: torch.Tensor      # (L + 1,)


def reduce_lens(probs: torch.Tensor, k: int, chosen: int) -> LensTop:
    """Kept instead of the (L + 1, V) probabilities: those are recomputed when asked."""
    top_ids, top_probs = top_tokens(probs, k, first=chosen)
    target_p = probs[:, chosen].clone()  # a copy: a view would keep the whole (L + 1, V) alive
    ranks = (probs > target_p[:, None]).sum(-1) + 1
    return LensTop(top_ids, top_probs, target_p, ranks)


# ----------------------------------------------------------------------------- the view


def _probs_list(t: torch.Tensor, digits: int = 5) -> list:
    return torch.round(t.double(), decimals=digits).tolist()  # float64: short reprs in JSON


def build_view(s, full_maps=None) -> dict:
    """The whole view; full_maps as InsideSession.view's."""
    c, latest, sampling = s.config, s.latest, s.settings.sampling
    facts = model_facts(s.model)
    T = len(s.ids)
    if full_maps is None:
        full_maps = c.num_hidden_layers * c.num_attention_heads * T * T <= FULL_MAP_CELLS
    if full_maps is True:
        layers = set(range(c.num_hidden_layers))
    elif full_maps is False:
        layers = set()
    else:
        layers = {int(full_maps)} if isinstance(full_maps, int) else {int(x) for x in full_maps}
    t0 = time.perf_counter()
    stages = s.stage_probs()  # computed once per view, from the kept logits
    attention = [attention_layer(s, i, full=i in layers) for i in range(c.num_hidden_layers)]
    timing = {"forward_s": latest.forward_s, "views_s": latest.views_s + time.perf_counter() - t0}
    notice = None
    if facts["random_weights"]:
        notice = ("Random weights: every number here is really computed, but the model was never "
                  "trained, so its tokens and attention patterns are noise.")
    return {
        "model": _model_summary(s, facts),
        "notice": notice,
        "phase": latest.phase,
        "step": len(s.ids) - s.prompt_len,
        "tokens": [{"id": t, "text": s.token_text(t), "position": p, "generated": p >= s.prompt_len}
                   for p, t in enumerate(s.ids)],
        "settings": {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
                     "min_p": sampling.min_p, "repetition_penalty": sampling.repetition_penalty,
                     "seed": s.settings.seed},
        "max_tokens": s.max_tokens,
        "path": path_rows(s, stages),
        "kv_cache": kv_cache(s),
        "candidates": candidates(s, stages),
        "logit_lens": logit_lens(s),
        "attention": {
            "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
            "groups": c.num_attention_heads // c.num_key_value_heads,
            "full_map_max": s.settings.full_map_max,
            "layers": attention,
        },
        "chosen": chosen(s, stages),
        "timing": {k: round(v, 4) for k, v in timing.items()},
    }


def _model_summary(s, facts) -> dict:
    c = s.config
    counts = parameter_counts(c)
    return {
        **facts,
        "device": str(s.model.device), "dtype": str(s.model.dtype).removeprefix("torch."),
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "layers": c.num_hidden_layers, "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
        "head_dim": c.head_dim, "sliding_window": c.sliding_window, "layer_types": list(c.layer_types),
        "tie_word_embeddings": c.tie_word_embeddings, "rope_theta": c.rope_theta,
        "fused": s.model.model.layers[0].self_attn.fused,
        "parameters": counts["total"], "parameters_per_layer": counts["layer"],
    }


def path_rows(s, stages) -> list[dict]:
    """Every stage in execution order: captured shape, expected shape, parameters, detail."""
    c, latest = s.config, s.latest
    D, I, V, L = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    H, Hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    T, S = latest.new_tokens, len(s.ids)
    counts = parameter_counts(c)
    fused_attn = s.model.model.layers[0].self_attn.fused
    fused_mlp = s.model.model.layers[0].mlp.fused
    windows = [i for i in range(L) if c.layer_types[i] == "sliding_attention"]

    def stage(key, label, module, expected, params, detail, layer_stage=False, shape=None):
        if layer_stage:
            shapes = [latest.shapes.get((key, i)) for i in range(L)]
            got = shapes[0]
            ok = all(each == expected for each in shapes)
        else:
            got = shape if shape is not None else latest.shapes.get((key, None))
            ok = got == expected
        return {"key": key, "label": label, "module": module, "scope": "layer" if layer_stage else "model",
                "shape": got, "expected": expected, "ok": bool(ok), "params": int(params), "detail": detail}

    lay = "model.layers.*"
    attn_mod = lay + ".self_attn"
    qkv_name = attn_mod + (".qkv_proj" if fused_attn else ".{}_proj")
    mlp_mod = lay + ".mlp"
    gu_name = mlp_mod + (".gate_up_proj" if fused_mlp else ".{}_proj")
    final = stages[-1][1]
    chosen_p = float(final[latest.chosen])
    window_note = (f"; layers {windows[0]}..{windows[-1]} attend within a sliding window of "
                   f"{c.sliding_window} tokens" if windows else "")
    path = [
        stage("tokens", "Token ids", "", [T], 0,
              f"{T} new token{'s' if T != 1 else ''} ({latest.phase}); {S} in the context",
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
              shape=latest.last_row_shape),
        stage("lm_head", "LM head", "lm_head", [V], counts["lm_head"],
              f"{D} -> {V} logits" + ("; weights shared with the embedding" if c.tie_word_embeddings else "")),
        stage("softmax", "Softmax", "", [V], 0, "probabilities after the sampling processors",
              shape=list(final.shape)),
        stage("chosen", "Chosen token", "", [1], 0,
              f"{s.token_text(latest.chosen)!r} (id {latest.chosen}, p={chosen_p:.3f})", shape=[1]),
    ]
    return path


def kv_cache(s) -> dict:
    c = s.config
    total = kv_bytes_per_token(c, s.model.dtype)
    per_layer = total // c.num_hidden_layers
    S = len(s.ids)
    return {"bytes_per_token": total, "bytes_per_token_per_layer": per_layer,
            "tokens": S, "bytes_per_layer": per_layer * S, "bytes": total * S,
            "layer_shape": [c.num_key_value_heads, S, c.head_dim],
            "allocated_tokens": s.decode.cache.max_len,
            "detail": f"K and V of {c.num_key_value_heads} heads x {c.head_dim} dims per token per layer"}

def candidates(s, stages) -> dict:
    """The draw's favourites, then the model's, with their probability before and after each processor."""
    p, chosen_id = s.settings.sampling, s.latest.chosen
    raw, final = stages[0][1], stages[-1][1]
    n = s.settings.candidates
    ids: list[int] = []
    for source in (final, stages[1][1], raw):
        ranked, _ = top_tokens_row(source, n, first=chosen_id, positive=source is not raw)
        for t in ranked.tolist():
            if len(ids) >= n:
                break
            if t not in ids:
                ids.append(t)
    idx = torch.tensor(ids, device=raw.device)
    labels = {"logits": ("model", True),
              "repetition_penalty": (f"repetition penalty {p.repetition_penalty:g}", p.repetition_penalty != 1.0),
              "temperature": (f"temperature {p.temperature:g}", p.temperature != 1.0),
              "top_k": (f"top-k {p.top_k}" if p.top_k else "top-k off", p.top_k > 0),
              "top_p": (f"top-p {p.top_p:g}", p.top_p < 1.0),
              "min_p": (f"min-p {p.min_p:g}", p.min_p > 0.0),
              "greedy": ("greedy (temperature 0): argmax", True)}
    out = []
    for name, probs in stages:
        label, active = labels[name]
        picked = probs[idx]
        out.append({"name": name, "label": label, "active": bool(active), "probs": _probs_list(picked),
                    "other": round(max(0.0, 1.0 - float(picked.sum())), 5),
                    "kept": int((probs > 0).sum())})
    return {"tokens": [{"id": t, "text": s.token_text(t)} for t in ids], "stages": out}


def logit_lens(s) -> dict:
    L = s.config.num_hidden_layers
    lens, target = s.latest.lens, s.latest.chosen
    return {"rows": ["embedding"] + [f"layer {i}" for i in range(L)],
            "top_ids": lens.top_ids.tolist(),
            "top_texts": [[s.token_text(t) for t in row] for row in lens.top_ids.tolist()],
            "top_probs": _probs_list(lens.top_probs),
            "target": {"id": target, "text": s.token_text(target), "probs": _probs_list(lens.target_p),
                       "ranks": lens.ranks.tolist()}}



def attention_layer(s, layer: int, full: bool = True) -> dict:
    """One layer's maps: last_row (H, S) always; full (H, T, T) and its mask when asked and T is
    short enough (at most full_map_max); masked cells are 0 in the probabilities and False in the
    masks. Computed from the kept q and the KV cache at each call."""
    c = s.config
    probs, visible = s.attention_probs(layer, last_only=True)
    entry = {"layer": layer, "type": c.layer_types[layer], "window": s.window(layer),
             "kv_head_of": [h // (c.num_attention_heads // c.num_key_value_heads)
                            for h in range(c.num_attention_heads)],
             "last_row": _probs_list(probs[:, 0]), "last_visible": visible[0].tolist(),
             "full": None, "full_visible": None}
    if full and len(s.ids) <= s.settings.full_map_max and s.full_maps_available():
        fprobs, fvisible = s.attention_probs(layer, last_only=False)
        entry["full"], entry["full_visible"] = _probs_list(fprobs), fvisible.tolist()
    return entry


def chosen(s, stages) -> dict:
    stop = default_stop_ids(s.model, s.tokenizer)
    token = s.latest.chosen
    return {"id": token, "text": s.token_text(token),
            "prob": round(float(stages[-1][1][token]), 6),
            "model_prob": round(float(stages[0][1][token]), 6),
            "greedy": s.settings.sampling.greedy, "stop": token in stop}
