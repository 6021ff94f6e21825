"""Run files: one profiling run as JSON, with a schema name and version.

`load_run` refuses, with a RunFileError naming the file, anything that is unreadable, not JSON,
not a Qwen2 Studio run, from another schema version, or missing the keys the charts need.
`run_label` says which run is which; `shipped_runs` lists the reference runs under docs/runs/.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from .environment import PROJECT_ROOT
from .errors import RunFileError

SCHEMA_NAME = "qwen2-studio.profile-run"
SCHEMA_VERSION = 1

REQUIRED_KEYS = ("device", "dtype", "ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s",
                 "layers", "memory")
REQUIRED_MEMORY_KEYS = ("weights_bytes", "kv_cache_bytes", "peak_bytes")
REQUIRED_LAYER_KEYS = ("attention_ms", "mlp_ms")
SHIPPED_RUNS_DIR = PROJECT_ROOT / "docs" / "runs"


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


def finite(obj):
    """`obj` with every NaN / infinity replaced by None (recursively), so it is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def save_run(run: dict, path) -> Path:
    """Validate and write `run` as JSON (atomically: a temp file renamed into place)."""
    path = Path(path)
    validate_run(run, where="run to save")
    text = json.dumps(finite(run), indent=2, allow_nan=False)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        os.chmod(tmp, 0o644)  # mkstemp's file is private; a run file is for sharing
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


def label_parts(run: dict) -> dict[str, str]:
    """The parts of a run's label, in order: device, dtype, quantize (if any), tokens ("64+16 tok"),
    weights ("real weights" / "random weights"), date and commit (where recorded)."""
    model = run.get("model") or {}
    env = run.get("environment") or {}
    parts = {"device": str(run.get("device", "?")), "dtype": str(run.get("dtype", "?"))}
    quantize = run.get("quantize") or model.get("quantize")
    if quantize:
        parts["quantize"] = str(quantize)
    parts["tokens"] = f"{run.get('prompt_tokens', '?')}+{run.get('new_tokens', '?')} tok"
    parts["weights"] = "random weights" if model.get("random_weights") else "real weights"
    if env.get("timestamp"):
        parts["date"] = str(env["timestamp"])[:10]
    commit = (env.get("git") or {}).get("commit")
    if commit:
        parts["commit"] = str(commit)[:7]
    return parts


def run_label(run: dict) -> str:
    """Which run this is, e.g. "cpu · bfloat16 · int8 · 64+16 tok · real weights · 2026-11-23 ·
    abc1234" (device, dtype, quantization, prompt+new tokens, weights, date, commit)."""
    return " · ".join(label_parts(run).values())


def shipped_runs() -> list[Path]:
    """The reference run files committed under docs/runs/ (sorted; [] where none are shipped)."""
    if not SHIPPED_RUNS_DIR.is_dir():
        return []
    return sorted(SHIPPED_RUNS_DIR.glob("*.json"))


def shipped_serving_runs() -> list[dict]:
    """The serving benchmarks (python -m profiling.serve --out) committed under docs/runs/serving/."""
    import json

    results = []
    for path in sorted((SHIPPED_RUNS_DIR / "serving").glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(result, dict) and result.get("kind") == "serving" and isinstance(result.get("rows"), list):
            results.append(result)
    return results


def trace_file(run: dict, run_path=None) -> Path | None:
    """The run's trace file: its recorded path, else the same name next to the run file."""
    name = (run.get("trace") or {}).get("file")
    if not name:
        return None
    candidates = [Path(name)]
    if run_path is not None:
        candidates.append(Path(run_path).parent / Path(name).name)
    return next((p for p in candidates if p.is_file()), None)
