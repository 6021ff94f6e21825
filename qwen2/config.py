"""Qwen2Config: the hyper-parameters of a checkpoint, read from its config.json.

Two formats exist in the wild and both load:
- the release format (Qwen2 / Qwen2.5 on the hub): `rope_theta`, `rope_scaling`,
  `use_sliding_window`, `sliding_window`, `max_window_layers`, `torch_dtype`;
- the format transformers 5 writes: `rope_parameters`, `layer_types`, `dtype`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import ConfigError


def read_json_object(path: Path, error: type[Exception]) -> dict:
    """The JSON object in `path`; `error` naming the file when it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} is unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@dataclass
class Qwen2Config:
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None  # {"rope_type": "yarn", "factor", "original_max_position_embeddings", ...}
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    sliding_window: int | None = None  # None unless the config turns the window on
    layer_types: list[str] = field(default_factory=list)  # "full_attention" | "sliding_attention"
    torch_dtype: str = "bfloat16"
    hidden_act: str = "silu"
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if not self.layer_types:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries; expected num_hidden_layers="
                f"{self.num_hidden_layers}"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; Qwen2 uses 'silu'")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "Qwen2Config":
        model_type = raw.get("model_type")
        if model_type != "qwen2":
            raise ConfigError(f"{source}: model_type is {model_type!r}; this runtime supports 'qwen2'")
        try:
            n_layers = int(raw["num_hidden_layers"])
            cfg = dict(
                vocab_size=int(raw["vocab_size"]),
                hidden_size=int(raw["hidden_size"]),
                intermediate_size=int(raw["intermediate_size"]),
                num_hidden_layers=n_layers,
                num_attention_heads=int(raw["num_attention_heads"]),
            )
        except KeyError as exc:
            raise ConfigError(f"{source}: missing required key {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: a size is not an integer ({exc})") from None
        cfg["num_key_value_heads"] = int(raw.get("num_key_value_heads") or cfg["num_attention_heads"])
        for key in ("max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "hidden_act",
                    "eos_token_id"):
            if raw.get(key) is not None:
                cfg[key] = raw[key]

        # RoPE: transformers 5 nests theta and scaling in `rope_parameters`.
        rope = dict(raw.get("rope_parameters") or {})
        scaling = dict(raw.get("rope_scaling") or {})
        cfg["rope_theta"] = float(rope.get("rope_theta") or raw.get("rope_theta") or 10000.0)
        rope_type = rope.get("rope_type") or rope.get("type") or scaling.get("rope_type") or scaling.get("type")
        if rope_type in (None, "default"):
            cfg["rope_scaling"] = None
        elif rope_type == "yarn":
            params = {**scaling, **rope, "rope_type": "yarn"}
            params.pop("type", None)
            params.pop("rope_theta", None)
            params.setdefault("original_max_position_embeddings",
                              cfg.get("max_position_embeddings", 32768))
            cfg["rope_scaling"] = params
        else:
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (default or yarn)")

        # Sliding window: layers i >= max_window_layers use it when use_sliding_window is true.
        # Absent keys take transformers' defaults (sliding_window 4096, max_window_layers 28);
        # an explicit null window means no window.
        window = raw.get("sliding_window", 4096)
        if raw.get("layer_types"):
            cfg["layer_types"] = list(raw["layer_types"])
        elif raw.get("use_sliding_window") and window:
            first = raw.get("max_window_layers")
            first = 28 if first is None else int(first)
            cfg["layer_types"] = ["sliding_attention" if i >= first else "full_attention"
                                  for i in range(n_layers)]
        if "sliding_attention" in cfg.get("layer_types", []):  # else no layer uses a window: None
            cfg["sliding_window"] = int(window or 4096)
        bad = set(cfg.get("layer_types", [])) - {"full_attention", "sliding_attention"}
        if bad:
            raise ConfigError(f"{source}: unknown layer_types {sorted(bad)}")
        cfg["torch_dtype"] = str(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16").removeprefix("torch.")
        return cls(**cfg)

    @classmethod
    def from_file(cls, path: str | Path) -> "Qwen2Config":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path} not found: a Qwen2 checkpoint needs a config.json")
        return cls.from_dict(read_json_object(path, ConfigError), source=str(path))

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["model_type"] = "qwen2"
        return out


def parameter_counts(config: Qwen2Config) -> dict[str, int]:
    """The network's parameters, stage by stage, from its shape: what the checkpoint holds, however
    the weights are stored here (a quantized model's scales are not parameters of the network)."""
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


def _shape(hidden, layers, heads, kv_heads, inter, vocab, tied, max_pos, eps=1e-6):
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, intermediate_size=inter, vocab_size=vocab,
                tie_word_embeddings=tied, max_position_embeddings=max_pos, rope_theta=1_000_000.0,
                rms_norm_eps=eps, torch_dtype="bfloat16")


# Official shapes, from the config.json of each base release. Base and -Instruct share the tensor
# shapes but not two scalars: every -Instruct repo has max_position_embeddings=32768 and
# rms_norm_eps=1e-6, while most base repos declare 131072 positions and the largest ones 1e-5.
# Qwen2.5-0.5B/1.5B/3B are tied; 7B and up are untied; 0.5B-3B have 2 KV heads.
_OFFICIAL = {
    "Qwen/Qwen2-0.5B": _shape(896, 24, 14, 2, 4864, 151936, True, 131072),
    "Qwen/Qwen2-1.5B": _shape(1536, 28, 12, 2, 8960, 151936, True, 131072),
    "Qwen/Qwen2-7B": _shape(3584, 28, 28, 4, 18944, 152064, False, 131072),
    "Qwen/Qwen2-72B": _shape(8192, 80, 64, 8, 29568, 152064, False, 131072, eps=1e-5),
    "Qwen/Qwen2.5-0.5B": _shape(896, 24, 14, 2, 4864, 151936, True, 32768),
    "Qwen/Qwen2.5-1.5B": _shape(1536, 28, 12, 2, 8960, 151936, True, 131072),
    "Qwen/Qwen2.5-3B": _shape(2048, 36, 16, 2, 11008, 151936, True, 32768),
    "Qwen/Qwen2.5-7B": _shape(3584, 28, 28, 4, 18944, 152064, False, 131072),
    "Qwen/Qwen2.5-14B": _shape(5120, 48, 40, 8, 13824, 152064, False, 131072, eps=1e-5),
    "Qwen/Qwen2.5-32B": _shape(5120, 64, 40, 8, 27648, 152064, False, 131072, eps=1e-5),
    "Qwen/Qwen2.5-72B": _shape(8192, 80, 64, 8, 29568, 152064, False, 131072, eps=1e-5),
}
_INSTRUCT = dict(max_position_embeddings=32768, rms_norm_eps=1e-6)


def official_config(repo_id: str) -> Qwen2Config:
    """The official shape of a known Qwen2 / Qwen2.5 repo id (base or -Instruct)."""
    repo_id = str(repo_id)
    base = repo_id.removesuffix("-Instruct")
    if base not in _OFFICIAL:
        known = ", ".join(sorted(_OFFICIAL))
        raise ConfigError(f"no built-in shape for {repo_id!r}; known: {known} (and their -Instruct)")
    shape = dict(_OFFICIAL[base])
    if repo_id != base:
        shape.update(_INSTRUCT)
    return Qwen2Config(**shape)
