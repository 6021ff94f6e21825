"""The forward hooks that watch one forward from outside the model's math.

Hooks on the existing modules (embedding, rotary embedding, each layer's norms, q/k/v or the fused
qkv_proj, o_proj, gate/up or gate_up_proj, down_proj, the final norm and the LM head) record the
shape every stage produced, the residual stream at the last position (for the logit lens) and q
(for the attention maps). They fire only on plain module calls: the session runs an eager
qwen2.DecodeSession (no fast decode path).
"""

from __future__ import annotations

import torch


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
