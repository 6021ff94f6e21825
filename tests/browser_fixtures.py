"""What the browser tests share (tests/test_browser.py, test_layout.py, test_dashboard.py): Debian's
chromium driven by Playwright (never a downloaded browser), where to put screenshots, and waiting
for the page. Registered as fixtures by tests/conftest.py; a test using `browser` is marked
`browser` (and `slow`) there."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Screenshots and failure reports: $ARTIFACTS_DIR (CI sets it), else ./artifacts."""
    path = Path(os.environ.get("ARTIFACTS_DIR") or ROOT / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def browser():
    """One chromium for the whole run; each test opens its own pages (and closes them)."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"browser test skipped: {CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser test skipped: the playwright python package is not installed")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """predicate()'s first truthy value, polled every `interval` s; an AssertionError naming `what`
    after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
