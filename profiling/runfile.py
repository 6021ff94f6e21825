"""Run files: one profiling run as JSON, with a schema name and version.

`load_run` refuses, with a RunFileError naming the file, anything that is unreadable, not JSON,
not a Qwen2 Studio run, from another schema version, or missing the keys the charts need.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from .errors import RunFileError

SCHEMA_NAME = "qwen2-studio.profile-run"
SCHEMA_VERSION = 1

REQUIRED_KEYS = ("device", "dtype", "ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s",
                 "layers", "memory")
REQUIRED_MEMORY_KEYS = ("weights_bytes", "kv_cache_bytes", "peak_bytes")
REQUIRED_LAYER_KEYS = ("attention_ms", "mlp_ms")


def validate_run(run, where: str = "run") -> dict:
    """Raise RunFileError unless `run` is a run dict of this schema version; return it."""
    if not isinstance(run, dict):
        raise RunFileError(f"{where}: not a profiling run (expected a JSON object, got "
                           f"{type(run).__name__})")
    schema = run.get("schema")
    if schema != SCHEMA_NAME:
        raise RunFileError(f"{where}: not a Qwen2 Studio profiling run (schema {schema!r}, "
                           f"expected {SCHEMA_NAME!r})")
    version = run.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise RunFileError(f"{where}: schema_version missing or not an integer ({version!r})")
    if version < SCHEMA_VERSION:
        raise RunFileError(f"{where}: schema version {version} is older than this reader's "
                           f"{SCHEMA_VERSION}; re-run `python -m profiling.bench` to regenerate it")
    if version > SCHEMA_VERSION:
        raise RunFileError(f"{where}: schema version {version} is newer than this reader's "
                           f"{SCHEMA_VERSION}; update Qwen2 Studio to read it")
    missing = [k for k in REQUIRED_KEYS if k not in run]
    if missing:
        raise RunFileError(f"{where}: missing keys {', '.join(missing)}")
    memory = run["memory"]
    if not isinstance(memory, dict):
        raise RunFileError(f"{where}: 'memory' is not an object")
    missing = [k for k in REQUIRED_MEMORY_KEYS if k not in memory]
    if missing:
        raise RunFileError(f"{where}: memory is missing {', '.join(missing)}")
    layers = run["layers"]
    if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
        raise RunFileError(f"{where}: 'layers' is not a list of objects")
    for i, layer in enumerate(layers):
        missing = [k for k in REQUIRED_LAYER_KEYS if k not in layer]
        if missing:
            raise RunFileError(f"{where}: layers[{i}] is missing {', '.join(missing)}")
    return run


def _strict(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def save_run(run: dict, path) -> Path:
    """Validate and write `run` as JSON (atomically: a temp file renamed into place)."""
    path = Path(path)
    validate_run(run, where="run to save")
    text = json.dumps(_strict(run), indent=2, allow_nan=False)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise RunFileError(f"{path}: cannot write run file ({exc.strerror or exc})") from None
    return path


def load_run(path) -> dict:
    """Read and validate a run file; RunFileError (a ValueError) names the file and the fault."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunFileError(f"{path}: run file not found") from None
    except IsADirectoryError:
        raise RunFileError(f"{path}: is a directory, expected a run .json file") from None
    except UnicodeDecodeError:
        raise RunFileError(f"{path}: not a text file (expected a JSON run file)") from None
    except OSError as exc:
        raise RunFileError(f"{path}: cannot read run file ({exc.strerror or exc})") from None
    try:
        run = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunFileError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, "
                           f"column {exc.colno})") from None
    return validate_run(run, where=str(path))
