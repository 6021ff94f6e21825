"""The CPU's worker threads: one thread runs the model's steps, the others give their workers back.

torch's CPU kernels (and ours, and Inductor's) run each product in an OpenMP parallel region, and
GNU OpenMP keeps a pool of worker threads for every thread that has opened one. It counts the
workers of all pools against the CPUs: once there are more than CPUs, every worker sleeps after a
few spins instead of a few hundred thousand, and each of a decode step's hundreds of parallel
regions waits for a sleeping worker to be woken. That happens as soon as a second thread runs torch
work next to the one that loaded the model: the serving engine's thread beside the main thread, the
Inside view or a profile on a Gradio worker. On 2 vCPUs the engine's int8 decode ran at 47-49 tok/s
with the loading thread's pool alive and 70-74 tok/s without it (docs/benchmarks.md, fourteenth
round).

`release_workers()` ends the calling thread's pool (OpenMP 5's omp_pause_resource_all); its next
parallel region starts a new one (~0.1 ms). A thread's pool also ends with the thread.
"""

from __future__ import annotations

import ctypes
import functools
import re

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep nothing else in between


@functools.lru_cache(maxsize=1)
def _pause_all():
    """omp_pause_resource_all of the OpenMP runtime torch loaded, or None (no OpenMP, or before 5.0)."""
    import torch  # noqa: F401 - loads the runtime

    handles = [ctypes.CDLL(None)]
    try:  # a runtime loaded without RTLD_GLOBAL is not in the process's namespace: open it by its path
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if re.search(r"/lib(g|i)?omp[^/]*\.so", line)}
        handles += [ctypes.CDLL(path) for path in sorted(paths)]
    except OSError:  # no /proc (macOS): the global namespace only
        pass
    for handle in handles:
        pause = getattr(handle, "omp_pause_resource_all", None)
        if pause is not None:
            pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
            return pause
    return None


def release_workers() -> bool:
    """End the calling thread's OpenMP worker threads; whether the runtime did (False: no OpenMP 5
    runtime, or called inside a parallel region)."""
    pause = _pause_all()
    return pause is not None and pause(OMP_PAUSE_SOFT) == 0
