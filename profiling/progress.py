"""Progress reporting: a callable(fraction, desc) for the app, a tqdm bar for the CLI."""

from __future__ import annotations

from typing import Callable

ProgressFn = Callable[[float, str], None]


class Plan:
    """Counts units of work done out of a planned total and reports the fraction."""

    def __init__(self, callback: ProgressFn | None, total: int):
        self.callback = callback
        self.total = max(int(total), 1)
        self.done = 0
        self.desc = ""

    def stage(self, desc: str) -> None:
        self.desc = desc
        self._report()

    def advance(self, units: int = 1) -> None:
        self.done = min(self.done + units, self.total)
        self._report()

    def heartbeat(self) -> None:
        """Report again without advancing: for work the plan did not count (the fast path's runs), so
        that a callback which stops the run (the app's cancel) is heard there too."""
        self._report()

    def finish(self, desc: str = "done") -> None:
        self.done, self.desc = self.total, desc
        self._report()

    def _report(self) -> None:
        if self.callback is not None:
            self.callback(self.done / self.total, self.desc)


class TqdmProgress:
    """A progress callable backed by a tqdm bar on stderr (percent units)."""

    def __init__(self, desc: str = "profiling", disable: bool | None = None):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=100, desc=desc, unit="%", leave=True, disable=disable,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")
        self.prefix = desc

    def __call__(self, fraction: float, desc: str) -> None:
        target = round(fraction * 100, 1)
        if target > self.bar.n:
            self.bar.update(target - self.bar.n)
        self.bar.set_description_str(f"{self.prefix}: {desc}" if desc else self.prefix)

    def close(self) -> None:
        self.bar.close()
