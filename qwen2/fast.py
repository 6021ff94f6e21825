"""Speed tricks kept out of model.py, each leaving the math unchanged.

- `fuse_projections`: one q|k|v product and one gate|up product per layer instead of five. At
  batch 1 every product is a separate pass over its weights plus a dispatch; fewer, larger ones
  cut the per-token overhead. Works on float and int8 (qwen2/quant.py) layers alike.
- `CudaGraphDecoder`: a decode step captured once as a CUDA graph and replayed per token, so a
  token costs one launch instead of hundreds. It needs fixed shapes and fixed addresses, so the
  KV caches it decodes into come from its own pool (one per batch size and length bucket) and
  attention reads the whole cache under a mask. Optionally the step is compiled first
  (torch.compile) to fuse the small elementwise kernels the graph would replay one by one; the
  compiled step is specialised to the cache length, so each new length bucket compiles once.
"""

from __future__ import annotations

import types
import weakref

import torch
from torch import nn

from .cache import KVCache
from .model import ATTENTION_BACKENDS, CAUSAL, sdpa_attention
from .quant import Int8Linear


def _concat(linears: list[nn.Module]) -> nn.Module:
    """One module computing torch.cat([m(x) for m in linears], -1) in a single product."""
    biases = [m.bias for m in linears]
    bias = None if any(b is None for b in biases) else nn.Parameter(torch.cat(biases), requires_grad=False)
    if all(isinstance(m, Int8Linear) for m in linears):
        weight = nn.Parameter(torch.cat([m.weight for m in linears]), requires_grad=False)
        scales = nn.Parameter(torch.cat([m.scales for m in linears]), requires_grad=False)
        return Int8Linear(weight, scales, bias, linears[0].fused_kernel)
    if not all(type(m) is nn.Linear for m in linears):
        raise TypeError(f"cannot fuse {[type(m).__name__ for m in linears]}")
    w = torch.cat([m.weight for m in linears])
    fused = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta", dtype=w.dtype)
    fused.weight = nn.Parameter(w, requires_grad=False)
    fused.bias = bias
    return fused


def _project_qkv_fused(self, x):
    return self.qkv_proj(x).split(self.qkv_sizes, dim=-1)


def _project_gate_up_fused(self, x):
    return self.gate_up_proj(x).chunk(2, dim=-1)


@torch.no_grad()
def fuse_projections(model):
    """Fuse q/k/v and gate/up of every layer, in place (the unfused weights are freed)."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not hasattr(attn, "qkv_proj"):
            attn.qkv_sizes = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
            attn.qkv_proj = _concat([attn.q_proj, attn.k_proj, attn.v_proj])
            del attn.q_proj, attn.k_proj, attn.v_proj
            attn.project_qkv = types.MethodType(_project_qkv_fused, attn)
        if not hasattr(mlp, "gate_up_proj"):
            mlp.gate_up_proj = _concat([mlp.gate_proj, mlp.up_proj])
            del mlp.gate_proj, mlp.up_proj
            mlp.project_gate_up = types.MethodType(_project_gate_up_fused, mlp)
    return model


def single_query_attention(q, k, v, mask, scale):
    """Attention for one new token as plain products and sums, which torch.compile fuses into a
    couple of small kernels; a general attention kernel is overkill for a single query row.
    Longer inputs (prefill) go to SDPA.  q (B, H, T, hd), k/v (B, Hkv, S, hd)."""
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


ATTENTION_BACKENDS["single_query"] = single_query_attention


def _bucket(n: int, limit: int) -> int:
    """Round a cache length up to a power of two (>= 256), so few graphs serve all lengths."""
    size = 256
    while size < n:
        size *= 2
    return min(size, limit)


def _cudnn_attention_allowed():
    """cuDNN's attention is the quickest for one query over a masked cache, but it builds a plan per
    shape, which is why eager calls keep it off (qwen2/loading.py). A graph has one shape: the plan
    is built once, while capturing, and every replay reuses it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch without priorities: allow cuDNN, torch picks
        return sdpa_kernel(order)


class CudaGraphDecoder:
    """Replays a captured decode step; plugs into DecodeSession through `model.decode_fn`."""

    def __init__(self, model, compile: bool = False):
        self.model = model
        self.pool = {}  # (batch, length) -> {"cache", "busy", "graph", buffers...}
        self.mempool = torch.cuda.graph_pool_handle()
        self.step_fn = model.forward
        if compile:
            model.set_attention_backend("single_query")
            self.step_fn = torch.compile(model.forward, fullgraph=True, dynamic=False)

    def acquire_cache(self, session, batch_size: int, max_len: int) -> KVCache:
        key = (batch_size, _bucket(max_len, self.model.config.max_position_embeddings))
        entry = self.pool.get(key)
        if entry is None:
            cache = KVCache(self.model.config, batch_size, key[1], self.model.device, self.model.dtype)
            entry = self.pool[key] = {"cache": cache, "busy": False, "graph": None}
        if entry["busy"]:  # another live session holds it: this one runs eagerly on its own cache
            return None
        entry["busy"] = True
        weakref.finalize(session, entry.__setitem__, "busy", False)
        session.graph_entry = entry
        cache = entry["cache"]
        cache.key_valid.zero_()
        cache.length = 0
        cache.padded = False  # set by the prefill; a graph captured for the other case is re-captured
        return cache

    def _capture(self, entry, token_ids, slot, positions):
        cache = entry["cache"]
        static = {"ids": token_ids[:, None].clone(), "slot": torch.tensor([slot], device=token_ids.device),
                  "pos": positions.clone()}

        def run():
            return self.step_fn(static["ids"], cache=cache, slots=static["slot"], positions=static["pos"],
                                kv_len=None, last_only=True)[:, -1]

        # Warm up on a side stream (allocator, cuBLAS handles, compilation), then record. Each run
        # writes this step's k/v into `slot`: the replay right after writes the same values again.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with _cudnn_attention_allowed(), torch.cuda.stream(stream):
            for _ in range(3):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with _cudnn_attention_allowed(), torch.cuda.graph(graph, pool=self.mempool):
            static["logits"] = run()
        entry.update(graph=graph, graph_padded=cache.padded, **static)

    def __call__(self, session, token_ids, slot):
        entry = session.graph_entry
        positions = session.next_position[:, None]
        if entry["graph"] is None or entry["graph_padded"] != session.cache.padded:
            # The step's mask reads key_valid only when the batch has padding: one graph per case.
            self._capture(entry, token_ids, slot, positions)
        entry["ids"].copy_(token_ids[:, None])
        entry["slot"].fill_(slot)
        entry["pos"].copy_(positions)
        entry["graph"].replay()
        return entry["logits"].clone()


def enable_cuda_graphs(model, compile: bool = False):
    """Make DecodeSession.step replay CUDA graphs on this (CUDA) model."""
    if model.device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA model; this one is on {model.device}")
    model.decode_fn = CudaGraphDecoder(model, compile=compile)
    return model


def warm_up(model, prompt_len: int = 16, new_tokens: int = 4):
    """Run one short generation so first-use costs (capture, compilation, kernels) are paid now."""
    from .generate import generate

    ids = torch.zeros(1, prompt_len, dtype=torch.long)
    for _ in generate(model, ids, max_new_tokens=new_tokens, stop_token_ids=[]):
        pass
