"""qwen2.openmp: a thread that gives its CPU workers back ends them; the engine has the thread that
started it, and every holder of Engine.exclusive(), give theirs back (qwen2/openmp.py says why)."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest
import torch

from qwen2 import engine as engine_module
from qwen2 import openmp
from qwen2.engine import Engine
from qwen2.steps import EagerSteps


def threads_now() -> int:
    return len(os.listdir("/proc/self/task"))


def settle(expected: int, seconds: float = 5.0) -> int:
    """The thread count once it reaches `expected` (workers end asynchronously), or after `seconds`."""
    deadline = time.monotonic() + seconds
    while threads_now() != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return threads_now()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc/self/task (Linux)")
@pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info().split("ATen parallel backend:")[-1],
                    reason="torch's CPU parallel backend here is not OpenMP")
def test_release_workers_ends_the_calling_threads_workers():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = {}

        def work():  # a fresh thread: its pool is its own, whatever the test process did before
            before = threads_now()
            torch.ones(1 << 22).add_(1)  # past the grain size: a parallel region with 2 threads
            result["with workers"] = threads_now() - before
            result["released"] = openmp.release_workers()
            result["after release"] = settle(before) - before
            torch.ones(1 << 22).add_(1)
            result["again"] = threads_now() - before

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    finally:
        torch.set_num_threads(previous)
    assert result == {"with workers": 1, "released": True, "after release": 0, "again": 1}


def test_release_workers_is_harmless_twice_and_without_a_pool():
    def work():
        assert openmp.release_workers() in (True, False)
        assert openmp.release_workers() in (True, False)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()


def test_the_engine_has_the_starting_thread_and_exclusive_holders_release_workers(tiny_model_dir, monkeypatch):
    import qwen2

    model = qwen2.load_model(tiny_model_dir, dtype="float32")
    calls = []
    monkeypatch.setattr(engine_module, "release_workers", lambda: calls.append(threading.current_thread().name))
    engine = Engine(model, rows=1, fast_decode="off", speculate=False)
    assert isinstance(engine.steps, EagerSteps)
    engine.start()
    try:
        assert calls == ["MainThread"]

        def holder():
            with engine.exclusive():
                calls.append("held")

        thread = threading.Thread(target=holder, name="a-holder")
        thread.start()
        thread.join()
        assert calls == ["MainThread", "held", "a-holder"]
        assert engine.generate([1, 2, 3], max_new_tokens=2) and calls == ["MainThread", "held", "a-holder"]
    finally:
        engine.close()
