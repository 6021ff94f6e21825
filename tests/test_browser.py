"""The app in a real browser: Debian's chromium driven by Playwright (never a downloaded browser).

Type a message and watch the reply stream, press Stop, chat again and see the stats line, then run
a profile on the dashboard and see the plots render. Screenshots go to $ARTIFACTS_DIR (default:
<system tmp>/qwen2-studio-artifacts).
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

import pytest

from tests.test_app import App, endless_checkpoint

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def artifacts() -> Path:
    path = Path(os.environ.get("ARTIFACTS_DIR") or Path(tempfile.gettempdir()) / "qwen2-studio-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser():
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # Replies never meet an end token, so one is still streaming when we press Stop.
    ckpt = endless_checkpoint(tmp_path_factory.mktemp("browser-qwen2"), max_position_embeddings=4096)
    app = App(tmp_path_factory.mktemp("browser-app"), "--model", str(ckpt), "--dtype", "float32")
    yield app
    app.close()


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_chat_stream_stop_and_dashboard(browser, server, artifacts):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(server.url)
        box = page.locator("#chat-input textarea")
        box.wait_for(timeout=30_000)
        assert "Qwen2 Studio" in page.locator("h1").first.inner_text()

        # An empty message does nothing: no bubble appears.
        box.press("Enter")
        time.sleep(0.5)
        assert page.locator("[data-testid=user]").count() == 0

        # Type a message and watch the reply stream.
        box.fill("Hello! Tell me a long story, please.")
        box.press("Enter")
        bot = page.locator("[data-testid=bot]").last
        wait_until(lambda: page.locator("[data-testid=bot]").count() and bot.inner_text().strip(), 30,
                   "the first streamed tokens")
        first = len(bot.inner_text())
        grown = wait_until(lambda: len(bot.inner_text()) > first and len(bot.inner_text()), 30,
                           "the reply to grow")
        assert grown > first
        assert "generating" in page.locator("#chat-stats").inner_text()
        page.screenshot(path=str(artifacts / "01-chat-streaming.png"))

        # Stop: the reply stops growing, the stats line says so, and the send button comes back.
        page.locator("#chat-input .stop-button").click()
        wait_until(lambda: "Stopped after" in page.locator("#chat-stats").inner_text(), 15, "'Stopped after'")
        page.locator("#chat-input .submit-button").wait_for(timeout=15_000)
        stopped = len(bot.inner_text())
        time.sleep(1.0)
        assert len(bot.inner_text()) == stopped, "the reply kept growing after Stop"
        page.screenshot(path=str(artifacts / "02-chat-stopped.png"))

        # The app stays usable: set max new tokens in the settings, chat again, see the stats line.
        page.get_by_text("System prompt and sampling").click()
        max_new = page.locator("#max-new-tokens input[type=number]")
        max_new.wait_for(state="visible", timeout=10_000)  # the accordion is still opening

        def set_max_new_tokens():  # Gradio commits the number box on change; retry until the slider has it
            max_new.fill("24")
            max_new.press("Tab")
            time.sleep(0.2)
            return page.locator("#max-new-tokens input[type=range]").input_value() == "24"

        wait_until(set_max_new_tokens, 15, "the max-new-tokens slider to take 24", interval=0.3)
        box.fill("Thanks! Now a short one.")
        box.press("Enter")
        stats = page.locator("#chat-stats")
        wait_until(lambda: "Stats:" in stats.inner_text(), 60, "the stats line")
        text = stats.inner_text()
        assert "24 new tokens" in text and "tok/s" in text and "cpu" in text, text
        assert page.locator("[data-testid=bot]").count() == 2
        page.get_by_text("System prompt and sampling").click()  # fold the settings away again
        page.screenshot(path=str(artifacts / "03-chat-reply-with-stats.png"), full_page=True)

        # Dashboard: run a profile, watch the progress, see the plots render.
        page.get_by_role("tab", name="Dashboard").click()
        page.get_by_label("Context sweep").check()
        page.locator("#run-profile").click()
        try:
            page.get_by_text(re.compile(r"cpu: .*%")).first.wait_for(timeout=10_000)
            page.screenshot(path=str(artifacts / "04-dashboard-progress.png"))
        except Exception:  # a fast run can finish before the progress bar is seen
            pass
        wait_until(lambda: page.locator(".js-plotly-plot").count() >= 4, 180,
                   "four plotly figures: layers, memory, throughput, context sweep")
        status = page.locator("#profile-status")
        wait_until(lambda: "Saved" in status.inner_text(), 30, "the saved-run status")
        assert page.locator(".js-plotly-plot .main-svg").count() >= 4
        page.screenshot(path=str(artifacts / "05-dashboard-plots.png"), full_page=True)
        assert not errors, errors
    finally:
        page.close()
