"""The dashboard as users expect it (issue 16): runs named by their model and hardware, the hooks'
overhead said no more precisely than its noise allows, a profile's progress in the status while the
old figures stay, no empty boxes, and a legible "Decode" button in the dark theme.

The figures and texts are checked without a browser; the page itself in Debian's chromium driven
by Playwright against the real app (python app.py on a tiny checkpoint).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest

import profiling
from profiling import charts
from profiling.headline import headline_rows, hover_labels, run_labels
from profiling.overhead import median_ratio_interval, overhead_text
from profiling.runfile import hardware_label, model_label, shipped_runs
from tests.browser_fixtures import wait_until
from tests.helpers import App



@pytest.fixture(scope="module")
def shipped() -> list[dict]:
    runs = [profiling.load_run(p) for p in shipped_runs()]
    if not runs:
        pytest.skip("no shipped runs under docs/runs/")
    return runs


def untied_630m(run: dict) -> dict:
    """The case from the issue: a 630 M untied checkpoint beside the shipped 494 M runs."""
    other = copy.deepcopy(run)
    other["model"].update(parameters=630_167_424, tie_word_embeddings=False, source="/ckpt/Qwen2.5-Untied",
                          name="Qwen2.5-Untied")
    return other


# -- 1. labels: which model, which hardware ---------------------------------------------------------
def test_the_table_names_each_runs_model_size_and_hardware(shipped):
    columns, rows = headline_rows(shipped + [untied_630m(shipped[0])])
    table = [dict(zip(columns, row)) for row in rows]
    assert table[0]["model"] == "Qwen2.5-Coder-0.5B-Instruct · 494 M"
    assert table[-1]["model"] == "Qwen2.5-Untied · 630 M"
    env = shipped[0]["environment"]
    assert table[0]["hardware"] == f"{env['cpu_model']} · {env['cpu_count']} cores · {env['torch_threads']} threads"


def test_chart_names_stay_short_and_tell_the_models_and_machines_apart(shipped):
    other = untied_630m(shipped[0])
    elsewhere = copy.deepcopy(shipped[0])
    elsewhere["environment"].update(device_name="Xeon 8480", cpu_model="Xeon 8480", torch_threads=8)
    labels = run_labels([shipped[0], other, elsewhere])
    assert labels[0].startswith("494 M · cpu · AMD EPYC") and labels[1].startswith("630 M · cpu · AMD EPYC")
    assert "Xeon 8480 · 8 threads" in labels[2]
    assert len(set(labels)) == 3
    assert all(len(label) <= 60 for label in labels), labels  # a few 14-character lines on a phone
    # the same model and machine: neither is repeated on the axis
    assert run_labels(shipped)[0] == "cpu · bfloat16"
    # the full account is in the hover text of every chart
    hover = hover_labels([shipped[0], other])[1]
    assert "Qwen2.5-Untied · 630 M" in hover and "AMD EPYC · 2 cores · 2 threads" in hover
    for fig in (charts.memory_figure([shipped[0], other]), charts.throughput_figure([shipped[0], other])):
        assert any("Qwen2.5-Untied · 630 M" in str(t.hovertext) for t in fig.data if t.type == "bar")
    layers = charts.layer_latency_figure([shipped[0], other])
    assert any("630 M" in (t.hovertemplate or "") for t in layers.data)


def test_labels_of_old_or_sparse_run_files_fall_back(shipped):
    old = copy.deepcopy(shipped[0])
    del old["environment"], old["model"]["parameters"], old["device_name"]
    assert model_label(old) == "Qwen2.5-Coder-0.5B-Instruct"
    assert hardware_label(old) == "cpu"
    gpu = copy.deepcopy(shipped[0])
    gpu["device"] = "cuda:0"
    gpu["environment"].update(device_name="NVIDIA H200", gpu_name="NVIDIA H200", gpu_memory_bytes=150_754_820_096)
    assert hardware_label(gpu) == "NVIDIA H200 · 151 GB"
    bare = {"device": "cpu", "dtype": "float32"}
    assert model_label(bare) == "unknown model" and run_labels([bare]) == ["cpu · float32"]
    assert headline_rows([old, bare])[1]


def test_a_new_run_records_the_models_name_and_the_usable_cpus(tiny_model_dir, tmp_path):
    import qwen2

    model = qwen2.load_model(tiny_model_dir, dtype="float32")
    run = profiling.profile_model(model, prompt_tokens=8, new_tokens=6, warmup=0)
    assert run["model"]["name"] == Path(tiny_model_dir).name
    assert run["environment"]["cpus_usable"] >= 1
    inst = run["instrumentation"]
    assert len(inst["decode_step_ms_hooked_list"]) == 6
    assert inst["overhead_fraction_decode_low"] <= inst["overhead_fraction_decode_high"]
    saved = profiling.load_run(profiling.save_run(run, tmp_path / "run.json"))  # the schema takes them
    assert saved["instrumentation"]["overhead_fraction_decode_low"] == inst["overhead_fraction_decode_low"]


# -- 2. the hooks' overhead ---------------------------------------------------------------------------
def test_a_negative_hook_overhead_is_shown_as_within_noise(shipped):
    run = copy.deepcopy(shipped[0])
    run["instrumentation"]["overhead_fraction_decode"] = -0.226  # the figure from the issue
    text = overhead_text(run)
    assert text.startswith("within noise") and "22.6" not in text
    row = dict(zip(*[headline_rows([run])[0], headline_rows([run])[1][0]]))
    assert row["hook overhead"] == text
    for key in ("overhead_fraction_decode_low", "overhead_fraction_decode_high", "decode_step_ms_hooked_list"):
        run["instrumentation"].pop(key, None)
    run["decode"].pop("step_ms_list")  # nothing to size the noise with: still never a negative figure
    assert overhead_text(run) == "within noise"


def test_the_overhead_interval_comes_from_both_runs_steps():
    noisy = [70.0, 71.0, 85.0, 72.0, 128.0, 70.5, 71.5, 90.0, 69.9, 73.0]
    assert median_ratio_interval(noisy, noisy)[0] < 0 < median_ratio_interval(noisy, noisy)[1]
    slower = [x * 1.3 for x in noisy]
    low, high = median_ratio_interval(noisy, slower)
    assert 0 < low <= 0.3 <= high
    assert median_ratio_interval([1.0], [1.0]) is None  # one step has no spread
    run = {"instrumentation": {"overhead_fraction_decode": 0.3, "overhead_fraction_decode_low": low,
                               "overhead_fraction_decode_high": high}}
    assert overhead_text(run).startswith("30.0 % (")
    run["instrumentation"]["overhead_fraction_decode_low"] = -0.01
    assert overhead_text(run).startswith("within noise (−1.0 to +")
    old = {"instrumentation": {"overhead_fraction_decode": 0.02}, "decode": {"step_ms_list": noisy}}
    assert overhead_text(old).startswith("within noise")  # an older file: sized by the clean run's noise


# -- 3. while a profile runs, and whose trace ----------------------------------------------------------
@pytest.fixture
def dash(tmp_path):
    from studio.dashboard import Dashboard
    from studio.hosting import Busy
    from studio.runs import RunStore

    class Engine:
        load = {"live": 0, "rows": 4, "waiting": 0}

    return Dashboard(None, RunStore(tmp_path / "runs"), Busy(Engine()))


def test_the_status_says_a_profile_is_starting_and_its_progress(dash):
    from studio.dashboard import Progress

    assert "Starting the profile" in dash.starting()
    text = dash.progress_status(Progress(0.42, "cpu: warm-up 1/1"))
    assert "42%" in text and "cpu: warm-up 1/1" in text and "Showing the reference runs" not in text
    dash.busy.what = "a profile is running"
    assert "a profile is running" in dash.starting()
    assert "Busy now: a profile is running" in dash.page_load().status


def test_comparing_several_runs_says_whose_trace_is_shown(dash, shipped):
    shown = dash.compare(dash.runs.shipped_values())
    first = profiling.run_label(shipped[0])
    assert shown.trace_of == first
    assert f"trace of **{first}**" in shown.status.replace("\\", "")
    assert "Qwen2.5-Coder-0.5B-Instruct · 494 M on AMD EPYC" in shown.status
    one = dash.compare(dash.runs.shipped_values()[1:])  # one run: its trace, nothing to say
    assert "trace of" not in one.status and one.trace_of == profiling.run_label(shipped[1])


# -- 5. the dark theme's buttons ------------------------------------------------------------------------
def test_the_active_decode_button_keeps_dark_text_on_its_light_face(shipped):
    # plotly paints the active button #F4FAFF whatever the theme: its text must stay dark on it
    for theme in ("light", "dark"):
        menu = charts.layer_latency_figure(shipped, theme=theme).layout.updatemenus[0]
        assert menu.font.color == "#222222" and menu.active == 0


# -- the page in a browser ------------------------------------------------------------------------------

# Boxes shown with nothing but Gradio's placeholder icon in them, and the layer chart's loading cover.
EMPTY_BOXES_JS = """() => [...document.querySelectorAll('.block')]
  .filter(b => b.checkVisibility() && b.querySelector(':scope .empty') && !b.querySelector('.js-plotly-plot, table'))
  .map(b => b.id || b.innerText.slice(0, 40) || b.className.slice(0, 40))"""
LAYER_COVER_JS = """() => { const w = document.querySelector('#layer-plot .wrap');
  return !!w && !w.classList.contains('hide') && parseFloat(getComputedStyle(w).opacity) > 0.5; }"""
BUTTONS_JS = """() => [...document.querySelectorAll('#layer-plot .updatemenu-button')].map(b => {
  const rgb = el => (getComputedStyle(el).fill.match(/[\\d.]+/g) || []).map(Number);
  const lum = c => (0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]) / 255;
  return [b.textContent.trim(), lum(rgb(b.querySelector('text'))), lum(rgb(b.querySelector('rect')))]; })"""


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    app = App(tmp_path_factory.mktemp("dashboard-app"), "--model", str(tiny_model_dir), "--dtype", "float32")
    yield app
    app.close()


def test_the_dashboard_while_and_after_a_profile_in_the_dark_theme(browser, server, shipped, artifacts):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(server.url + "?__theme=dark")
        page.locator("#chat-input textarea").wait_for(timeout=30_000)
        page.get_by_role("tab", name="Dashboard").click()
        status = page.locator("#profile-status")
        wait_until(lambda: "reference runs" in status.inner_text(), 60, "the shipped runs")
        wait_until(lambda: page.locator("#layer-plot .js-plotly-plot").count(), 30, "the layer chart")
        # the table names the model and the hardware; the first visit shows no empty box once the
        # page has drawn what it loads (the serving chart may come a moment after the others)
        table = page.locator("#kpi-table").inner_text()
        assert "Qwen2.5-Coder-0.5B-Instruct · 494 M" in table and "2 cores · 2 threads" in table, table
        try:
            wait_until(lambda: page.evaluate(EMPTY_BOXES_JS) == [], 20, "every box drawn or hidden")
        except AssertionError:
            assert page.evaluate(EMPTY_BOXES_JS) == []  # says which box stayed empty
        assert not page.locator("#run-downloads").is_visible()
        # the active "Decode" button in the dark theme: dark text on its light face
        buttons = page.evaluate(BUTTONS_JS)
        assert buttons and all(abs(text - face) >= 0.35 for _, text, face in buttons), buttons

        # a profile (a sweep makes it last a few seconds): the progress in the status, the old chart kept
        page.get_by_label("Context sweep").check()
        page.locator("#run-profile").click()
        seen, covered = [], []
        deadline = time.monotonic() + 240
        while "Saved" not in (text := status.inner_text()) and time.monotonic() < deadline:
            seen.append(text)
            covered.append(page.locator("#layer-plot .js-plotly-plot").count() == 0 or page.evaluate(LAYER_COVER_JS))
            time.sleep(0.1)
        assert "Saved" in status.inner_text(), seen[-3:]
        # from the profile's first word on (a look in the moment after the click may still catch the
        # old text under Gradio's "processing" overlay), the status only ever shows the profile
        started = [i for i, t in enumerate(seen) if "Profiling" in t or "Starting the profile" in t]
        assert started and started[0] <= 50, seen[:3]  # within seconds of the click
        during = seen[started[0]:]
        assert all("Profiling" in t or "Starting the profile" in t for t in during), \
            [t for t in during if "Profiling" not in t][:3]
        assert any("%" in t and "cpu:" in t for t in seen), seen[-3:]
        assert not any(covered), f"the layer chart was blank or covered in {sum(covered)} of {len(covered)} looks"

        # after it: one run, no sweep box left empty, the downloads shown, the trace's place explained
        wait_until(lambda: page.locator("#run-downloads").is_visible(), 30, "the downloads")
        time.sleep(1.0)
        assert page.evaluate(EMPTY_BOXES_JS) == []
        assert page.locator("#sweep-plot .js-plotly-plot").count() == 1  # asked for
        assert page.locator("#trace-note").is_visible() and not page.locator("#trace-ops").is_visible()
        page.screenshot(path=str(artifacts / "dashboard-after-profile-dark.png"), full_page=True)

        page.get_by_label("Context sweep").uncheck()  # no sweep: its box goes
        page.locator("#run-profile").click()
        wait_until(lambda: "Saved" in status.inner_text() and not page.locator("#sweep-plot").is_visible(),
                   240, "a run without a sweep")
        assert page.evaluate(EMPTY_BOXES_JS) == []
    finally:
        page.close()


def test_the_api_still_returns_plain_values(server, tmp_path):
    """The boxes are shown or hidden in a step of their own: /profile's outputs stay values."""
    client = server.client(tmp_path)
    out = client.predict(["cpu"], "auto", 16, 2, api_name="/profile")
    kpi, sweep, files, status = out[0], out[4], out[9], out[10]
    assert sweep is None and isinstance(files, list) and "Saved" in status
    assert "model" in kpi["headers"] and "hardware" in kpi["headers"]
    assert json.dumps(out)
