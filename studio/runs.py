"""The app's run files: this machine's profiles and visitors' uploads in one bounded folder, beside
the reference runs shipped under docs/runs/.

Every file a visitor can get into the folder is a validated run (profiling.load_run) copied
atomically under a safe name, an identical upload is stored once, a comparison's report is written
once per set of runs, and the folder is capped: past `max_files` entries or `max_bytes`, the oldest
go first (a profile's trace folder counts as one entry). Shipped runs live elsewhere and are never
touched. A bad file found in the folder (put there by hand, or by an older version) is skipped with
a note in the log: it never breaks the page or another visitor's profile.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from datetime import datetime
from pathlib import Path

from profiling.atomic import write_atomically
from profiling.errors import RunFileError
from profiling.runfile import MAX_RUN_BYTES, load_run, run_label, save_run, shipped_runs

SHIPPED = "shipped/"  # a choice's value prefix for a reference run under docs/runs/
TRACES = "traces"     # profiles' trace folders, one per profile
STALE_TEMP_S = 3600   # a hidden temp file this old was left by a killed write


def safe_name(text: str, limit: int = 80) -> str:
    """`text` with only letters, digits, '-' and '.' (others become '-'), at most `limit` long."""
    name = "".join(c if c.isascii() and (c.isalnum() or c in "-.") else "-" for c in str(text))
    return name.strip(".-")[:limit] or "run"


class RunStore:
    def __init__(self, folder: Path, max_files: int = 200, max_bytes: int = 500 * 2**20):
        self.folder, self.max_files, self.max_bytes = Path(folder), int(max_files), int(max_bytes)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._labels: dict[Path, tuple[tuple[int, int], str | None]] = {}

    # -- reading -------------------------------------------------------------------------------
    def label(self, path: Path) -> str | None:
        """The run's label, None for a file that is not a valid run (logged once per version)."""
        stat = path.stat()
        version = (stat.st_mtime_ns, stat.st_size)
        cached = self._labels.get(path)
        if cached is not None and cached[0] == version:
            return cached[1]
        try:
            label = run_label(load_run(path, where=path.name))
        except RunFileError as exc:
            print(f"[qwen2-studio] skipped a file in the runs folder: {exc}", flush=True)
            label = None
        self._labels[path] = (version, label)
        return label

    def saved(self) -> list[Path]:
        """This machine's run files, newest first."""
        return sorted(self.folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)

    def choices(self, newest: int = 100) -> list[tuple[str, str]]:
        """(label, value) per run: the shipped reference runs, then the `newest` valid saved ones."""
        choices = [(f"[shipped] {self.label(p) or p.name}", SHIPPED + p.name) for p in shipped_runs()]
        for path in self.saved():
            if len(choices) >= newest + len(shipped_runs()):
                break
            try:
                label = self.label(path)
            except OSError:  # pruned meanwhile
                continue
            if label is not None:
                choices.append((f"{path.name} · {label}", path.name))
        return choices

    def shipped_values(self) -> list[str]:
        return [SHIPPED + p.name for p in shipped_runs()]

    def value_of(self, path: Path) -> str:
        return path.name if path.parent == self.folder else SHIPPED + path.name

    def path_of(self, value: str) -> Path:
        """The file a choice names: a shipped run, or a file directly in the folder (no other path)."""
        value = str(value)
        if value.startswith(SHIPPED):
            shipped = {p.name: p for p in shipped_runs()}
            name = value[len(SHIPPED):]
            if name not in shipped:
                raise RunFileError(f"there is no shipped run {safe_name(name)}")
            return shipped[name]
        return self.folder / Path(value).name

    def load(self, paths) -> list[dict]:
        """The runs in `paths`; RunFileError names the file (never a server path) and its fault."""
        return [load_run(path, where=path.name) for path in paths]

    # -- writing -------------------------------------------------------------------------------
    def new_stamp(self) -> str:
        """A date-time prefix for a profile's files that no earlier file uses."""
        base = stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        n = 1
        while any(self.folder.glob(f"{stamp}-*")) or (self.folder / TRACES / stamp).exists():
            n += 1
            stamp = f"{base}-{n}"
        return stamp

    def save_profile(self, runs: list[dict], names: list[str], stamp: str) -> list[Path]:
        """Save a profile's runs as STAMP-NAME.json, one name per run (made unique)."""
        files, used = [], set()
        for run, name in zip(runs, names):
            name = safe_name(name, 40)
            unique, n = name, 1
            while unique in used:
                n += 1
                unique = f"{name}-{n}"
            used.add(unique)
            files.append(save_run(run, self.folder / f"{stamp}-{unique}.json"))
        self.prune(keep=files)
        return files

    def add_upload(self, src: Path, name: str | None = None) -> Path:
        """Validate an uploaded run file and store it (or find the identical one already stored)."""
        src = Path(src)
        shown = safe_name(Path(name or src.name).name, 120)
        load_run(src, where=shown)  # checks the size before reading, then the typed schema
        digest = _sha256(src)
        for path in self.folder.glob("*.json"):
            if path.stat().st_size == src.stat().st_size and _sha256(path) == digest:
                path.touch()  # in use again: the last to be pruned
                return path
        stem = safe_name(Path(shown).stem, 80)
        dest = self.folder / f"{stem}.json"
        n = 1
        while dest.exists():
            n += 1
            dest = self.folder / f"{stem}-{n}.json"
        write_atomically(dest, copy_from=src)
        self.prune(keep=[dest])
        return dest

    def report(self, runs: list[dict], write) -> Path:
        """The HTML report comparing `runs`, written by `write(runs, path)` once per set of runs."""
        key = hashlib.sha256(json.dumps(runs, sort_keys=True, default=str).encode()).hexdigest()[:16]
        path = self.folder / f"compare-{key}.html"
        if path.is_file():
            path.touch()
        else:
            write(runs, path)
            self.prune(keep=[path])
        return path

    def prune(self, keep=()) -> list[Path]:
        """Remove the oldest entries past the caps (never those in `keep`); returns what went."""
        keep = {Path(p).resolve() for p in keep}
        entries = []
        now = time.time()
        for path in self.folder.iterdir():
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                if now - path.stat().st_mtime > STALE_TEMP_S:
                    path.unlink(missing_ok=True)
                continue
            if path.is_file() and path.suffix in (".json", ".html"):
                entries.append((path.stat().st_mtime, path, path.stat().st_size))
        traces = self.folder / TRACES
        if traces.is_dir():
            for folder in traces.iterdir():
                if folder.is_dir():
                    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
                    entries.append((folder.stat().st_mtime, folder, size))
        entries.sort(key=lambda e: e[0])
        count, total = len(entries), sum(e[2] for e in entries)
        removed = []
        for _, path, size in entries:
            if count <= self.max_files and total <= self.max_bytes:
                break
            if path.resolve() in keep:
                continue
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            self._labels.pop(path, None)
            removed.append(path)
            count, total = count - 1, total - size
        if removed:
            print(f"[qwen2-studio] runs folder over its cap ({self.max_files} entries, "
                  f"{self.max_bytes // 2**20} MB): removed the {len(removed)} oldest", flush=True)
        return removed


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["RunStore", "SHIPPED", "safe_name", "MAX_RUN_BYTES"]
