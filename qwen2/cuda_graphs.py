"""CUDA-graph decode: a decode step captured once and replayed per token, so a token costs one
launch instead of hundreds. Optionally the step is compiled first (torch.compile) to fuse the small
elementwise kernels the graph would replay one by one; the compiled step is specialised to the cache
length, so each new length bucket compiles once. Caches and shapes come from the pool in
qwen2/fast_path.py.
"""

from __future__ import annotations

import torch

from .fast_path import CacheLease, FastPath


def cudnn_attention_allowed():
    """cuDNN's attention is the quickest for one query over a masked cache, but it builds a plan per
    shape, which is why eager calls leave it out (qwen2/generate.py). A graph has one shape: the plan
    is built once, while capturing, and every replay reuses it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch without priorities: allow cuDNN, torch picks
        return sdpa_kernel(order)


class CudaGraphPath(FastPath):
    def __init__(self, model, compile: bool = False):
        if model.device.type != "cuda":
            from .errors import ConfigError

            raise ConfigError(f"CUDA graphs need a CUDA model; this one is on {model.device}")
        super().__init__(model)
        self.name = "cuda-graphs+compile" if compile else "cuda-graphs"
        self.mempool = torch.cuda.graph_pool_handle()
        self.step_fn = model.forward
        self.attention = None
        if compile:  # one query row as products and sums that Inductor fuses, for the step's calls only
            self.attention = "single_query"
            self.step_fn = torch.compile(model.forward, fullgraph=True, dynamic=False)

    def _capture(self, lease: CacheLease, token_ids, slot, positions):
        cache = lease.cache
        static = {"ids": token_ids[:, None].clone(), "slot": torch.tensor([slot], device=token_ids.device),
                  "pos": positions.clone()}

        def run():
            return self.step_fn(static["ids"], cache=cache, slots=static["slot"], positions=static["pos"],
                                kv_len=None, last_only=True, attention=self.attention)[:, -1]

        # Warm up on a side stream (allocator, cuBLAS handles, compilation), then record. Each run
        # writes this step's k/v into `slot`: the replay right after writes the same values again.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with cudnn_attention_allowed(), torch.cuda.stream(stream):
            for _ in range(3):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with cudnn_attention_allowed(), torch.cuda.graph(graph, pool=self.mempool):
            static["logits"] = run()
        lease.state.update(graph=graph, graph_padded=cache.padded, **static)

    def step(self, lease, token_ids, slot, positions):
        state = lease.state
        if state.get("graph") is None or state["graph_padded"] != lease.cache.padded:
            # The step's mask reads key_valid only when the batch has padding: one graph per case.
            self._capture(lease, token_ids, slot, positions)
        state["ids"].copy_(token_ids[:, None])
        state["slot"].fill_(slot)
        state["pos"].copy_(positions)
        state["graph"].replay()
        return state["logits"].clone()
