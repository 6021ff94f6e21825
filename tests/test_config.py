"""qwen2.config: the release config.json format and the transformers-5 format give the same Qwen2Config.

The transformers-5 files are written by the oracle itself (AutoConfig.from_pretrained(release file)
then save_pretrained); the release files are written by hand, as found on the hub.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import qwen2
from qwen2.config import Qwen2Config
from qwen2.errors import ConfigError
from tests.helpers import make_checkpoint

transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")

# The shape of tests.helpers.TINY, in the release format (as Qwen/Qwen2.5-*/config.json spells it).
RELEASE = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 160,
    "max_position_embeddings": 256,
    "max_window_layers": 1,
    "model_type": "qwen2",
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 64, "type": "yarn"},
    "rope_theta": 10000.0,
    "sliding_window": 6,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_sliding_window": True,
    "vocab_size": 512,
}


def write_config(directory: Path, raw: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(raw, indent=2))
    return directory / "config.json"


def oracle_resave(release_dir: Path, out_dir: Path) -> dict:
    """Let transformers read a release-format config.json and write its own format; return that."""
    config = transformers.AutoConfig.from_pretrained(str(release_dir))
    config.save_pretrained(str(out_dir))
    return json.loads((out_dir / "config.json").read_text())


@pytest.mark.parametrize("overrides", [
    {},  # yarn + sliding window on layers >= 1
    {"use_sliding_window": False},  # window declared but off
    {"rope_scaling": None},  # plain RoPE
    {"max_window_layers": 0, "rope_scaling": None},  # every layer sliding
    {"max_window_layers": 3},  # window on, but no layer reaches it
    {"tie_word_embeddings": False, "num_key_value_heads": 4, "torch_dtype": "bfloat16"},
], ids=["yarn-sliding", "window-off", "plain-rope", "all-sliding", "none-sliding", "untied-mha-bf16"])
def test_release_and_transformers5_formats_give_the_same_config(tmp_path, overrides):
    release = dict(RELEASE, **overrides)
    release_file = write_config(tmp_path / "release", release)
    t5 = oracle_resave(tmp_path / "release", tmp_path / "t5")

    # What transformers 5.x writes: rope_parameters / layer_types / dtype, not the release keys.
    assert "rope_parameters" in t5 and "rope_scaling" not in t5 and "rope_theta" not in t5
    assert "layer_types" in t5 and "dtype" in t5 and "torch_dtype" not in t5
    assert t5["rope_parameters"]["rope_theta"] == 10000.0

    ours_release = Qwen2Config.from_file(release_file)
    ours_t5 = Qwen2Config.from_file(tmp_path / "t5" / "config.json")
    assert ours_release == ours_t5
    # and both agree with the oracle's reading of the same file
    oracle = transformers.AutoConfig.from_pretrained(str(tmp_path / "release"))
    assert ours_release.layer_types == list(oracle.layer_types)
    expected_window = oracle.sliding_window if "sliding_attention" in oracle.layer_types else None
    assert ours_release.sliding_window == expected_window
    assert ours_release.rope_theta == oracle.rope_parameters["rope_theta"]
    assert ours_release.torch_dtype == release["torch_dtype"]
    assert ours_release.tie_word_embeddings == release["tie_word_embeddings"]
    if release["rope_scaling"]:
        assert ours_release.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    else:
        assert ours_release.rope_scaling is None


def test_release_format_values_are_read(tmp_path):
    cfg = Qwen2Config.from_file(write_config(tmp_path, RELEASE))
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.max_position_embeddings) == (
        512, 64, 160, 3, 4, 2, 256)
    assert cfg.head_dim == 16
    assert cfg.rope_theta == 10000.0 and cfg.rms_norm_eps == 1e-6
    assert cfg.sliding_window == 6
    assert cfg.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert cfg.eos_token_id == 2


@pytest.mark.parametrize("n_layers", [1, 4, 30])
@pytest.mark.parametrize("max_window_layers", [0, 1, 2, 4, 28, None])
@pytest.mark.parametrize("use_sliding_window", [True, False])
def test_layer_types_follow_max_window_layers(tmp_path, n_layers, max_window_layers, use_sliding_window):
    raw = dict(RELEASE, num_hidden_layers=n_layers, use_sliding_window=use_sliding_window, rope_scaling=None)
    if max_window_layers is None:
        del raw["max_window_layers"]  # transformers' default applies (28)
    else:
        raw["max_window_layers"] = max_window_layers
    cfg = Qwen2Config.from_file(write_config(tmp_path, raw))
    first = 28 if max_window_layers is None else max_window_layers
    expected = ["sliding_attention" if use_sliding_window and i >= first else "full_attention"
                for i in range(n_layers)]
    assert cfg.layer_types == expected
    assert cfg.sliding_window == (6 if "sliding_attention" in expected else None)
    # the oracle reads the same file the same way
    oracle = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert list(oracle.layer_types) == expected


def test_sliding_window_absent_means_transformers_default(tmp_path):
    raw = dict(RELEASE, rope_scaling=None)
    del raw["sliding_window"]
    cfg = Qwen2Config.from_file(write_config(tmp_path, raw))
    oracle = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert cfg.layer_types == list(oracle.layer_types) == ["full_attention", "sliding_attention", "sliding_attention"]
    assert cfg.sliding_window == oracle.sliding_window == 4096


def test_sliding_window_null_means_no_window(tmp_path):
    raw = dict(RELEASE, sliding_window=None, rope_scaling=None)
    cfg = Qwen2Config.from_file(write_config(tmp_path, raw))
    assert cfg.layer_types == ["full_attention"] * 3
    assert cfg.sliding_window is None


def test_transformers5_layer_types_are_taken_as_written(tmp_path):
    """An explicit layer_types list wins, even in a pattern max_window_layers cannot express."""
    raw = {k: v for k, v in RELEASE.items()
           if k not in ("use_sliding_window", "max_window_layers", "rope_scaling", "rope_theta", "torch_dtype")}
    raw.update(layer_types=["sliding_attention", "full_attention", "sliding_attention"],
               rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, dtype="bfloat16")
    cfg = Qwen2Config.from_file(write_config(tmp_path, raw))
    assert cfg.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert cfg.sliding_window == 6
    assert cfg.rope_theta == 5000.0 and cfg.rope_scaling is None
    assert cfg.torch_dtype == "bfloat16"


def test_bad_layer_types_and_rope_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="layer_types"):
        Qwen2Config.from_file(write_config(tmp_path / "a", dict(RELEASE, layer_types=["full_attention", "chunked", "x"])))
    with pytest.raises(ConfigError, match=r"layer_types has 2 entries; expected num_hidden_layers=3"):
        Qwen2Config.from_file(write_config(tmp_path / "b", dict(RELEASE, layer_types=["full_attention"] * 2)))
    with pytest.raises(ConfigError, match="'dynamic'"):
        Qwen2Config.from_file(write_config(tmp_path / "c", dict(RELEASE, rope_scaling={"type": "dynamic", "factor": 2.0})))


def test_missing_and_non_integer_sizes_name_the_key(tmp_path):
    raw = dict(RELEASE)
    del raw["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        Qwen2Config.from_file(write_config(tmp_path / "a", raw))
    with pytest.raises(ConfigError, match="not an integer"):
        Qwen2Config.from_file(write_config(tmp_path / "b", dict(RELEASE, vocab_size="many")))
    with pytest.raises(ConfigError, match=r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"):
        Qwen2Config.from_file(write_config(tmp_path / "c", dict(RELEASE, num_key_value_heads=3)))
    with pytest.raises(ConfigError, match="hidden_act 'gelu'"):
        Qwen2Config.from_file(write_config(tmp_path / "d", dict(RELEASE, hidden_act="gelu")))


def test_missing_kv_heads_means_multi_head(tmp_path):
    raw = dict(RELEASE)
    del raw["num_key_value_heads"]
    assert Qwen2Config.from_file(write_config(tmp_path, raw)).num_key_value_heads == 4


# ---- the same logits through load_model ----------------------------------------------------


@pytest.fixture(scope="module")
def yarn_sliding_checkpoint(tmp_path_factory):
    """A checkpoint saved by the oracle (transformers-5 config.json), with yarn and a sliding window."""
    return make_checkpoint(tmp_path_factory.mktemp("t5-format"), with_tokenizer=False, seed=3,
                           num_hidden_layers=3, use_sliding_window=True, sliding_window=6, max_window_layers=1,
                           rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})


def test_both_formats_give_the_same_logits_through_load_model(yarn_sliding_checkpoint, tmp_path):
    t5_dir = yarn_sliding_checkpoint
    t5 = json.loads((t5_dir / "config.json").read_text())
    assert "rope_parameters" in t5 and "layer_types" in t5 and "dtype" in t5  # what the oracle wrote

    release_dir = tmp_path / "release"
    release_dir.mkdir()
    shutil.copy2(t5_dir / "model.safetensors", release_dir / "model.safetensors")
    release = dict(RELEASE, bos_token_id=None, eos_token_id=None)  # as make_checkpoint saved them
    write_config(release_dir, release)

    a = qwen2.load_model(t5_dir, dtype="float32")
    b = qwen2.load_model(release_dir, dtype="float32")
    assert a.config == b.config
    assert a.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))  # longer than the window
    la, lb = a(ids), b(ids)
    assert torch.equal(la, lb)

    # and they are the oracle's logits: the window and yarn are really in effect
    ref = transformers.Qwen2ForCausalLM.from_pretrained(t5_dir, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    with torch.no_grad():
        expected = ref(ids).logits
    torch.testing.assert_close(la, expected, atol=1e-4, rtol=0)

    # Dropping the window changes the logits past position 6, so the test above could fail.
    write_config(release_dir, dict(release, use_sliding_window=False))
    c = qwen2.load_model(release_dir, dtype="float32")
    assert (c(ids)[:, 10:] - la[:, 10:]).abs().max() > 1e-3
