"""Run files: one profiling run as JSON, with a schema name and version.

`load_run` refuses, with a RunFileError naming the file and the field, anything that is unreadable,
too big, not JSON, not a Qwen2 Studio run, from another schema version, or not of the typed schema
in `profiling.schema` (a missing key, a string where a number belongs, an object where a list does).
`run_label` says which run is which; `shipped_runs` lists the reference runs under docs/runs/.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .environment import PROJECT_ROOT
from . import schema
from .atomic import write_atomically
from .errors import RunFileError

SCHEMA_NAME = "qwen2-studio.profile-run"
SCHEMA_VERSION = 1

TRACE_SUFFIXES = (".json", ".json.gz")
MAX_RUN_BYTES = 8 * 2**20  # a real run is ~50 KB; the schema's longest lists fill ~2 MB
SHIPPED_RUNS_DIR = PROJECT_ROOT / "docs" / "runs"


def validate_run(run, where: str = "run") -> dict:
    """Raise RunFileError unless `run` is a run dict of this schema version; return it."""
    if not isinstance(run, dict):
        raise RunFileError(f"{where}: not a profiling run (expected a JSON object, got "
                           f"{type(run).__name__})")
    name = run.get("schema")
    if name != SCHEMA_NAME:
        raise RunFileError(f"{where}: not a Qwen2 Studio profiling run (schema {str(name)[:80]!r}, "
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
    faults = schema.problems(run)
    if faults:
        more = f" (and {len(faults) - 5} more)" if len(faults) > 5 else ""
        raise RunFileError(f"{where}: " + "; ".join(faults[:5]) + more)
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
    try:
        write_atomically(path, text + "\n")
    except OSError as exc:
        raise RunFileError(f"{path}: cannot write run file ({exc.strerror or exc})") from None
    return path


def load_run(path, where: str | None = None) -> dict:
    """Read and validate a run file; RunFileError (a ValueError) names the file (as `where`, by
    default its path) and the fault."""
    path = Path(path)
    where = str(path) if where is None else where
    try:
        if path.stat().st_size > MAX_RUN_BYTES:
            raise RunFileError(f"{where}: {path.stat().st_size / 2**20:.1f} MB is too big for a run file "
                               f"(at most {MAX_RUN_BYTES // 2**20} MB)")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunFileError(f"{where}: run file not found") from None
    except IsADirectoryError:
        raise RunFileError(f"{where}: is a directory, expected a run .json file") from None
    except UnicodeDecodeError:
        raise RunFileError(f"{where}: not a text file (expected a JSON run file)") from None
    except OSError as exc:
        raise RunFileError(f"{where}: cannot read run file ({exc.strerror or exc})") from None
    try:
        run = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunFileError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}, "
                           f"column {exc.colno})") from None
    except RecursionError:
        raise RunFileError(f"{where}: JSON nested too deeply for a run file") from None
    return validate_run(run, where=where)


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


def model_name(source: str) -> str:
    """The model's name from where it was loaded: a hub id's or a directory's last part (for a hub
    cache's snapshot folder, the repository it caches, not the snapshot's hash)."""
    parts = [p for p in str(source or "").replace("\\", "/").split("/") if p]
    for part in reversed(parts):
        if part.startswith("models--"):
            return part.split("--")[-1]
    return parts[-1] if parts else ""


def model_size(parameters) -> str:
    """494032768 -> "494 M", 7615616512 -> "7.62 B"."""
    if not isinstance(parameters, int) or isinstance(parameters, bool) or parameters <= 0:
        return ""
    if parameters >= 1e9:
        return f"{parameters / 1e9:.3g} B"
    return f"{parameters / 1e6:.0f} M" if parameters >= 1e6 else f"{parameters / 1e3:.0f} k"


def model_label(run: dict) -> str:
    """Which model, e.g. "Qwen2.5-Coder-0.5B-Instruct · 494 M" (its name and parameter count)."""
    model = run.get("model") or {}
    name = model.get("name") or model_name(model.get("source") or "") or "unknown model"
    return " · ".join(p for p in (str(name), model_size(model.get("parameters"))) if p)


def hardware_label(run: dict) -> str:
    """Which hardware, e.g. "AMD EPYC · 2 cores · 2 threads" or "NVIDIA H200 · 141 GB" (older
    files without an environment section: the device name recorded at the top, or the device)."""
    env = run.get("environment") or {}
    name = env.get("device_name") or run.get("device_name") or env.get("gpu_name") or env.get("cpu_model")
    parts = [str(name or run.get("device", "?"))]
    if str(run.get("device", "")).startswith("cuda") or env.get("gpu_name"):
        memory = env.get("gpu_memory_bytes")
        if isinstance(memory, (int, float)) and memory > 0:
            parts.append(f"{memory / 1e9:.0f} GB")
    else:
        cores, usable = env.get("cpu_count"), env.get("cpus_usable")
        if cores:
            parts.append(f"{usable} of {cores} cores" if usable and usable != cores else f"{cores} cores")
        if env.get("torch_threads"):
            parts.append(f"{env['torch_threads']} threads")
    return " · ".join(parts)


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


def trace_file(run: dict, run_path) -> Path | None:
    """The run's trace file, if it lies in the run file's folder (or below it): at its recorded path,
    or by its name next to the run file. A run file may be a visitor's upload, so a path it names
    anywhere else on the server is never opened."""
    name = (run.get("trace") or {}).get("file")
    if not name or run_path is None:
        return None
    home = Path(run_path).resolve().parent
    recorded = Path(name)
    for candidate in (recorded, home / recorded.name):
        try:
            resolved = candidate.resolve()
        except (OSError, RuntimeError):
            continue
        if resolved.is_relative_to(home) and resolved.is_file() and resolved.name.endswith(TRACE_SUFFIXES):
            return resolved
    return None
