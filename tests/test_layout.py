"""The page's layout in a real browser (Debian's chromium driven by Playwright): at 420 px (a phone)
and 1400 px (a desktop), light and dark, with one and three runs compared, and the Inside tab after a
prompt.

Asserted from the DOM, chart by chart (every `.js-plotly-plot` shown): no two text boxes of titles,
subplot titles, legend entries, axis titles, tick labels, buttons and values written on the bars
overlap (1-2 px touches allowed), no value is struck by a marker, a whisker or another bar, and no
text is cut by the chart's edge; buttons keep their text legible (the active "Decode" too). The
headline table's (and the trace's top operations') header cells break only between words, and every
column can be read: at 1400 px all of them fit in the table's width; at 420 px the first column
leaves room for others and the last one is reachable by scrolling the table (the page never scrolls
sideways). In dark mode every chart is drawn on the page's dark background with light text, and no
table cell is light. A test without a browser checks what the figures promise at any width.

Screenshots of each tab at each width and theme go to $ARTIFACTS_DIR (default: ./artifacts).
"""

from __future__ import annotations

import json
import time

import pytest

from tests.browser_fixtures import wait_until
from tests.helpers import ROOT, App

WIDTHS = (420, 1400)
THEMES = ("light", "dark")
TOUCH_PX = 2.0  # boxes may touch by this much (glyph boxes are a little taller than the ink)
THIRD_RUN = "other-machine-cpu-int8.json"
SHIPPED_BF16 = "[shipped] cpu · bfloat16 · 64+32"  # the run picker's labels of docs/runs/*.json
SHIPPED_INT8 = "[shipped] cpu · bfloat16 · int8"

# Every text a reader needs in each chart shown, its box on the page, and what collides: pairs of
# overlapping texts, values struck by markers, whiskers or other bars, texts cut by the chart's edge.
PLOT_ISSUES_JS = r"""
(touch) => {
  const shown = el => el.checkVisibility ? el.checkVisibility() : el.offsetParent !== null;
  const overlap = (a, b) => Math.min(a.right, b.right) - Math.max(a.left, b.left) > touch &&
                            Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top) > touch;
  const inside = (a, b) => a.left >= b.left - touch && a.right <= b.right + touch &&
                           a.top >= b.top - touch && a.bottom <= b.bottom + touch;
  const rgba = text => { const n = (text.match(/[\d.]+/g) || ['0', '0', '0', '0']).map(Number);
                         return [n[0], n[1], n[2], n.length > 3 ? n[3] : 1]; };
  const luminance = c => (0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]) / 255;
  const box = el => { const r = el.getBoundingClientRect();
                      return {left: r.left, right: r.right, top: r.top, bottom: r.bottom,
                              width: r.width, height: r.height}; };
  const kinds = [
    ['title', '.g-gtitle text'], ['annotation', '.annotation-text'], ['legend', '.legendtext'],
    ['axis title', '.infolayer g[class^="g-x"][class$="title"] text, .infolayer g[class^="g-y"][class$="title"] text'],
    ['tick', '.xaxislayer-above text, .yaxislayer-above text'],
    ['colorbar', '.colorbar text'], ['button', '.updatemenu-item-text'],
    ['value', '.bartext, .textpoint text']];
  const report = [];
  const plots = [...document.querySelectorAll('.js-plotly-plot')].filter(shown);
  plots.forEach((plot, n) => {
    const name = (plot.querySelector('.gtitle')?.textContent || `chart ${n + 1}`).slice(0, 50);
    const edge = box(plot.querySelector('.main-svg') || plot);  // the figure as drawn
    const texts = [];
    for (const [kind, selector] of kinds) {
      for (const el of plot.querySelectorAll(selector)) {
        const text = (el.textContent || '').trim();
        const r = box(el);
        if (!text || r.width < 0.5 || r.height < 0.5 || !shown(el)) continue;
        texts.push({kind, text: text.slice(0, 40), r});
      }
    }
    const issues = [];
    for (let i = 0; i < texts.length; i++) {
      const a = texts[i];
      if (!inside(a.r, edge))
        issues.push(`${a.kind} "${a.text}" cut by the chart's edge`);
      for (let j = i + 1; j < texts.length; j++) {
        const b = texts[j];
        if (overlap(a.r, b.r)) issues.push(`${a.kind} "${a.text}" overlaps ${b.kind} "${b.text}"`);
      }
    }
    const marks = [...plot.querySelectorAll('.scatterlayer .points path, .errorbar path')]
      .filter(shown).map(box).filter(r => r.width > 0.5 || r.height > 0.5);
    const bars = [...plot.querySelectorAll('.barlayer .point path')].filter(shown).map(box)
      .filter(r => r.width > 0.5 && r.height > 0.5);
    for (const v of texts.filter(t => t.kind === 'value')) {
      if (marks.some(m => overlap(v.r, m))) issues.push(`value "${v.text}" struck by a marker or whisker`);
      const own = bars.find(b => inside(v.r, b));
      if (bars.some(b => b !== own && overlap(v.r, b))) issues.push(`value "${v.text}" runs into a bar`);
    }
    const tableTexts = [...plot.querySelectorAll('.table .cell-text')];  // a go.Table's cells
    for (const cell of tableTexts) {
      const r = box(cell);
      if (r.width > 0.5 && !inside(r, edge))
        issues.push(`table text "${cell.textContent.slice(0, 40)}" cut by the chart's edge`);
    }
    for (const button of plot.querySelectorAll('.updatemenu-button')) {  // e.g. Decode / Prefill
      const ink = rgba(getComputedStyle(button.querySelector('text')).fill);
      const face = rgba(getComputedStyle(button.querySelector('rect')).fill);
      if (Math.abs(luminance(ink) - luminance(face)) < 0.35)
        issues.push(`button "${button.textContent.trim()}" has too little contrast (${ink} on ${face})`);
    }
    let under = plot, behind = null;  // the colour the chart is drawn on
    while (under && !behind) {
      const c = rgba(getComputedStyle(under).backgroundColor);
      if (c[3] > 0.5) behind = c;
      under = under.parentElement;
    }
    const svg = rgba(getComputedStyle(plot.querySelector('.main-svg')).backgroundColor);
    const title = plot.querySelector('.gtitle');
    const cells = [...plot.querySelectorAll('.table .cellRect')].map(r => rgba(getComputedStyle(r).fill));
    report.push({name, texts: texts.length + tableTexts.length, issues, width: edge.width, height: edge.height,
                 behind: luminance(behind || [255, 255, 255, 1]), svg: svg[3] > 0.5 ? luminance(svg) : null,
                 title: title ? luminance(rgba(getComputedStyle(title).fill)) : null,
                 cells: cells.map(c => c[3] > 0.5 ? luminance(c) : null)});
  });
  return report;
}
"""

# The headline table: header words broken across lines, and each column's place in the table's
# visible width (its scrolling container).
TABLE_JS = """
(selector) => {
  const block = document.querySelector(selector);
  const headers = [...block.querySelectorAll('thead th')].filter(th => th.getBoundingClientRect().width > 0);
  const broken = [];
  for (const th of headers) {
    const walker = document.createTreeWalker(th, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      for (const m of node.data.matchAll(/\\S+/g)) {
        const range = document.createRange();
        range.setStart(node, m.index);
        range.setEnd(node, m.index + m[0].length);
        const tops = new Set([...range.getClientRects()].filter(r => r.width > 0).map(r => Math.round(r.top)));
        if (tops.size > 1) broken.push(m[0]);
      }
    }
  }
  let scroller = headers.length ? headers[0].parentElement : block;
  while (scroller && scroller !== block.parentElement) {
    const style = getComputedStyle(scroller);
    if (/(auto|scroll)/.test(style.overflowX) && scroller.scrollWidth > scroller.clientWidth + 1) break;
    scroller = scroller.parentElement;
  }
  const frame = (scroller && scroller !== block.parentElement ? scroller : block).getBoundingClientRect();
  const cols = headers.map(th => { const r = th.getBoundingClientRect();
    return {text: th.innerText.trim(), left: r.left, right: r.right, width: r.width}; });
  return {broken, frame: {left: frame.left, right: frame.right, width: frame.width},
          scrolls: !!(scroller && scroller !== block.parentElement),
          scrollWidth: scroller && scroller !== block.parentElement ? scroller.scrollWidth : frame.width,
          pageWidth: document.documentElement.scrollWidth, cols};
}
"""


# -- the figures themselves (no browser) -----------------------------------------------------------
def three_runs() -> list[dict]:
    import profiling
    from profiling.runfile import shipped_runs

    runs = [profiling.load_run(p) for p in shipped_runs()]
    return runs + [json.loads(json.dumps(runs[-1]))] if runs else []


@pytest.mark.parametrize("n_runs", [1, 3])
def test_figures_stack_their_panels_and_fit_a_phone(n_runs):
    """What holds at any width, read from the figures: one panel per row, tick labels never rotated,
    the legend on the figure's bottom edge, a set height, title and legend lines short enough for a
    360 px chart, and runs named on horizontal bars' axis (never as rotated category labels)."""
    from profiling import chart_style, charts
    from profiling.trace_chart import trace_timeline
    from profiling.runfile import shipped_runs, shipped_serving_runs, trace_file

    runs = three_runs()[:n_runs]
    if not runs:
        pytest.skip("no shipped runs under docs/runs/")
    figures = [charts.layer_latency_figure(runs), charts.memory_figure(runs), charts.throughput_figure(runs),
               charts.sweep_figure(runs), charts.serving_figure(shipped_serving_runs())]
    trace = trace_file(runs[0], shipped_runs()[0])
    if trace:
        figures.append(trace_timeline(trace))
    for fig in figures:
        layout = fig.layout
        name = layout.title.text
        assert layout.height and layout.legend.yref == "container" and layout.legend.y == 0, name
        for axis in [a for k in dir(layout) if k.startswith(("xaxis", "yaxis")) and (a := layout[k])]:
            if axis.domain and axis.anchor and str(axis.anchor).startswith("y") and axis.domain != (0, 1):
                pytest.fail(f"{name}: a panel beside another ({axis.domain})")
            assert axis.tickangle in (None, 0), f"{name}: rotated tick labels"
        assert all(len(line) <= chart_style.TITLE_CHARS for line in name.split("<br>")), name
        for trace_ in fig.data:
            if trace_.showlegend is not False and trace_.name:
                assert all(len(line) <= 44 for line in trace_.name.split("<br>")), trace_.name
    for fig in figures[1:3]:  # memory and throughput: runs are rows, named in short lines
        assert all(b.orientation == "h" for b in fig.data if b.type == "bar")
        assert all(len(line) <= chart_style.TICK_CHARS or " · " not in line
                   for text in fig.layout.yaxis.ticktext for line in text.split("<br>"))


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """The app on the tiny model; its runs folder holds a third run (the shipped int8 run, as if
    measured on another machine), so three runs can be compared without profiling."""
    work = tmp_path_factory.mktemp("layout-app")
    run = json.loads((ROOT / "docs" / "runs" / "cpu-int8.json").read_text())
    run["environment"]["device_name"] = "Another machine"
    run["seed"] = 7
    (work / "runs").mkdir()
    (work / "runs" / THIRD_RUN).write_text(json.dumps(run))
    app = App(work, "--model", str(tiny_model_dir), "--dtype", "float32")
    yield app
    app.close()


def open_page(browser, server, theme: str, width: int):
    page = browser.new_page(viewport={"width": width, "height": 1000})
    page.goto(server.url + ("?__theme=dark" if theme == "dark" else ""))
    page.locator("#chat-input textarea").wait_for(timeout=30_000)
    return page


def settle(page, width: int):
    """Resize to `width` and wait for the charts to redraw (plotly's resize is debounced)."""
    page.set_viewport_size({"width": width, "height": 1000})
    time.sleep(0.8)
    page.evaluate("() => Promise.all([...document.querySelectorAll('.js-plotly-plot')]"
                  ".filter(p => p.offsetParent).map(p => window.Plotly && window.Plotly.Plots.resize(p)))")
    time.sleep(0.4)


def plot_issues(page) -> list[dict]:
    return page.evaluate(PLOT_ISSUES_JS, TOUCH_PX)


def assert_charts_read_well(page, theme: str, where: str, expect: int):
    report = plot_issues(page)
    assert len(report) >= expect, f"{where}: {len(report)} charts shown, expected {expect}"
    problems = [f"{chart['name']}: {issue}" for chart in report for issue in chart["issues"]]
    assert not problems, f"{where}:\n" + "\n".join(problems)
    for chart in report:
        assert chart["texts"] > 3, f"{where}: {chart['name']} shows no text"
        if theme == "dark":  # drawn on the dark page, light text, no light table cells
            assert chart["behind"] < 0.35 and (chart["svg"] is None or chart["svg"] < 0.35), \
                f"{where}: {chart['name']} has a light background in dark mode: {chart}"
            assert chart["title"] is None or chart["title"] > 0.6, f"{where}: {chart['name']}'s title is dark"
            light = [c for c in chart["cells"] if c is not None and c > 0.5]
            assert not light, f"{where}: {chart['name']} has {len(light)} light table cells in dark mode"


# -- the dashboard ---------------------------------------------------------------------------------
def compare(page, values: list[str]):
    """Select exactly the runs whose choice labels contain `values` in the run picker, press Compare
    and wait for the comparison's table."""
    picker = page.locator("#saved-runs")
    clear = picker.locator(".remove-all")
    if clear.count():
        clear.first.click()
    box = picker.locator("input")
    for value in values:
        box.scroll_into_view_if_needed()
        box.click()
        box.fill(value)
        option = page.get_by_role("option").filter(has_text=value).first
        option.wait_for(timeout=10_000)
        option.dispatch_event("mousedown")  # the list may open off-screen under a long page
        option.dispatch_event("click")
    page.keyboard.press("Escape")
    chosen = picker.locator(".token").all_inner_texts()
    assert len(chosen) == len(values) and all(any(v in c for c in chosen) for v in values), chosen
    status = page.locator("#profile-status")
    before = status.inner_text()
    page.locator("#compare-runs").click()
    wait_until(lambda: "Comparing" in status.inner_text() and status.inner_text() != before
               and rows(page) == len(values), 60, f"the comparison of {len(values)} runs")
    time.sleep(1.0)  # the charts draw after the table


def rows(page) -> int:
    """The headline table's rows (Gradio draws them as div.virtual-row)."""
    return page.locator("#kpi-table .virtual-row").count()


def table_report(page, selector: str = "#kpi-table") -> dict:
    return page.evaluate(TABLE_JS, selector)


def assert_table_reads_well(page, width: int, where: str, selector: str = "#kpi-table", columns: int = 10):
    """The table's header words whole, and every column readable (see the module's docstring)."""
    table = table_report(page, selector)
    where = f"{where}, {selector}"
    assert not table["broken"], f"{where}: header words broken mid-word: {table['broken']}"
    cols, frame = table["cols"], table["frame"]
    assert len(cols) >= columns, f"{where}: {len(cols)} header cells"
    assert table["pageWidth"] <= width, f"{where}: the page scrolls sideways ({table['pageWidth']}px)"
    if width >= 1400:  # every column in view, the last one included, without scrolling
        assert cols[-1]["right"] <= frame["right"] + 1, f"{where}: the last column is cut: {table}"
    else:  # the first column leaves room for others; the table (not the page) scrolls to the last
        assert cols[0]["width"] <= 0.5 * frame["width"], f"{where}: the first column takes the width: {table}"
        visible = [c for c in cols if c["right"] <= frame["right"] + 1]
        assert len(visible) >= 3, f"{where}: only {len(visible)} columns in view: {table}"
        reach = frame["left"] + table["scrollWidth"]
        assert cols[-1]["right"] <= reach + 1, f"{where}: the last column cannot be reached: {table}"


@pytest.mark.parametrize("theme", THEMES)
def test_dashboard_reads_well_at_phone_and_desktop_widths(browser, server, artifacts, theme):
    page = open_page(browser, server, theme, 1400)
    try:
        page.get_by_role("tab", name="Dashboard").click()
        wait_until(lambda: rows(page) >= 2, 60, "the shipped runs")
        for label, values in (("1-run", [SHIPPED_BF16]), ("3-runs", [SHIPPED_BF16, SHIPPED_INT8, THIRD_RUN])):
            compare(page, values)
            for width in WIDTHS:
                settle(page, width)
                where = f"dashboard, {label}, {width}px, {theme}"
                page.screenshot(path=str(artifacts / f"layout-dashboard-{label}-{width}-{theme}.png"),
                                full_page=True)
                # layers, throughput, memory, context sweep, trace timeline, serving
                assert_charts_read_well(page, theme, where, expect=6)
                assert_table_reads_well(page, width, where)  # the headline figures
                assert_table_reads_well(page, width, where, "#trace-ops", columns=5)  # the trace's top ops
            settle(page, 1400)
    finally:
        page.close()


# -- Inside the model ------------------------------------------------------------------------------
@pytest.mark.parametrize("theme", THEMES)
def test_inside_reads_well_at_phone_and_desktop_widths(browser, server, artifacts, theme):
    page = open_page(browser, server, theme, 1400)
    try:
        page.get_by_role("tab", name="Inside the model").click()
        page.locator("#inside-prompt textarea").fill("The capital of France is")
        page.locator("#inside-run").click()
        wait_until(lambda: "Step 0" in page.locator("#inside-summary").inner_text(), 60, "the prompt's views")
        for view in ("#inside-attention", "#inside-candidates", "#inside-lens", "#inside-path"):
            wait_until(lambda view=view: page.locator(f"{view} .js-plotly-plot").count(), 30, view)
        for width in WIDTHS:
            settle(page, width)
            where = f"inside, {width}px, {theme}"
            page.screenshot(path=str(artifacts / f"layout-inside-{width}-{theme}.png"), full_page=True)
            assert_charts_read_well(page, theme, where, expect=4)
            width_now = page.evaluate("document.documentElement.scrollWidth")
            assert width_now <= width, f"{where}: the page scrolls sideways ({width_now}px)"
    finally:
        page.close()


# -- the chat ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("theme", THEMES)
def test_chat_reads_well_at_phone_and_desktop_widths(browser, server, artifacts, theme):
    """A turn with its statistics, at each width: nothing scrolls sideways, the message box and the
    statistics stay inside the page, and the reply is not hidden under the box."""
    page = open_page(browser, server, theme, 1400)
    try:
        box = page.locator("#chat-input textarea")
        box.fill("Hello there!")
        box.press("Enter")
        wait_until(lambda: "new token" in page.locator("#chat-stats").inner_text()
                   and page.locator("#chat-input .stop-button").is_hidden(), 60, "the reply's statistics")
        for width in WIDTHS:
            settle(page, width)
            where = f"chat, {width}px, {theme}"
            page.screenshot(path=str(artifacts / f"layout-chat-{width}-{theme}.png"), full_page=True)
            width_now = page.evaluate("document.documentElement.scrollWidth")
            assert width_now <= width, f"{where}: the page scrolls sideways ({width_now}px)"
            for selector in ("#chatbot", "#chat-input", "#chat-stats"):
                right = page.locator(selector).evaluate("el => el.getBoundingClientRect().right")
                assert right <= width + 1, f"{where}: {selector} runs past the page's edge ({right}px)"
            bubbles = page.locator("#chatbot .message")
            assert bubbles.count() >= 2, f"{where}: the turn is not shown"
    finally:
        page.close()
