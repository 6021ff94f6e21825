"""Turn a `source` (a local directory or a Hugging Face hub repo id) into a local directory.

Hub ids go through `huggingface_hub.snapshot_download`, so the normal HF cache is used and a
cached snapshot loads offline (no network, or HF_HUB_OFFLINE=1). Only what the runtime reads is
fetched: configs, tokenizer files and safetensors -- never pickled `*.bin` weights.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ModelNotFoundError

ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "*.safetensors",
    "model.safetensors.index.json",
]

# "Org/Name" with the characters the hub allows; anything else is treated as a path.
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def looks_like_repo_id(source: str) -> bool:
    return bool(_REPO_ID.match(str(source))) and not str(source).startswith((".", "/", "~"))


def resolve(source: str | os.PathLike) -> Path:
    """Return a local directory holding `source`'s files, downloading them if needed."""
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file; expected a model directory or a hub repo id")
    if not looks_like_repo_id(str(source)):
        raise ModelNotFoundError(
            f"model directory not found: {path} (expected a local directory with config.json "
            f"and *.safetensors, or a hub repo id such as Qwen/Qwen2-0.5B-Instruct)"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), allow_patterns=ALLOW_PATTERNS))
    except Exception as exc:  # the hub raises many types: offline, 401, 404, connection errors
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
        how = (
            "HF_HUB_OFFLINE is set and it is not in the local cache: unset HF_HUB_OFFLINE or "
            "download it once with network access"
            if offline
            else "check the id and your network, log in with `hf auth login` for gated repos, "
            "or pass a local directory"
        )
        raise ModelNotFoundError(
            f"hub repo {source!r} is neither cached nor downloadable ({type(exc).__name__}), and there "
            f"is no local directory {str(path)!r} either: {how}"
        ) from exc
