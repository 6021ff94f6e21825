"""Optional baseline: the same model and prompt through transformers' greedy `generate`.

Weights: a local checkpoint directory is loaded with Qwen2ForCausalLM.from_pretrained; random
weights (or a source without safetensors) build transformers' model from the same config and
copy our state_dict into it (our parameter names equal the checkpoint keys).
Timing: after a warm-up, generate(max_new_tokens=1) gives the time to first token, and
generate(max_new_tokens=new_tokens + 1) the total; decode speed = new_tokens / (total - ttft).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import time
from pathlib import Path

import torch

from qwen2.options import dtype_name

from .device import synchronize
from .errors import BaselineError, ProfilingError

BASELINES = ("transformers",)


def check_baseline(name: str) -> None:
    if name not in BASELINES:
        raise ProfilingError(f"unknown baseline {name!r}: the only baseline is 'transformers'")
    if importlib.util.find_spec("transformers") is None:
        raise BaselineError("the transformers baseline needs the transformers package "
                            "(pip install transformers)")


def _source_dir(model) -> Path | None:
    source = str(model.info.source or "")
    if not source:
        return None
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    try:
        from qwen2.hub import looks_like_repo_id, resolve

        if looks_like_repo_id(source):
            return resolve(source)
    except Exception:  # not cached / offline: fall back to building from the config
        return None
    return None


def _hf_config(model, source: Path | None):
    import transformers

    if source is not None and (source / "config.json").is_file():
        return transformers.Qwen2Config.from_pretrained(source)
    cfg = model.config
    fields = (dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg)))
    known = set(transformers.Qwen2Config().to_dict())
    kwargs = {k: v for k, v in fields.items() if k in known and k != "rope_parameters"}
    if "rope_theta" in fields:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": fields["rope_theta"]}
    return transformers.Qwen2Config(**kwargs)


def checkpoint_state_dict(model) -> dict[str, torch.Tensor]:
    """Our weights under the checkpoint's key names.

    The runtime's names equal the checkpoint keys, except that a fused model (the default) holds
    q|k|v in `qkv_proj` (split back by the attention's q_size / kv_size) and gate|up in
    `gate_up_proj` (two equal halves).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach()
        if ".self_attn.qkv_proj." in key:
            prefix, leaf = key.split(".qkv_proj.")
            attn = model.get_submodule(prefix)
            sizes = [attn.q_size, attn.kv_size, attn.kv_size]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.split(sizes, dim=0)):
                out[f"{prefix}.{name}.{leaf}"] = part
        elif ".mlp.gate_up_proj." in key:
            prefix, leaf = key.split(".gate_up_proj.")
            gate, up = value.chunk(2, dim=0)
            out[f"{prefix}.gate_proj.{leaf}"], out[f"{prefix}.up_proj.{leaf}"] = gate, up
        else:
            out[key] = value
    return out


def load_reference(model):
    """transformers' Qwen2ForCausalLM holding the same weights as `model`, on its device/dtype."""
    import transformers

    source = _source_dir(model)
    has_weights = source is not None and any(source.glob("*.safetensors"))
    quantized = model.info.quantization
    if has_weights and not model.info.random_weights:
        ref = transformers.Qwen2ForCausalLM.from_pretrained(
            source, dtype=model.dtype, attn_implementation="sdpa")
        how = f"from_pretrained({source})" + (" (unquantized)" if quantized else "")
    else:
        if quantized:
            raise BaselineError("the transformers baseline cannot copy quantized random weights; "
                                "use a checkpoint directory or drop --quantize")
        config = _hf_config(model, source)
        config._attn_implementation = "sdpa"
        with torch.device(model.device):  # build in place: a 7B fp32 copy on the host would be 30 GB
            ref = transformers.Qwen2ForCausalLM._from_config(config, dtype=model.dtype)
        state = checkpoint_state_dict(model)
        missing, unexpected = ref.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        missing = [k for k in missing if k not in tied and "rotary" not in k]
        if missing:
            raise BaselineError(f"cannot copy our weights into transformers' Qwen2: missing "
                                f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if config.tie_word_embeddings:
            ref.tie_weights()
        how = "our state_dict copied into transformers.Qwen2ForCausalLM(config)"
    ref = ref.to(device=model.device, dtype=model.dtype).eval()
    return ref, how


def greedy_generation_config(max_new_tokens: int, pad_token_id: int = 0):
    """transformers' GenerationConfig for exactly `max_new_tokens` greedy tokens (no early stop at
    an end token), as our profiler and profiling.compare decode: the one home of that config.
    repetition_penalty is set explicitly: transformers fills the fields a config leaves at their
    defaults from the checkpoint's generation_config.json (Qwen2.5 small models: 1.1), which would
    make its "greedy" run a penalised one."""
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                            do_sample=False, num_beams=1, repetition_penalty=1.0, pad_token_id=pad_token_id,
                            eos_token_id=None, bos_token_id=None)


def greedy_generate(ref, ids, n: int) -> list[int]:
    """transformers' greedy continuation of the one-row prompt `ids`: its `n` new token ids."""
    out = ref.generate(ids, attention_mask=torch.ones_like(ids), generation_config=greedy_generation_config(n))
    return [int(t) for t in out[0, ids.shape[1]:].tolist()]


def _timed_generate(ref, ids, n: int, device) -> tuple[float, list[int]]:
    synchronize(device)
    start = time.perf_counter()
    tokens = greedy_generate(ref, ids, n)
    synchronize(device)
    return time.perf_counter() - start, tokens


def first_divergence(ours: list[int], theirs: list[int]) -> int | None:
    """Index of the first token where two greedy outputs differ (None: the same tokens)."""
    diverged = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if diverged is None and len(ours) != len(theirs):
        return min(len(ours), len(theirs))
    return diverged


def divergence_note(diverged_at: int | None, dtype: torch.dtype, quantization: str | None) -> str:
    """Why transformers' greedy tokens can differ from ours, in one line."""
    if diverged_at is None:
        return "same greedy tokens as transformers"
    if quantization:
        why = f"{quantization} weights here, unquantized weights in transformers"
    elif dtype in (torch.bfloat16, torch.float16):
        why = (f"{dtype_name(dtype)} rounding (different kernels sum in a different order) "
               f"flips near-tied argmaxes")
    else:
        why = "float32 kernels sum in a different order; a near-tie flips the argmax"
    return f"outputs diverge at token {diverged_at}: {why}"


def _time_reference(ref, ids: torch.Tensor, new_tokens: int, warmup: int, device,
                    stage) -> tuple[float, float, list[int]]:
    """(time to first token, time of new_tokens + 1 tokens, those tokens) after a warm-up."""
    with torch.inference_mode():
        for _ in range(max(warmup, 1)):
            _timed_generate(ref, ids, new_tokens + 1, device)
        stage("baseline: timing", 3)
        ttft_s, _ = _timed_generate(ref, ids, 1, device)
        total_s, tokens = _timed_generate(ref, ids, new_tokens + 1, device)
    return ttft_s, total_s, tokens


def run_transformers_baseline(model, ids: torch.Tensor, new_tokens: int, warmup: int = 1,
                              plan=None, reference_tokens: list[int] | None = None) -> dict:
    """transformers' greedy generate on the same weights and prompt: speed, tokens, and where
    (and why) its tokens part from `reference_tokens` (ours)."""
    check_baseline("transformers")
    import transformers

    def stage(desc, units=0):
        if plan is not None:
            plan.stage(desc)
            plan.advance(units)

    stage("baseline: loading transformers model")
    ref, how = load_reference(model)
    stage("baseline: warm-up", 4)
    try:
        ttft_s, total_s, tokens = _time_reference(ref, ids, new_tokens, warmup, model.device,
                                                  stage)
    finally:
        del ref
        gc.collect()
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
    stage("baseline: done", 3)
    diverged = None if reference_tokens is None else first_divergence(reference_tokens, tokens)
    return {
        "engine": "transformers",
        "version": transformers.__version__,
        "weights": how,
        "method": "greedy generate; ttft = generate(max_new_tokens=1); decode = (generate("
                  "new_tokens + 1) - ttft) / new_tokens",
        "ttft_s": ttft_s,
        "prefill_tokens_per_s": ids.shape[1] / ttft_s if ttft_s > 0 else None,
        "decode_tokens_per_s": new_tokens / max(total_s - ttft_s, 1e-12),
        "total_s": total_s,
        "generated_token_ids": tokens,
        "tokens_match": None if reference_tokens is None else diverged is None,
        "diverged_at": diverged,
        "divergence_note": (None if reference_tokens is None else
                            divergence_note(diverged, model.dtype, model.info.quantization)),
    }
