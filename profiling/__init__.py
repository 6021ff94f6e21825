"""Qwen2 Studio profiling: measure a loaded `qwen2` model from the outside.

    import qwen2, profiling
    model = qwen2.load_model("Qwen/Qwen2-0.5B-Instruct", device="cpu")
    run = profiling.profile_model(model, prompt_tokens=32, new_tokens=8)
    profiling.save_run(run, "run.json")

See profiling/README.md for the CLI (`python -m profiling.bench`, `python -m profiling.report`),
the run-file schema, the charts, the reference runs under docs/runs/ and how to open traces.
"""

from .errors import BaselineError, ProfilingError, RunFileError
from .measure import profile_model
from .runfile import (SCHEMA_NAME, SCHEMA_VERSION, load_run, run_label, save_run, shipped_runs,
                      validate_run)

__all__ = [
    "profile_model", "save_run", "load_run", "validate_run", "run_label", "shipped_runs",
    "RunFileError", "ProfilingError", "BaselineError", "SCHEMA_NAME", "SCHEMA_VERSION",
]
