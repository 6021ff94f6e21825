"""Shared fixtures: tiny Qwen2 checkpoints written by the oracle (transformers' save_pretrained)
with random weights, plus a byte-level BPE tokenizer built with `tokenizers`; the real checkpoint
where it has been built; the environment every test and every subprocess a test starts runs in.

Nothing is downloaded: every checkpoint a test loads is made here, in a temporary directory.
The helpers themselves live in tests/helpers.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import make_checkpoint, train_peaked_model

# Fixtures of the Inside tests (fused, unfused and sliding-window models) and the browser tests.
pytest_plugins = ["tests.inside_fixtures", "tests.browser_fixtures"]

# The environment of the whole run, set in pytest_configure (before any test module is imported or
# any test runs) and put back in pytest_unconfigure. Subprocesses the tests start (app.py,
# `python -m qwen2`, `python -m profiling.bench`) inherit it. A value already set outside wins.
TEST_ENV = {
    # The app and `python -m qwen2` compile their CPU decode step at start-up by default (about a
    # minute): the subprocesses the tests start decode eagerly unless a test asks otherwise
    # (tests/test_cli.py and tests/test_app.py cover the compiled start-up).
    "QWEN2_FAST_DECODE": "off",
    # Where a decode step is compiled (in the tests' own process, `python -m qwen2 --fast-decode auto`,
    # an app started without QWEN2_FAST_DECODE), Inductor's cheap mode rather than max-autotune: the
    # tests check the compiled step's behaviour, not its speed (qwen2.cpu_compile.default_mode, app.py).
    "QWEN2_COMPILE_MODE": "default",
    "QWEN2_STUDIO_COMPILE_MODE": "default",
}
_SAVED_ENV = pytest.StashKey[dict]()


def pytest_configure(config):
    config.stash[_SAVED_ENV] = {name: os.environ.get(name) for name in TEST_ENV}
    for name, value in TEST_ENV.items():
        os.environ.setdefault(name, value)


def pytest_unconfigure(config):
    for name, value in config.stash.get(_SAVED_ENV, {}).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def pytest_collection_modifyitems(config, items):
    """Markers (pytest.ini) by what a test needs. A test that drives a browser (it uses the `browser`
    fixture) is `browser`, and every `browser` test is `slow`, so `-m "not slow"` is the quick loop;
    a `gpu` test is skipped, saying so, where torch sees no CUDA device."""
    cuda = None
    for item in items:
        if "browser" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.browser)
        if item.get_closest_marker("browser") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("gpu"):
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device (marker gpu)"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny GQA, tied-embedding checkpoint in float32 with tokenizer files."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty HF cache with HF_HUB_OFFLINE=1: nothing is downloaded, only what a test lays out loads."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both at import time into module constants; patch those too.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The real checkpoint, Qwen2.5-Coder-0.5B-Instruct in the Hugging Face layout, built by
    `python scripts/build_real_checkpoint.py` ($QWEN2_REAL_MODEL overrides where it lives).
    Skips, saying how to build it, when it is absent."""
    directory = Path(os.environ.get("QWEN2_REAL_MODEL")
                     or Path(__file__).resolve().parents[1] / ".models" / "Qwen2.5-Coder-0.5B-Instruct")
    needed = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    missing = [name for name in needed if not (directory / name).is_file()]
    if missing:
        pytest.skip(f"real checkpoint absent: {directory} has no {', '.join(missing)} "
                    "(build it with: python scripts/build_real_checkpoint.py)")
    return directory


@pytest.fixture(scope="session")
def trained_model():
    """train_peaked_model(), trained once for the whole run; tests quantize copies of it."""
    return train_peaked_model()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the test item (`item.rep_call`), so a fixture's teardown can tell that
    the test failed and record what it saw (tests/test_browser.py)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
