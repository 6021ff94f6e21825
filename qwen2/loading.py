"""load_model: a checkpoint directory or hub id in, a ready Qwen2ForCausalLM out.

The network is built on the meta device (no memory), materialised once on the target device in
the target dtype, and then filled tensor by tensor from the safetensors files, so at no point are
two full copies of the weights held. Pickled `*.bin` checkpoints are refused, never unpickled.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from . import cpu_kernels, hub
from .bf16_dot import dot_products, wants_bf16_dot
from .calibration import checkpoint_importance
from .config import Qwen2Config, official_config
from .errors import CheckpointError, ConfigError, ModelNotFoundError
from .huge_pages import place_in_huge_pages
from .model import ATTENTION_BACKENDS, Qwen2ForCausalLM
from .options import check_quantize, default_dtype, parse_dtype, quantized_wants_bfloat16, resolve_device
from .quant import quantize_model
from .upcast import float32_products, wants_upcast


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is unreadable or has no weight_map: {exc}") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        return shards
    pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt*")]
    if pickled:
        raise CheckpointError(
            f"{directory} holds only pickled weights ({', '.join(sorted(pickled))}); safetensors are "
            "required (pickle can run arbitrary code). Convert with safetensors' convert script."
        )
    raise CheckpointError(f"{directory} has no model.safetensors (nor sharded *.safetensors)")


def _read_generation_config(directory: Path | None) -> dict:
    path = directory / "generation_config.json" if directory else None
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # optional file: a broken one only loses the default sampling settings


def checkpoint_targets(model: Qwen2ForCausalLM) -> dict[str, torch.Tensor]:
    """Each checkpoint key -> the tensor it fills: a parameter, or a slice of a fused one.

    Names equal the checkpoint keys, except that a fused model's `qkv_proj` holds the checkpoint's
    q/k/v tensors one after the other (rows of the weight, entries of the bias) and `gate_up_proj`
    holds gate then up.
    """
    targets = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        module_name, _, kind = name.rpartition(".")
        module = model.get_submodule(module_name)
        parent, _, leaf = module_name.rpartition(".")
        if leaf == "qkv_proj":
            parts = {"q_proj": module.out_features - 2 * model.config.num_key_value_heads * model.config.head_dim}
            parts["k_proj"] = parts["v_proj"] = (module.out_features - parts["q_proj"]) // 2
        elif leaf == "gate_up_proj":
            parts = dict.fromkeys(("gate_proj", "up_proj"), module.out_features // 2)
        else:
            targets[name] = param
            continue
        start = 0
        for part, size in parts.items():
            targets[f"{parent}.{part}.{kind}"] = param.narrow(0, start, size)
            start += size
    return targets


def _copy_weights(model: Qwen2ForCausalLM, files: list[Path]):
    from safetensors import SafetensorError, safe_open

    targets = checkpoint_targets(model)
    loaded = set()
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key not in targets:
                        continue  # e.g. a stored rotary buffer or a tied lm_head we do not need
                    target = targets[key]
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != tuple(target.shape):
                        raise CheckpointError(
                            f"{file.name}: tensor {key} has shape {shape}; expected {tuple(target.shape)}")
                    with torch.no_grad():
                        target.copy_(f.get_tensor(key))  # converts dtype, moves to device
                    loaded.add(key)
        except SafetensorError as exc:
            raise CheckpointError(f"{file} is not a valid safetensors file: {exc}") from None
        except OSError as exc:
            raise CheckpointError(f"{file} is unreadable: {exc}") from None
    tied = "lm_head.weight" if model.config.tie_word_embeddings else None
    missing = [k for k in targets if k not in loaded and k != tied]
    if model.config.tie_word_embeddings and "lm_head.weight" in loaded and "model.embed_tokens.weight" not in loaded:
        missing.remove("model.embed_tokens.weight")  # tied: either name fills the shared tensor
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"tensor {missing[0]} is missing from the checkpoint "
                              f"{files[0].parent}: missing {', '.join(missing[:5])}{more}")


def init_random_weights(model: Qwen2ForCausalLM, seed: int = 0):
    """Normal(0, 0.02) weights and biases, unit norms: the reference's initialisation, seeded."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)


def load_model(source, device="cpu", dtype=None, random_weights: bool = False,
               attn_backend: str = "sdpa", quantize: str | None = None, fuse: bool = True) -> Qwen2ForCausalLM:
    """Load a Qwen2 checkpoint (a local directory or a hub repo id) for inference.

    random_weights=True builds the shape without any weights file: from the directory's config.json
    when `source` is a directory, else from the built-in table of official Qwen2/Qwen2.5 shapes.
    dtype=None picks the checkpoint's dtype on GPU; on CPU fp32 with quantize (bf16 where only torch's
    quantized kernels are there), else bf16 where the CPU computes in bf16, else fp32
    (options.default_dtype). quantize="int8" / "int4" stores the linear weights quantized
    (qwen2/quant.py); int4 in our kernel's blocks weighs each input's rounding error by its size on
    a calibration chat read by the checkpoint's tokenizer (qwen2/calibration.py). fuse=True builds
    one q|k|v and one gate|up product per layer. Large weights go into 2 MB pages
    (qwen2/huge_pages.py). None of these changes the math. Where the model came from is in
    `model.info` (qwen2/info.py); how its decode steps are launched is chosen apart from it
    (qwen2/fast.py, qwen2/engine.py).
    """
    dev = resolve_device(device)
    quantize = check_quantize(quantize)
    dtype = parse_dtype(dtype)  # the cheap checks come before any file is read or downloaded
    if attn_backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"attn_backend {attn_backend!r} is unknown; expected one of {sorted(ATTENTION_BACKENDS)}")
    directory, config, files = _locate(source, random_weights)
    dtype = dtype or default_dtype(dev, config.torch_dtype, quantize)
    if dtype == torch.float32 and quantized_wants_bfloat16(dev, quantize):
        warnings.warn(f"quantize={quantize!r} with float32 activations: on CPU the quantized kernels are "
                      "much slower in float32 than in bfloat16 (dtype=None picks bfloat16)", stacklevel=2)

    model = _materialise(config, dev, dtype, fuse)
    if random_weights:
        init_random_weights(model)
    else:
        _copy_weights(model, files)
    model.set_attention_backend(attn_backend)
    model.eval().requires_grad_(False)
    model.info.source = str(source)
    model.info.random_weights = random_weights
    model.info.generation_config = _read_generation_config(directory)
    if quantize:
        calibrated = quantize == "int4" and not random_weights and cpu_kernels.blocks_available(model.device)
        quantize_model(model, quantize, importance=checkpoint_importance(model, directory) if calibrated else None)
    elif wants_upcast(model):
        float32_products(model)  # bf16 weights, float32 products (qwen2/upcast.py)
    elif wants_bf16_dot(model):
        dot_products(model)  # bf16 decode through our dot products (qwen2/bf16_dot.py)
    model.info.huge_page_bytes = place_in_huge_pages(model)  # decode streams them (qwen2/huge_pages.py)
    return model


def _locate(source, random_weights: bool) -> tuple[Path | None, Qwen2Config, list[Path]]:
    """The checkpoint directory (None for an official shape with random weights), its config and
    its weight files (none with random weights)."""
    if not random_weights:
        directory = hub.resolve(source)
        config = Qwen2Config.from_file(directory / "config.json")
        return directory, config, _weight_files(directory)
    path = Path(str(source)).expanduser()
    if path.is_dir():
        return path, Qwen2Config.from_file(path / "config.json"), []
    if hub.looks_like_repo_id(str(source)):
        return None, official_config(str(source)), []
    raise ModelNotFoundError(f"model directory not found: {path}")


def _materialise(config: Qwen2Config, device: torch.device, dtype: torch.dtype, fused: bool) -> Qwen2ForCausalLM:
    """The network allocated once on `device` in `dtype`, uninitialised (built on the meta device)."""
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config, fused=fused)
    model.to(dtype)
    model.to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty re-creates parameters: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.reset()
    return model
