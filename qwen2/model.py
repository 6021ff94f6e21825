"""Qwen2, top to bottom.

A decoder-only transformer:

    tokens -> embed_tokens -> N x DecoderLayer -> norm -> lm_head -> logits
    DecoderLayer:  h = h + Attention(RMSNorm(h))      grouped-query attention with RoPE
                   h = h + MLP(RMSNorm(h))            SwiGLU

Module and parameter names equal the checkpoint keys (`model.layers.0.self_attn.q_proj.weight`, ...),
so loading is a plain copy by name. Shapes: B batch, T new tokens, S key slots (T, or the cache
length), H query heads, Hkv key/value heads, hd head dim, D hidden size, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import Qwen2Config
from .errors import ConfigError, ContextLengthError
from .info import ModelInfo


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back before the weight, as the reference does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ----------------------------------------------------------------------------- rotary position embedding


def rope_frequencies(config: Qwen2Config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies theta^(-2i/hd) for each pair of head dims, and the cos/sin scale.

    YaRN (used by Qwen2 past 32k tokens) stretches the low frequencies by `factor` so that long
    positions look like trained ones, keeps the high frequencies as they are, blends the two with a
    linear ramp between the dims that rotate beta_fast and beta_slow times over the original context,
    and scales cos/sin by 0.1 ln(factor) + 1 to keep attention entropy steady.
    """
    dim, base = config.head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))  # (hd/2,)
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq, 1.0

    factor = float(scaling.get("factor") or config.max_position_embeddings / scaling["original_max_position_embeddings"])
    original = scaling["original_max_position_embeddings"]
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")

        def get_mscale(s, m=1.0):
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

        attention_factor = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else get_mscale(factor))
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def dim_for_rotations(rotations: float) -> float:  # the head dim that turns `rotations` times over `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for_rotations(beta_fast), dim_for_rotations(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: keep the original frequency (fast dims), 0: interpolate (slow dims)
    inv_freq = (inv_freq / factor) * (1 - keep) + inv_freq * keep
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos and sin of each position's angles, computed once for every position into two tables.

    A step only looks its positions up. Computed per step instead, they cost little eagerly but a
    lot in the compiled decode step: Inductor recomputes such cheap-looking values wherever they
    are used, and with the query's RoPE fused into the attention scores that is once per cached
    key (docs/benchmarks.md). gpt-fast keeps the same table (its freqs_cis).
    """

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.reset()

    def reset(self):
        """(Re)compute the tables in fp32: at build, and after the model was built on the meta device or cast."""
        inv_freq, self.attention_scaling = rope_frequencies(self.config)
        device = self.cos_table.device if hasattr(self, "cos_table") else None
        positions = torch.arange(self.config.max_position_embeddings, dtype=torch.float)
        freqs = positions[:, None] * inv_freq  # (P, hd/2), angles in fp32
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, hd)
        self.register_buffer("cos_table", (emb.cos() * self.attention_scaling).to(device), persistent=False)
        self.register_buffer("sin_table", (emb.sin() * self.attention_scaling).to(device), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos_table[positions].to(dtype), self.sin_table[positions].to(dtype)  # (B, T, hd) each


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (i, i + hd/2) pair of x by its position's angle.  x (B, H, T, hd), cos/sin (B, T, hd)."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd): the same angle for every head
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------- attention


# The mask of a fresh, unpadded prompt: query i sees keys 0..i. Passed as this marker rather than
# a tensor so SDPA can pick its fastest causal kernel.
CAUSAL = "causal"


def eager_attention(q, k, v, mask, scale):
    """softmax(q k^T * scale, masked) v, spelled out.  q (B, H, T, hd), k/v (B, Hkv, S, hd)."""
    if mask is CAUSAL:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    groups = q.shape[1] // k.shape[1]  # each KV head serves `groups` query heads
    k = k.repeat_interleave(groups, dim=1)  # (B, H, S, hd)
    v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)  # fp32 softmax, as the reference
    return probs @ v  # (B, H, T, hd)


def sdpa_attention(q, k, v, mask, scale):
    """The same math through torch's fused kernel (flash / memory-efficient / math, chosen by torch)."""
    if mask is CAUSAL:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def single_query_attention(q, k, v, mask, scale):
    """Attention for one new token as plain products and sums, which torch.compile fuses into a
    couple of small kernels (a general attention kernel is overkill for one query row); used by the
    compiled decode steps. Longer inputs (prefill) go to SDPA.  q (B, H, T, hd), k/v (B, Hkv, S, hd)."""
    B, H, T, hd = q.shape
    if T != 1:
        return sdpa_attention(q, k, v, mask, scale)
    n_kv = k.shape[1]
    q = q.view(B, n_kv, H // n_kv, 1, hd).float()  # query heads grouped under their KV head
    scores = (q * k[:, :, None].float()).sum(-1) * scale  # (B, Hkv, groups, S)
    if mask is not None and mask is not CAUSAL:  # (B or 1, 1, 1, S); CAUSAL with one query hides nothing
        scores = scores.masked_fill(~mask[:, :, None, 0], float("-inf"))
    probs = scores.softmax(dim=-1)
    out = (probs[..., None] * v[:, :, None].float()).sum(-2)  # (B, Hkv, groups, hd)
    return out.to(v.dtype).view(B, H, 1, hd)


# Every way to compute attention, by name; all give the same numbers (tests/test_parity.py).
ATTENTION_BACKENDS = {"eager": eager_attention, "sdpa": sdpa_attention, "single_query": single_query_attention}


class Attention(nn.Module):
    """Grouped-query attention: H query heads share Hkv key/value heads; q, k and v carry a bias.

    fused=True computes q|k|v as one product (one pass over the weights instead of three: faster
    at batch 1, the same math); the loader fills its slices from the checkpoint's q/k/v tensors.
    """

    def __init__(self, config: Qwen2Config, layer_idx: int, fused: bool = False):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.q_size, self.kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.layer_type = config.layer_types[layer_idx]
        self.fused = fused
        if fused:
            self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=True)
        else:
            self.q_proj = nn.Linear(config.hidden_size, self.q_size, bias=True)
            self.k_proj = nn.Linear(config.hidden_size, self.kv_size, bias=True)
            self.v_proj = nn.Linear(config.hidden_size, self.kv_size, bias=True)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.backend = "sdpa"

    def forward(self, x, cos, sin, mask, cache=None, slots=None, kv_len=None, attention=None):
        B, T, _ = x.shape
        if self.fused:
            q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # write this step's keys/values into their slots, read all slots so far
            k, v = cache.update(self.layer_idx, k, v, slots, kv_len)  # (B, Hkv, S, hd)
        attend = ATTENTION_BACKENDS[attention or self.backend]  # a caller may pick a backend for one call
        out = attend(q, k, v, mask, 1.0 / math.sqrt(self.head_dim))
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.q_size))


def visibility_mask(query_slots, key_slots, key_valid, window):
    """Which keys each query may see: (B or 1, 1, T, S) bool, True = attend.

    Causal (key slot <= query slot), not padding, and within the sliding window when the layer
    has one (a key at distance >= window is dropped). query_slots is (T,), shared by the batch, or
    (B, T) when each row sits at its own length (the serving engine's rows). A padding query is
    allowed its own slot so its softmax row is never empty; its output is garbage that nothing reads.
    """
    distance = query_slots[..., :, None] - key_slots  # (T, S) or (B, T, S)
    allowed = distance >= 0
    if window is not None:
        allowed = allowed & (distance < window)
    allowed = allowed[None, None] if allowed.dim() == 2 else allowed[:, None]  # (B or 1, 1, T, S)
    if key_valid is not None:
        allowed = allowed & (key_valid[:, None, None, :] | (distance == 0))
    return allowed


def attention_mask_for(query_slots, key_slots, key_valid, window, reads_exact_past: bool):
    """The mask one kind of layer gets: CAUSAL, None (nothing to hide) or a visibility_mask tensor.

    The two markers let SDPA take its fastest kernels in the common cases; anything else (padding,
    a window shorter than the keys, a fixed-size cache read whole) needs the explicit tensor.
    """
    T, S = query_slots.shape[0], key_slots.shape[0]
    plain = key_valid is None and (window is None or S <= window)  # no padding, no window in reach
    if plain and T == S:
        return CAUSAL  # a whole unpadded prompt from slot 0
    if plain and T == 1 and reads_exact_past:
        return None  # one new token reading exactly its past
    return visibility_mask(query_slots, key_slots, key_valid, window)


# ----------------------------------------------------------------------------- feed-forward and layers


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). fused=True computes gate|up as one product."""

    def __init__(self, config: Qwen2Config, fused: bool = False):
        super().__init__()
        self.fused = fused
        if fused:
            self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        else:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
            self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2Config, layer_idx: int, fused: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx, fused)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, fused)

    def forward(self, h, cos, sin, mask, cache=None, slots=None, kv_len=None, attention=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache, slots, kv_len, attention)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2Model(nn.Module):
    def __init__(self, config: Qwen2Config, fused: bool = False):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, fused) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids, positions, masks, cache=None, slots=None, kv_len=None, attention=None):
        h = self.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = self.rotary_emb(positions, h.dtype)  # (B, T, hd) each
        for layer in self.layers:
            h = layer(h, cos, sin, masks[layer.self_attn.layer_type], cache, slots, kv_len, attention)
        return self.norm(h)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, config: Qwen2Config, fused: bool = False):
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config, fused)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.info = ModelInfo()  # source, generation config, quantization: set by load_model

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def set_attention_backend(self, backend: str):
        if backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"attn_backend {backend!r} is unknown; expected one of {sorted(ATTENTION_BACKENDS)}")
        for layer in self.model.layers:
            layer.self_attn.backend = backend

    def layer_windows(self) -> list[tuple[str, int | None]]:
        """(layer type, its sliding window or None) for each kind of layer the model has."""
        kinds = (("full_attention", None), ("sliding_attention", self.config.sliding_window))
        return [(kind, window) for kind, window in kinds if kind in self.config.layer_types]

    def forward(self, input_ids, attention_mask=None, *, cache=None, slots=None, positions=None,
                kv_len=None, last_only=False, attention=None):
        """Logits for `input_ids` (B, T): float32 (B, T, V), or (B, 1, V) with last_only.

        Without a cache this is the plain causal forward. `attention_mask` (B, T), 1 = token and
        0 = padding, supports left-padded batches: positions count real tokens only, so a row's
        logits equal that row run alone. With a cache (see qwen2/generate.py), the new keys go to
        `slots` (T,) and attention reads slots [0, kv_len), or the whole cache when kv_len is None
        (fixed shapes, for CUDA graphs). `attention` names a backend of ATTENTION_BACKENDS for this
        call only (default: the model's, set at load).
        """
        B, T = input_ids.shape
        if positions is None and T > self.config.max_position_embeddings:
            raise ContextLengthError(f"{T} tokens do not fit the model's context "
                                     f"(max_position_embeddings={self.config.max_position_embeddings})")
        if positions is None:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) if attention_mask is not None \
                else torch.arange(T, device=input_ids.device).expand(B, T)
        if cache is None:
            slots = torch.arange(T, device=input_ids.device)
            key_slots, key_valid = slots, (attention_mask.bool() if attention_mask is not None else None)
        else:
            valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
            cache.mark_valid(slots, valid)
            S = kv_len if kv_len is not None else cache.max_len
            key_slots = torch.arange(S, device=input_ids.device)
            key_valid = cache.key_valid[:, :S] if cache.padded else None
        masks = {kind: attention_mask_for(slots, key_slots, key_valid, window, reads_exact_past=kv_len is not None)
                 for kind, window in self.layer_windows()}
        return self.run(input_ids, positions, masks, cache, slots, kv_len, last_only, attention)

    def run(self, input_ids, positions, masks, cache=None, slots=None, kv_len=None, last_only=False,
            attention=None):
        """The network on given positions and masks ({layer type: mask}, as attention_mask_for makes
        them): for callers whose rows each sit at their own length (qwen2/engine.py)."""
        h = self.model(input_ids, positions, masks, cache, slots, kv_len, attention)
        if last_only:  # (B, D): a 2-D slice, because torch runs a strided 3-D one as a batched product
            return self.lm_head(h[:, -1]).float()[:, None]
        return self.lm_head(h).float()

