"""The profiler's exception types.

Both subclass ValueError, so `except ValueError` keeps working for callers (the app, the CLI)
that do not import this package's names; messages say what was wrong and how to fix it.
"""


class ProfilingError(ValueError):
    """Bad profiling input: an unavailable device, an unknown dtype, bad token counts."""


class RunFileError(ProfilingError):
    """A run file that cannot be read, is not JSON, or is not a run of a schema we can read."""


class BaselineError(ProfilingError):
    """The optional transformers baseline cannot run (transformers missing, unsupported model)."""
