"""qwen2.load_model: typed errors that name what is wrong, hub ids offline, tied / untied heads,
memory (one copy of the weights), random weights and the official shapes, the default dtype."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import qwen2
from qwen2 import hub
from qwen2.config import Qwen2Config, official_config
from qwen2.cpu_kernels import blocks_available
from qwen2.errors import CheckpointError, ConfigError, ModelNotFoundError, Qwen2Error
from qwen2.options import cpu_has_bfloat16_math
from qwen2.tokenizer import Tokenizer
from tests.helpers import make_checkpoint
from tests.tokenizer_factory import make_hub_cache

REPO_ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("untied"), with_tokenizer=False, seed=1,
                           tie_word_embeddings=False)


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory) -> Path:
    directory = make_checkpoint(tmp_path_factory.mktemp("sharded"), with_tokenizer=False, seed=2,
                                tie_word_embeddings=False, max_shard_size="40KB")
    assert (directory / "model.safetensors.index.json").is_file()
    return directory


def rewrite_tensors(directory: Path, edit) -> None:
    """Load model.safetensors, let `edit(dict)` change it, save it back."""
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


# ---- missing and malformed inputs ---------------------------------------------------------


def test_missing_directory_names_the_path(tmp_path):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(ModelNotFoundError) as info:
        qwen2.load_model(missing)
    assert str(missing) in str(info.value)
    assert "config.json" in str(info.value)  # says what was expected
    assert isinstance(info.value, OSError) and isinstance(info.value, Qwen2Error)


def test_a_file_instead_of_a_directory(tmp_path):
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="is a file; expected a model directory"):
        qwen2.load_model(f)


def test_no_config_json(tiny_model_dir, tmp_path):
    d = copy_checkpoint(tiny_model_dir, tmp_path / "ckpt")
    (d / "config.json").unlink()
    with pytest.raises(ConfigError) as info:
        qwen2.load_model(d)
    assert str(d / "config.json") in str(info.value) and "not found" in str(info.value)


@pytest.mark.parametrize("content, expected", [
    (b'{"model_type": "qwen2", "vocab_size": ', "unreadable"),  # truncated JSON
    (b"not json at all", "unreadable"),
    (b"\xff\xfe\x00garbage", "unreadable"),  # not UTF-8
    (b"[1, 2, 3]", "expected a JSON object"),
])
def test_invalid_config_json_names_the_file(tiny_model_dir, tmp_path, content, expected):
    d = copy_checkpoint(tiny_model_dir, tmp_path / "ckpt")
    (d / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=expected) as info:
        qwen2.load_model(d)
    assert str(d / "config.json") in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("model_type", ["llama", "qwen2_moe", None])
def test_other_model_type_is_named(tiny_model_dir, tmp_path, model_type):
    d = copy_checkpoint(tiny_model_dir, tmp_path / "ckpt")
    raw = json.loads((d / "config.json").read_text())
    if model_type is None:
        del raw["model_type"]
    else:
        raw["model_type"] = model_type
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as info:
        qwen2.load_model(d)
    assert f"model_type is {model_type!r}" in str(info.value)
    assert "'qwen2'" in str(info.value)


def test_pickled_checkpoint_is_refused_without_unpickling(tiny_model_dir, tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy2(tiny_model_dir / "config.json", d / "config.json")
    torch.save({"model.norm.weight": torch.ones(64)}, d / "pytorch_model.bin")

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle must never be used to load weights")

    class ForbiddenUnpickler:
        def __init__(self, *args, **kwargs):
            forbidden()

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.serialization, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", ForbiddenUnpickler)
    with pytest.raises(CheckpointError) as info:
        qwen2.load_model(d)
    message = str(info.value)
    assert "pytorch_model.bin" in message and "safetensors" in message and "required" in message


def test_hub_downloads_never_ask_for_pickles():
    for name in ("pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "model.pt", "model.pth",
                 "training_args.bin"):
        assert not any(fnmatch(name, pattern) for pattern in hub.ALLOW_PATTERNS), name
    for name in ("model.safetensors", "model-00001-of-00004.safetensors", "model.safetensors.index.json",
                 "config.json", "tokenizer.json"):
        assert any(fnmatch(name, pattern) for pattern in hub.ALLOW_PATTERNS), name


def test_no_weights_at_all(tiny_model_dir, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy2(tiny_model_dir / "config.json", d / "config.json")
    with pytest.raises(CheckpointError, match="has no model.safetensors") as info:
        qwen2.load_model(d)
    assert str(d) in str(info.value)


@pytest.mark.parametrize("key", ["model.layers.1.mlp.up_proj.weight", "model.norm.weight",
                                 "model.layers.0.self_attn.q_proj.bias", "model.embed_tokens.weight"])
def test_missing_tensor_is_named(tiny_model_dir, tmp_path, key):
    d = copy_checkpoint(tiny_model_dir, tmp_path / "ckpt")
    rewrite_tensors(d, lambda t: t.pop(key))
    with pytest.raises(CheckpointError) as info:
        qwen2.load_model(d)
    assert f"tensor {key} is missing" in str(info.value)


def test_wrong_shape_names_the_tensor_and_both_shapes(tiny_model_dir, tmp_path):
    key = "model.layers.0.mlp.gate_proj.weight"  # (intermediate 160, hidden 64)
    d = copy_checkpoint(tiny_model_dir, tmp_path / "ckpt")

    def edit(tensors):
        tensors[key] = torch.zeros(100, 64)

    rewrite_tensors(d, edit)
    with pytest.raises(CheckpointError) as info:
        qwen2.load_model(d)
    message = str(info.value)
    assert key in message and "(100, 64)" in message and "(160, 64)" in message


def test_extra_tensors_are_ignored(tiny_model_dir, tmp_path):
    d = copy_checkpoint(tiny_model_dir, tmp_path / "ckpt")

    def edit(tensors):
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    rewrite_tensors(d, edit)
    torch.testing.assert_close(qwen2.load_model(d, dtype="float32")(IDS),
                               qwen2.load_model(tiny_model_dir, dtype="float32")(IDS), rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["truncated", "header", "empty"])
def test_corrupted_safetensors_names_the_file(tiny_model_dir, tmp_path, damage):
    d = copy_checkpoint(tiny_model_dir, tmp_path / "ckpt")
    path = d / "model.safetensors"
    data = path.read_bytes()
    if damage == "truncated":
        data = data[: len(data) * 2 // 3]
    elif damage == "header":
        data = data[:8] + b"{this is not json" + data[25:]
    else:
        data = b""
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        qwen2.load_model(d)
    assert str(path) in str(info.value)
    assert "not a valid safetensors file" in str(info.value)


def test_sharded_checkpoint_loads(sharded_dir, untied_dir):
    shards = sorted(p.name for p in sharded_dir.glob("*.safetensors"))
    assert len(shards) > 1
    model = qwen2.load_model(sharded_dir, dtype="float32")
    transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")
    ref = transformers.Qwen2ForCausalLM.from_pretrained(sharded_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), ref(IDS).logits, atol=1e-4, rtol=0)


def test_sharded_index_pointing_to_a_missing_shard(sharded_dir, tmp_path):
    d = copy_checkpoint(sharded_dir, tmp_path / "ckpt")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (d / victim).unlink()
    with pytest.raises(CheckpointError) as info:
        qwen2.load_model(d)
    assert victim in str(info.value) and "missing" in str(info.value)


def test_sharded_index_unreadable(sharded_dir, tmp_path):
    d = copy_checkpoint(sharded_dir, tmp_path / "ckpt")
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')  # no weight_map
    with pytest.raises(CheckpointError, match="weight_map") as info:
        qwen2.load_model(d)
    assert "model.safetensors.index.json" in str(info.value)


def test_sharded_tensor_missing_from_every_shard(sharded_dir, tmp_path):
    d = copy_checkpoint(sharded_dir, tmp_path / "ckpt")
    key = "model.layers.1.self_attn.o_proj.weight"
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = d / index["weight_map"][key]
    tensors = load_file(str(shard))
    del tensors[key]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tensor {key} is missing"):
        qwen2.load_model(d)


# ---- devices, dtypes, attention backends --------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_a_clear_error(tiny_model_dir, device):
    with pytest.raises(ConfigError) as info:
        qwen2.load_model(tiny_model_dir, device=device)
    message = str(info.value)
    assert repr(device) in message and "CUDA is not available" in message and "cpu" in message


@pytest.mark.parametrize("device", ["quantum", "meta", "xla", 3.5])
def test_unknown_device(tiny_model_dir, device):
    with pytest.raises(ConfigError) as info:
        qwen2.load_model(tiny_model_dir, device=device)
    assert repr(device) in str(info.value)
    assert "cpu" in str(info.value)


@pytest.mark.parametrize("dtype", ["float8", "int8", "fp64", "bf17"])
def test_unknown_dtype(tiny_model_dir, dtype):
    with pytest.raises(ConfigError) as info:
        qwen2.load_model(tiny_model_dir, dtype=dtype)
    assert repr(dtype) in str(info.value)
    assert "float32" in str(info.value) and "bfloat16" in str(info.value)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, torch.complex64])
def test_unsupported_torch_dtype(tiny_model_dir, dtype):
    with pytest.raises(ConfigError, match="dtype"):
        qwen2.load_model(tiny_model_dir, dtype=dtype)


@pytest.mark.parametrize("dtype, expected", [("float32", torch.float32), ("bf16", torch.bfloat16),
                                             ("torch.float16", torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_dtype_spellings(tiny_model_dir, dtype, expected):
    model = qwen2.load_model(tiny_model_dir, dtype=dtype)
    assert model.dtype == expected
    assert all(p.dtype == expected for p in model.parameters())


def test_unknown_attn_backend(tiny_model_dir):
    with pytest.raises(ConfigError) as info:
        qwen2.load_model(tiny_model_dir, attn_backend="flash9")
    assert "'flash9'" in str(info.value) and "sdpa" in str(info.value) and "eager" in str(info.value)


def test_default_dtype_on_cpu_follows_the_cpu_features(tiny_model_dir):
    model = qwen2.load_model(tiny_model_dir)
    assert model.dtype == (torch.bfloat16 if cpu_has_bfloat16_math() else torch.float32)
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else None
    if flags is not None:  # the same answer as the kernel's feature flags
        assert cpu_has_bfloat16_math() == ("avx512_bf16" in flags or "amx_bf16" in flags or "amx_tile" in flags)
    # torch's quantized kernels want bf16 activations; ours (blocks) sum in float32 and keep float32
    # activations, with bf16 math or without
    blocks = blocks_available(torch.device("cpu"))
    for scheme in ("int8", "int4"):
        assert qwen2.load_model(tiny_model_dir, quantize=scheme).dtype == (torch.float32 if blocks else torch.bfloat16)
    # not the checkpoint's own dtype by accident: the tiny checkpoint says float32
    assert json.loads((tiny_model_dir / "config.json").read_text())["dtype"] == "float32"


# ---- hub ids, offline ---------------------------------------------------------------------


def test_uncached_hub_id_offline_is_model_not_found(offline_hub):
    with pytest.raises(ModelNotFoundError) as info:
        qwen2.load_model("Org/Missing")
    message = str(info.value)
    assert "'Org/Missing'" in message
    assert "HF_HUB_OFFLINE" in message and "download it once" in message  # how to fix it
    assert "no local directory 'Org/Missing'" in message  # it may have been meant as a relative path


def test_cached_hub_id_loads_offline(tiny_model_dir, offline_hub):
    snapshot = make_hub_cache(offline_hub, "Org/Tiny", tiny_model_dir)
    model = qwen2.load_model("Org/Tiny", dtype="float32")
    direct = qwen2.load_model(tiny_model_dir, dtype="float32")
    assert torch.equal(model(IDS), direct(IDS))
    assert model.info.source == "Org/Tiny"
    assert model.info.generation_config == direct.info.generation_config != {}
    assert model.config == direct.config

    tok = Tokenizer.from_pretrained("Org/Tiny")
    tok_direct = Tokenizer.from_pretrained(tiny_model_dir)
    text = "Hello, world! 你好 🎉"
    assert tok.encode(text) == tok_direct.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == tok_direct.vocab_size
    assert hub.resolve("Org/Tiny") == snapshot


def test_repo_id_detection():
    assert hub.looks_like_repo_id("Qwen/Qwen2-0.5B-Instruct")
    assert hub.looks_like_repo_id("Org/Name_v1.2")
    for not_an_id in ("./Org/Name", "/abs/path", "~/model", "a/b/c", "name", "Org/", "/Org/Name"):
        assert not hub.looks_like_repo_id(not_an_id), not_an_id


# ---- tied and untied heads ----------------------------------------------------------------


def test_tied_checkpoint_has_no_lm_head_and_shares_storage(tiny_model_dir):
    with safe_open(str(tiny_model_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys  # save_pretrained omits the tied head
    assert "model.embed_tokens.weight" in keys
    model = qwen2.load_model(tiny_model_dir, dtype="float32")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with safe_open(str(tiny_model_dir / "model.safetensors"), framework="pt") as f:
        assert torch.equal(model.lm_head.weight, f.get_tensor("model.embed_tokens.weight"))
    # still tied after a dtype change at load time
    bf = qwen2.load_model(tiny_model_dir, dtype="bfloat16")
    assert bf.lm_head.weight.data_ptr() == bf.model.embed_tokens.weight.data_ptr()


def test_tied_checkpoint_with_only_lm_head_weight(tiny_model_dir, tmp_path):
    d = copy_checkpoint(tiny_model_dir, tmp_path / "ckpt")
    rewrite_tensors(d, lambda t: t.__setitem__("lm_head.weight", t.pop("model.embed_tokens.weight")))
    model = qwen2.load_model(d, dtype="float32")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model(IDS), qwen2.load_model(tiny_model_dir, dtype="float32")(IDS))


def test_untied_checkpoint_loads_its_own_head(untied_dir):
    with safe_open(str(untied_dir / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" in f.keys()
        head = f.get_tensor("lm_head.weight")
    model = qwen2.load_model(untied_dir, dtype="float32")
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, head)


def test_untied_checkpoint_without_lm_head_is_an_error(untied_dir, tmp_path):
    d = copy_checkpoint(untied_dir, tmp_path / "ckpt")
    rewrite_tensors(d, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError) as info:
        qwen2.load_model(d)
    assert "lm_head.weight" in str(info.value) and "missing" in str(info.value)


# ---- memory: one copy of the weights ------------------------------------------------------

MEASURE = textwrap.dedent("""
    import json, sys, threading, time
    import psutil
    import qwen2

    qwen2.load_model(sys.argv[2], dtype="float32")  # warm-up: imports, meta-device registrations

    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    proc = psutil.Process()
    base_rss, base_anon = proc.memory_info().rss, anon()
    peak = [base_anon]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    model = qwen2.load_model(sys.argv[1], dtype="float32")
    stop.set()
    thread.join()
    peak[0] = max(peak[0], anon())

    maps = []
    for line in open("/proc/self/maps"):
        parts = line.split()
        if len(parts) >= 6 and parts[5].endswith(".safetensors"):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            maps.append((lo, hi))
    params = list(model.parameters())
    print(json.dumps(dict(
        weight_bytes=sum(p.numel() * p.element_size() for p in params),
        rss_growth=proc.memory_info().rss - base_rss,
        anon_peak_growth=peak[0] - base_anon,
        in_file_mapping=sum(any(lo <= p.data_ptr() < hi for lo, hi in maps) for p in params),
        distinct_storages=len({p.untyped_storage().data_ptr() for p in params}),
        n_params=len(params),
    )))
""")


def write_random_checkpoint(directory: Path, **shape) -> Path:
    from qwen2.model import Qwen2ForCausalLM

    directory.mkdir(parents=True)
    raw = dict(model_type="qwen2", max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6,
               torch_dtype="float32", **shape)
    (directory / "config.json").write_text(json.dumps(raw))
    with torch.device("meta"):
        shapes = {k: p.shape for k, p in Qwen2ForCausalLM(Qwen2Config.from_dict(raw)).named_parameters()}
    gen = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()},
              str(directory / "model.safetensors"))
    return directory


@pytest.mark.slow
def test_loading_holds_one_copy_of_the_weights(tmp_path):
    pytest.importorskip("psutil")
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux /proc to read RssAnon")
    big = write_random_checkpoint(tmp_path / "big", vocab_size=8192, hidden_size=512, intermediate_size=1536,
                                  num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
                                  tie_word_embeddings=False)
    small = write_random_checkpoint(tmp_path / "small", vocab_size=64, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                    tie_word_embeddings=False)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", MEASURE, str(big), str(small)], capture_output=True, text=True,
                         env=env, timeout=120, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    weights = stats["weight_bytes"]
    assert weights > 100e6  # ~106 MB of fp32 weights
    assert (big / "model.safetensors").stat().st_size >= weights
    # one copy: growth well under two copies' worth, after loading and at its peak
    assert stats["rss_growth"] < 1.5 * weights, stats
    assert stats["anon_peak_growth"] < 1.5 * weights, stats
    # the parameters own their memory: none of them is a view into a safetensors file mapping
    assert stats["in_file_mapping"] == 0, stats
    assert stats["distinct_storages"] == stats["n_params"], stats  # untied: no two share storage


# ---- random weights and the official shapes -----------------------------------------------

# (hidden, layers, heads, kv heads, intermediate, vocab, tied) from each release's config.json.
SHAPES = {
    "Qwen/Qwen2-0.5B": (896, 24, 14, 2, 4864, 151936, True),
    "Qwen/Qwen2-1.5B": (1536, 28, 12, 2, 8960, 151936, True),
    "Qwen/Qwen2-7B": (3584, 28, 28, 4, 18944, 152064, False),
    "Qwen/Qwen2-72B": (8192, 80, 64, 8, 29568, 152064, False),
    "Qwen/Qwen2.5-0.5B": (896, 24, 14, 2, 4864, 151936, True),
    "Qwen/Qwen2.5-1.5B": (1536, 28, 12, 2, 8960, 151936, True),
    "Qwen/Qwen2.5-3B": (2048, 36, 16, 2, 11008, 151936, True),
    "Qwen/Qwen2.5-7B": (3584, 28, 28, 4, 18944, 152064, False),
    "Qwen/Qwen2.5-14B": (5120, 48, 40, 8, 13824, 152064, False),
    "Qwen/Qwen2.5-32B": (5120, 64, 40, 8, 27648, 152064, False),
    "Qwen/Qwen2.5-72B": (8192, 80, 64, 8, 29568, 152064, False),
}
# The scalars base and -Instruct repos do NOT share: (max_position_embeddings, rms_norm_eps) of the
# base repo; every -Instruct repo has (32768, 1e-6). From the hub's config.json files.
BASE_SCALARS = {
    "Qwen/Qwen2-0.5B": (131072, 1e-6),
    "Qwen/Qwen2-1.5B": (131072, 1e-6),
    "Qwen/Qwen2-7B": (131072, 1e-6),
    "Qwen/Qwen2-72B": (131072, 1e-5),
    "Qwen/Qwen2.5-0.5B": (32768, 1e-6),
    "Qwen/Qwen2.5-1.5B": (131072, 1e-6),
    "Qwen/Qwen2.5-3B": (32768, 1e-6),
    "Qwen/Qwen2.5-7B": (131072, 1e-6),
    "Qwen/Qwen2.5-14B": (131072, 1e-5),
    "Qwen/Qwen2.5-32B": (131072, 1e-5),
    "Qwen/Qwen2.5-72B": (131072, 1e-5),
}


@pytest.mark.parametrize("instruct", [False, True], ids=["base", "instruct"])
@pytest.mark.parametrize("repo", sorted(SHAPES))
def test_official_config(repo, instruct):
    repo_id = repo + ("-Instruct" if instruct else "")
    cfg = official_config(repo_id)
    hidden, layers, heads, kv, inter, vocab, tied = SHAPES[repo]
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings) == (hidden, layers, heads, kv, inter,
                                                                                vocab, tied)
    max_pos, eps = (32768, 1e-6) if instruct else BASE_SCALARS[repo]
    assert cfg.max_position_embeddings == max_pos
    assert cfg.rms_norm_eps == eps
    assert cfg.rope_theta == 1_000_000.0
    assert cfg.rope_scaling is None and cfg.sliding_window is None
    assert cfg.layer_types == ["full_attention"] * layers
    assert cfg.head_dim == 64 if hidden == 896 else cfg.head_dim == 128
    assert cfg.torch_dtype == "bfloat16"


def test_official_config_unknown_id_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        official_config("Qwen/Qwen3-8B")
    message = str(info.value)
    assert "'Qwen/Qwen3-8B'" in message
    for repo in SHAPES:
        assert repo in message


def test_random_weights_with_a_hub_id_uses_the_official_shape_without_the_hub(monkeypatch):
    """Without materialising 0.5B parameters: the official shape is swapped for a tiny one."""
    import qwen2.loading as loading

    asked = []
    tiny = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

    def fake_official(repo_id):
        asked.append(repo_id)
        official_config(repo_id)  # the real table must know it
        return tiny

    def no_hub(*args, **kwargs):
        raise AssertionError("random_weights with a hub id must not touch the hub")

    monkeypatch.setattr(loading, "official_config", fake_official)
    monkeypatch.setattr(hub, "resolve", no_hub)
    monkeypatch.setattr("huggingface_hub.snapshot_download", no_hub)
    model = qwen2.load_model("Qwen/Qwen2-0.5B-Instruct", random_weights=True, dtype="float32")
    assert asked == ["Qwen/Qwen2-0.5B-Instruct"]
    assert model.config is tiny
    assert model.info.random_weights is True and model.info.source == "Qwen/Qwen2-0.5B-Instruct"
    assert model.info.generation_config == {}
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 128)


def test_random_weights_unknown_hub_id_is_config_error_listing_known_ids():
    with pytest.raises(ConfigError) as info:
        qwen2.load_model("Org/NotAQwen", random_weights=True)
    assert "'Org/NotAQwen'" in str(info.value)
    assert "Qwen/Qwen2-0.5B" in str(info.value) and "Qwen/Qwen2.5-72B" in str(info.value)


def test_random_weights_from_a_directory_with_only_config_json(tiny_model_dir, tmp_path):
    d = tmp_path / "config-only"
    d.mkdir()
    shutil.copy2(tiny_model_dir / "config.json", d / "config.json")
    a = qwen2.load_model(d, random_weights=True, dtype="float32")
    b = qwen2.load_model(d, random_weights=True, dtype="float32")
    assert a.config == Qwen2Config.from_file(d / "config.json")
    assert a.info.random_weights is True
    la = a(IDS)
    assert torch.equal(la, b(IDS))  # same seed, same logits
    assert torch.isfinite(la).all()
    # random, not the checkpoint's weights
    real = qwen2.load_model(tiny_model_dir, dtype="float32")
    assert not torch.allclose(la, real(IDS))
    # the reference initialisation: N(0, 0.02) weights, unit norms, tied head
    std = a.model.embed_tokens.weight.std().item()
    assert 0.015 < std < 0.025
    assert torch.equal(a.model.norm.weight, torch.ones(64))
    assert torch.equal(a.model.layers[0].input_layernorm.weight, torch.ones(64))
    assert a.lm_head.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()
    # without safetensors, a normal load is refused
    with pytest.raises(CheckpointError):
        qwen2.load_model(d)


def test_random_weights_missing_directory(tmp_path):
    with pytest.raises(ModelNotFoundError, match=str(tmp_path / "nope")):
        qwen2.load_model(tmp_path / "nope", random_weights=True)


@pytest.mark.parametrize("kwargs", [dict(dtype="float8"), dict(dtype=torch.int8), dict(attn_backend="flash9"),
                                    dict(device="quantum"), dict(quantize="int3")],
                         ids=["dtype", "torch-dtype", "attn_backend", "device", "quantize"])
def test_bad_arguments_fail_before_reading_anything(monkeypatch, kwargs):
    """A typo in an argument must not cost a download or a multi-GB read first."""
    def no_io(*args, **kw):
        raise AssertionError("touched the checkpoint before checking the arguments")

    monkeypatch.setattr(hub, "resolve", no_io)
    monkeypatch.setattr(Qwen2Config, "from_file", classmethod(no_io))
    with pytest.raises(ConfigError) as info:
        qwen2.load_model("Org/Any", **kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value) or str(next(iter(kwargs.values()))) in str(info.value)
