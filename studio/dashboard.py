"""The dashboard's logic, apart from the page: profile the served model (on a thread of its own, so a
cancel stops it), compare saved, shipped and uploaded runs, and draw their views."""

from __future__ import annotations

import importlib.util
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

import profiling
import profiling.charts
import profiling.report
import profiling.trace
from profiling.errors import RunFileError
from profiling.runfile import hardware_label, model_label, run_label, shipped_runs, shipped_serving_runs, trace_file
from profiling.trace_chart import trace_timeline

from .errors import VisitorError
from .hosting import Busy, LoadedModel, device_choices
from .runs import TRACES, RunStore
from .text import hide_paths, plain

VIEW_SLOTS = ("kpi", "layers", "memory", "throughput", "sweep", "baseline_note", "trace_ops", "timeline")
BASELINE_AVAILABLE = importlib.util.find_spec("transformers") is not None
BASELINE_MISSING = ("The transformers baseline needs the transformers package, which is not installed "
                    "here (pip install transformers).")


@dataclass
class Shown:
    """What the dashboard shows after a profile, a comparison or a page load."""

    views: list                      # one value per VIEW_SLOTS entry
    status: str
    runs: list[dict] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    selected: list[str] | None = None  # the run list's selection (None: leave it)
    trace_of: str | None = None        # the run whose trace the trace views show


@dataclass
class Progress:
    fraction: float
    desc: str


class ProfileCancelled(Exception):
    """The visitor cancelled the profile: it stops at its next step."""


class Dashboard:
    """Profiling runs, saved runs (this machine's and the shipped reference runs) and their views."""

    def __init__(self, lm: LoadedModel, runs: RunStore, busy: Busy):
        self.lm, self.runs, self.busy = lm, runs, busy

    # -- views -------------------------------------------------------------------------------
    def views(self, runs: list[dict], theme: str, paths) -> tuple[list, str | None]:
        """([KPI table, layer, memory, throughput, sweep figures, baseline note, top ops, timeline],
        the label of the run whose trace they show); None where there is nothing to show (no sweep,
        no trace)."""
        charts, theme = profiling.charts, "dark" if theme == "dark" else "light"

        def draw(fn, **kwargs):
            try:
                return fn(runs, theme=theme, **kwargs)
            except Exception:  # one broken figure must not hide the others
                traceback.print_exc()
                return None

        columns, rows = charts.headline_rows(runs)
        has_sweep = any(run.get("sweep") for run in runs)
        ops, timeline, trace_of = trace_views(runs, paths, theme)
        return [pd.DataFrame(rows, columns=columns),
                draw(charts.layer_latency_figure, phase="decode"), draw(charts.memory_figure),
                draw(charts.throughput_figure), draw(charts.sweep_figure) if has_sweep else None,
                baseline_note(runs), ops, timeline], trace_of

    def shown(self, runs: list[dict], theme: str, paths, status: str, **kwargs) -> Shown:
        """What to show for `runs`: their views, and the status, which says whose trace the trace
        views show when several runs are (they show one run's trace)."""
        views, trace_of = self.views(runs, theme, paths)
        if trace_of is not None and len(runs) > 1:
            status += (f"  \nThe trace views below show the trace of **{plain(trace_of)}** (the first of "
                       "these runs that has one).")
        return Shown(views, status, runs, trace_of=trace_of, **kwargs)

    # -- a profile -----------------------------------------------------------------------------
    def starting(self) -> str:
        """The status the moment Run is pressed, before the profile reports progress."""
        return self.busy.note() or ("Starting the profile: its progress shows here; the figures below "
                                    "stay until the new ones arrive.")

    @staticmethod
    def progress_status(now: Progress) -> str:
        return f"Profiling ({now.fraction:.0%}): {plain(now.desc)}. The figures below stay until the new ones arrive."

    def check_devices(self, devices) -> list[str]:
        """The devices to profile, each once; VisitorError for one this machine does not have."""
        devices = [devices] if isinstance(devices, str) else list(devices or [self.lm.device])
        devices = list(dict.fromkeys(str(d) for d in devices))  # the same device twice is one run
        known = [value for _, value in device_choices()]
        unknown = [d for d in devices if d not in known and d != self.lm.device]
        if unknown:
            raise VisitorError(f"Unknown device {plain(unknown[0])[:40]}: this machine has {', '.join(known)}.")
        return devices

    def profile(self, devices=None, dtype="auto", prompt_tokens=64, new_tokens=16, baseline=False,
                sweep=False, trace=False, theme="light") -> Iterator[Progress | Shown]:
        """Profile the model on each device, on a thread of its own: yields Progress while it runs, then
        what to show. Closing this generator (the page's or the API's cancel) stops the profile at its
        next step, and nothing of it is saved."""
        devices = self.check_devices(devices)
        if baseline and not BASELINE_AVAILABLE:
            raise VisitorError(BASELINE_MISSING)
        cancelled, now = threading.Event(), Progress(0.0, "waiting for the live replies to end")
        outcome: dict = {}

        def report(fraction, desc):
            if cancelled.is_set():
                raise ProfileCancelled
            now.fraction, now.desc = fraction, desc

        def work():
            try:
                outcome["value"] = self._profile(devices, dtype, int(prompt_tokens), int(new_tokens), baseline,
                                                 sweep, trace, theme, report)
            except ProfileCancelled:
                print("[qwen2-studio] profile cancelled: stopped, nothing saved", flush=True)
            except BaseException as exc:  # noqa: BLE001 - raised again on the caller's thread below
                outcome["error"] = exc

        worker = threading.Thread(target=work, name="qwen2-profile", daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                worker.join(0.25)
                yield Progress(now.fraction, now.desc)
        finally:
            cancelled.set()  # a no-op once the profile ended
        if "error" in outcome:
            raise outcome["error"]
        yield outcome["value"]

    def _profile(self, devices, dtype, prompt_tokens, new_tokens, baseline, sweep, trace, theme, report_to) -> Shown:
        stamp = self.runs.new_stamp()
        runs = []
        trace_dir = self.runs.folder / TRACES / stamp if trace else None
        with self.busy.hold("a profile is running"):
            report_to(0.0, "the model is free: profiling")  # a profile cancelled while it waited stops here
            for i, device in enumerate(devices):
                def report(fraction, desc="", i=i, device=device):
                    report_to((i + float(fraction)) / len(devices), f"{device}: {desc}")
                try:
                    model = self.lm.model_for(device, dtype)
                    runs.append(profiling.profile_model(
                        model, prompt_tokens=prompt_tokens, new_tokens=new_tokens, warmup=1,
                        baseline="transformers" if baseline else None,
                        sweep=sweep_lengths(model, new_tokens) if sweep else None,
                        trace_dir=str(trace_dir) if trace_dir else None, progress=report,
                        fast_path=self.lm.served_decode(model)))  # the chat's compiled step, per block too
                except ProfileCancelled:
                    raise
                except Exception as exc:  # bad settings, a missing device, OOM: say so and keep serving
                    traceback.print_exc()
                    raise VisitorError(f"Profiling on {device} failed: {hide_paths(str(exc))}") from None
        report_to(1.0, "saving the run")  # a profile cancelled in its last steps saves nothing either
        files = self.runs.save_profile(runs, devices, stamp)
        traces = [str(t) for t in (trace_file(run, path) for run, path in zip(runs, files)) if t]
        report_path = self.runs.folder / f"{stamp}-report.html"
        profiling.report.write_report(runs, report_path)
        status = f"Saved {', '.join(f'`{f.name}`' for f in files)} in the runs folder."
        if traces:
            status += ("  \nThe trace's top operations and timeline are below; the trace file is in the "
                       "downloads (open it at https://ui.perfetto.dev or chrome://tracing).")
        return self.shown(runs, theme, files, status, files=[str(f) for f in files] + [str(report_path)] + traces)

    # -- comparing runs ------------------------------------------------------------------------
    def compare(self, selected=None, uploads=(), theme="light") -> Shown:
        """Load saved runs and uploaded run files (validated, then kept in the runs folder) and compare
        them; the comparison's HTML report is written once per set of runs. `uploads`: (path, the name
        the visitor gave it or None)."""
        try:
            paths = [self.runs.path_of(value) for value in (selected or [])]
            paths += [self.runs.add_upload(Path(path), name) for path, name in uploads or ()]
            runs = self.runs.load(paths)
        except RunFileError as exc:
            raise VisitorError(f"This is not a run file the app can show: {exc}") from None
        if not runs:
            raise VisitorError("Choose saved runs, or upload run files (.json), to compare.")
        report_path = self.runs.report(runs, profiling.report.write_report)
        status = "Comparing " + "; ".join(f"{described(r)} (`{plain(p.name)}`)"
                                          for r, p in zip(runs, paths)) + "."
        return self.shown(runs, theme, paths, status, files=[str(report_path)],
                          selected=[self.runs.value_of(p) for p in paths])

    def page_load(self, theme="light") -> Shown | None:
        """The shipped reference runs, selected and shown (CPU vs GPU at first sight); None if none ship."""
        shipped = shipped_runs()
        if not shipped:
            return None
        try:
            runs = self.runs.load(shipped)
        except RunFileError as exc:  # a broken checkout: say so, keep the rest of the page
            return Shown([None] * len(VIEW_SLOTS), f"The shipped reference runs cannot be shown: {plain(str(exc))}",
                         selected=self.runs.shipped_values())
        status = ("Showing the reference runs shipped with the app: "
                  + "; ".join(described(r) for r in runs) + ". Run a profile to add this machine's.")
        if self.busy.what:  # a page opened (or reloaded) while the model is held: say so, not just "shipped"
            status += f"  \nBusy now: {plain(self.busy.what)}."
        return self.shown(runs, theme, shipped, status, selected=self.runs.shipped_values())


def described(run: dict) -> str:
    """A run in a status line: its label, then its model and hardware."""
    return f"**{plain(run_label(run))}** ({plain(model_label(run))} on {plain(hardware_label(run))})"


def shipped_note() -> str:
    """What the [shipped] runs are, honestly: the devices they were measured on, and how others get here."""
    kinds = sorted({"GPU" if str(load_or_none(p).get("device", "")).startswith("cuda") else "CPU"
                    for p in shipped_runs() if load_or_none(p)})
    what = f"{' and '.join(kinds)} runs" if kinds else "no runs yet"
    more = ("" if "GPU" in kinds else " A GPU's figures get here as a run file made on a GPU machine "
            "(`python -m profiling --device cuda --out run.json`), uploaded below.")
    return (f"[shipped] marks the reference runs that come with the app ({what}, measured on the project's "
            f"machines). Compare them with this machine's runs or with run files made elsewhere "
            f"(`python -m profiling`, or this tab's download).{more}")


def load_or_none(path) -> dict:
    try:
        return profiling.load_run(path)
    except RunFileError:
        return {}


def trace_views(runs, paths, theme) -> list:
    """The first traced run's top operations, timeline and label ([None, None, None] when no run has
    a readable trace)."""
    for run, path in zip(runs, paths):
        trace = trace_file(run, path)
        if trace is None:
            continue
        try:
            # hundredths of a ms in a total of seconds is noise, and a wide column on a phone
            ops = pd.DataFrame(profiling.trace.top_ops(trace, n=15)).round(
                {"total_ms": 2, "mean_ms": 4, "percent": 1})
            return [ops, trace_timeline(trace, theme=theme), run_label(run)]
        except Exception:
            traceback.print_exc()
    return [None, None, None]


def baseline_note(runs: list[dict]) -> str:
    """Says, next to the baseline bars, where transformers' greedy tokens differ from ours, and why."""
    notes = []
    for run in runs:
        base = run.get("baseline") or {}
        if base.get("tokens_match") is False:
            notes.append(f"⚠ **{plain(run_label(run))}**: transformers' greedy tokens differ from ours: "
                         f"{plain(profiling.charts.divergence_text(run))}")
        elif base.get("tokens_match"):
            notes.append(f"✓ **{plain(run_label(run))}**: transformers' greedy tokens equal ours.")
    return "  \n".join(notes)


def serving_view(theme="light"):
    """The shipped serving benchmarks: throughput and TTFT against concurrent users."""
    return profiling.charts.serving_figure(shipped_serving_runs(), theme="dark" if theme == "dark" else "light")


def sweep_lengths(model, new_tokens: int) -> list[int]:
    limit = min(model.config.max_position_embeddings - max(int(new_tokens), 16), 1024)
    return [n for n in (16, 32, 64, 128, 256, 512, 1024) if n <= limit]
