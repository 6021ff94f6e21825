"""load_model: a checkpoint directory or hub id in, a ready Qwen2ForCausalLM out.

The network is built on the meta device (no memory), materialised once on the target device in
the target dtype, and then filled tensor by tensor from the safetensors files, so at no point are
two full copies of the weights held. Pickled `*.bin` checkpoints are refused, never unpickled.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import torch

from . import hub
from .config import Qwen2Config, official_config, parse_dtype
from .errors import CheckpointError, ConfigError, ModelNotFoundError
from .model import ATTENTION_BACKENDS, Qwen2ForCausalLM
from .quant import SCHEMES, quantize_model


def resolve_device(device) -> torch.device:
    """A torch.device that exists on this machine, or a ConfigError saying what is available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a device name (cpu, cuda, cuda:N, mps): {exc}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {device!r}: CUDA is not available on this machine (use cpu)")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"device {device!r}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"device {device!r}: MPS is not available (Apple silicon only)")
    elif dev.type != "cpu":
        raise ConfigError(f"device {device!r} is not supported; expected cpu, cuda, cuda:N or mps")
    return dev


@functools.lru_cache(maxsize=1)
def cpu_prefers_bfloat16() -> bool:
    """Measure: is a bf16 matrix-vector product faster than fp32 on this CPU?

    bf16 is fast only with AVX-512 BF16 or AMX; elsewhere torch converts on the fly and fp32 wins.
    Decode is matrix-vector work, so that is what we time (a few ms).
    """
    def best_time(dtype):
        w = torch.randn(2048, 2048).to(dtype)
        x = torch.randn(1, 2048).to(dtype)
        for _ in range(3):
            torch.nn.functional.linear(x, w)
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, w)
            times.append(time.perf_counter() - t0)
        return min(times)

    return best_time(torch.bfloat16) < best_time(torch.float32)


def default_dtype(device: torch.device, config: Qwen2Config) -> torch.dtype:
    if device.type == "cpu":
        return torch.bfloat16 if cpu_prefers_bfloat16() else torch.float32
    return parse_dtype(config.torch_dtype) or torch.bfloat16


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


def _copy_weights(model: Qwen2ForCausalLM, files: list[Path]):
    from safetensors import SafetensorError, safe_open

    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = set()
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key not in params:
                        continue  # e.g. a stored rotary buffer or a tied lm_head we do not need
                    target = params[key]
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
    missing = [k for k in params if k not in loaded and k != tied]
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
               attn_backend: str = "sdpa", quantize: str | None = None, fuse: bool = True,
               cuda_graphs: bool = False, compile: bool = False) -> Qwen2ForCausalLM:
    """Load a Qwen2 checkpoint (a local directory or a hub repo id) for inference.

    random_weights=True builds the shape without any weights file: from the directory's config.json
    when `source` is a directory, else from the built-in table of official Qwen2/Qwen2.5 shapes.
    dtype=None picks the checkpoint's dtype on GPU and the faster of bf16/fp32 on CPU.
    quantize="int8" stores the linear weights as int8 with per-channel scales (qwen2/quant.py).
    fuse=True merges q/k/v and gate/up into one product each; cuda_graphs=True replays decode
    steps as CUDA graphs (CUDA only; qwen2/fast.py); compile=True also fuses the step's kernels
    with torch.compile before capturing it (slow to start, fast to run). None changes the math.
    """
    dev = resolve_device(device)
    if quantize is not None and quantize not in SCHEMES:
        raise ConfigError(f"quantize={quantize!r} is not supported; expected one of {SCHEMES} or None")
    cuda_graphs = cuda_graphs or compile
    if cuda_graphs and dev.type != "cuda":
        raise ConfigError(f"cuda_graphs/compile need a CUDA device; got {dev}")
    # Check the cheap arguments before any file is read or downloaded.
    dtype = parse_dtype(dtype)
    if attn_backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"attn_backend {attn_backend!r} is unknown; expected one of {sorted(ATTENTION_BACKENDS)}")
    directory = None
    if random_weights:
        path = Path(str(source)).expanduser()
        if path.is_dir():
            directory = path
            config = Qwen2Config.from_file(path / "config.json")
        elif hub.looks_like_repo_id(str(source)):
            config = official_config(str(source))
        else:
            raise ModelNotFoundError(f"model directory not found: {path}")
    else:
        directory = hub.resolve(source)
        config = Qwen2Config.from_file(directory / "config.json")
        files = _weight_files(directory)
    dtype = dtype or default_dtype(dev, config)

    if dev.type == "cuda":
        # cuDNN's attention builds a new plan for every sequence length it meets (tens of ms each):
        # a chat meets a new length at every prompt and decode step. The flash / memory-efficient
        # kernels need no plan.
        torch.backends.cuda.enable_cudnn_sdp(False)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model.to(dtype)
    model.to_empty(device=dev)  # allocates once, uninitialised, in the target dtype
    if config.tie_word_embeddings:  # to_empty re-creates parameters: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.reset()
    if random_weights:
        init_random_weights(model)
    else:
        _copy_weights(model, files)
    model.set_attention_backend(attn_backend)
    model.eval().requires_grad_(False)
    model.source = str(source)
    model.random_weights = random_weights
    model.generation_config = _read_generation_config(directory)
    if quantize:
        quantize_model(model, quantize)
    if fuse or cuda_graphs:
        from .fast import enable_cuda_graphs, fuse_projections

        if fuse:
            fuse_projections(model)
        if cuda_graphs:
            enable_cuda_graphs(model, compile=compile)
    return model
