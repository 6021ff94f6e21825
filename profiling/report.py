"""A standalone HTML report comparing run files.

    python -m profiling.report run.cpu.json run.cuda.json -o report.html

The page embeds plotly.js once, so it opens offline in any browser.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import sys
from pathlib import Path

import plotly.io as pio

from . import charts
from .chart_style import byte_unit
from .atomic import write_atomically
from .errors import RunFileError
from .runfile import load_run, validate_run

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
.note { color: #666; font-size: 0.85em; }
"""


def _bytes(value) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    scale, unit = byte_unit(value)
    return f"{value / scale:,.2f} {unit}"


def _cell(value) -> str:
    if value is None:
        return "<td>–</td>"
    if isinstance(value, str):  # a label, or the hook overhead's interval / "within noise"
        return f"<td class='l'>{html.escape(value)}</td>"
    return f"<td>{value:,}</td>"


def _summary_table(runs: list[dict]) -> str:
    """The headline figures (charts.headline_rows: run, figures, model, hardware), one row per run."""
    columns, rows = charts.headline_rows(runs)
    head = "".join(f"<th class='l'>{html.escape(c)}</th>" if isinstance(v, str) else f"<th>{html.escape(c)}</th>"
                   for c, v in zip(columns, rows[0] if rows else columns))
    body = ["<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows]
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _environment_table(runs: list[dict], labels: list[str]) -> str:
    keys = ["device_name", "cpu_model", "cpu_count", "cpus_usable", "torch_threads", "cpu_kernels", "load_average",
            "gpu_name", "gpu_memory_bytes", "torch_version", "cuda_version", "python_version", "timestamp"]
    head = "<th class='l'>run</th>" + "".join(f"<th class='l'>{k}</th>" for k in keys) + \
        "<th class='l'>git commit</th><th class='l'>timer</th>"
    rows = []
    for run, label in zip(runs, labels):
        env = run.get("environment") or {}
        vals = [env.get(k) for k in keys]
        vals[keys.index("gpu_memory_bytes")] = _bytes(env.get("gpu_memory_bytes")) \
            if env.get("gpu_memory_bytes") else None
        git = env.get("git") or {}
        commit = (git.get("commit") or "")[:12] + (" (dirty)" if git.get("dirty") else "")
        vals += [commit or None, (run.get("instrumentation") or {}).get("timer")]
        rows.append("<tr><td class='l'>" + html.escape(label) + "</td>" + "".join(
            f"<td class='l'>{html.escape('–' if v is None else str(v))}</td>" for v in vals)
            + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def render_report(runs: list[dict], title: str = "Qwen2 Studio profiling report") -> str:
    """The report as one HTML string."""
    for i, run in enumerate(runs):
        validate_run(run, where=f"run {i + 1}")
    labels = charts.run_labels(runs)
    figures = [
        ("Throughput", charts.throughput_figure(runs)),
        ("Per-layer latency (use the buttons to switch decode / prefill)",
         charts.layer_latency_figure(runs, "decode")),
        ("Memory", charts.memory_figure(runs)),
    ]
    if any(r.get("sweep") for r in runs):
        figures.append(("Context sweep", charts.sweep_figure(runs)))
    parts = []
    for i, (heading, fig) in enumerate(figures):
        div = pio.to_html(fig, full_html=False, include_plotlyjs="inline" if i == 0 else False,
                          default_height="480px")
        parts.append(f"<h2>{html.escape(heading)}</h2>{div}")
    notes = sorted({str(r.get("decode_path")) for r in runs if r.get("decode_path")})
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="note">{len(runs)} run(s); generated {now}.</p>
<h2>Summary</h2>
{_summary_table(runs)}
<p class="note">Decode tok/s is the median over steps of the clean (hook-free) run; % roofline is
(weights + KV bytes read per token) ÷ step time ÷ the device's bandwidth limit. Peak MB (model) is
the process's peak less its baseline (what it held besides the weights before the run). Hook
overhead is the hooked run's median step time against the clean run's, with its 95% bootstrap
interval from both runs' steps; "within noise" where that interval reaches zero.</p>
{''.join(parts)}
<h2>Environment</h2>
{_environment_table(runs, labels)}
{''.join(f'<p class="note">{html.escape(n)}</p>' for n in notes)}
</body></html>
"""


def write_report(runs: list[dict], path, title: str = "Qwen2 Studio profiling report") -> Path:
    """Write the standalone HTML report for `runs` to `path`; return the path."""
    path = Path(path)
    text = render_report(runs, title)
    try:
        write_atomically(path, text)
    except OSError as exc:
        raise OSError(f"cannot write report {path}: {exc.strerror or exc}") from None
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m profiling.report",
                                     description="Write a standalone HTML report comparing runs.")
    parser.add_argument("runs", nargs="+", metavar="RUN.json", help="run files from profiling.bench")
    parser.add_argument("-o", "--out", default="report.html", help="output HTML (report.html)")
    parser.add_argument("--title", default="Qwen2 Studio profiling report")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(p) for p in args.runs]
        out = write_report(runs, args.out, args.title)
    except (RunFileError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
