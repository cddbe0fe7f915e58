"""Progress on stderr: timestamped lines, and for counted work (perplexity windows, tuning
candidates, layers, heads) the stage, its percentage and the time since it began.

On a terminal counted work is one live bar per stage; elsewhere (logs, CI, pipes) it is a
line each time another tenth is done, so a log shows how far a killed job had come without
one line per step. Code that reports takes any `Callable[[str], None]` and calls
`advance()`; a plain callable gets the same tenths as lines.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Bar

Report = Callable[[str], None]


def _tenth(done: int, total: int) -> int:
    return 10 * done // total if total > 0 else 10


def _counted(stage: str, done: int, total: int, detail: str) -> str:
    percent = 100 * done // total if total > 0 else 100
    return f"{stage}: {done}/{total} ({percent}%)" + (f", {detail}" if detail else "")


class Progress:
    """The CLI's progress reporter; `quiet` (-q) prints nothing."""

    def __init__(self, console: Console, quiet: bool = False) -> None:
        self.console = console
        self.quiet = quiet
        self.start = time.perf_counter()
        self._stage: str | None = None
        self._stage_start = 0.0
        self._tenth = -1
        self._bar: Bar | None = None
        _reporters.append(self)

    def __call__(self, message: str) -> None:
        if not self.quiet:
            console = self._bar.console if self._bar is not None else self.console
            console.print(f"[dim]{time.perf_counter() - self.start:7.1f}s[/] {message}")

    def step(self, stage: str, done: int, total: int, detail: str = "") -> None:
        if self.quiet:
            return
        if stage != self._stage or done <= 1:  # a new stage, or the same one again
            self._end_bar()
            self._stage, self._stage_start, self._tenth = stage, time.perf_counter(), -1
        finished = done >= total
        if self.console.is_terminal:
            self._draw(stage, done, total, detail)
        elif _tenth(done, total) > self._tenth or finished:
            self._tenth = _tenth(done, total)
            self(_counted(stage, done, total, detail))
        if finished:
            if self.console.is_terminal:
                self._end_bar()
                self(f"{_counted(stage, done, total, detail)} in {time.perf_counter() - self._stage_start:.1f} s")
            self._stage = None

    def _draw(self, stage: str, done: int, total: int, detail: str) -> None:
        # No refresh thread (auto_refresh off): nothing is left drawing if the work raises.
        if self._bar is None:
            self._bar = Bar(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                            TextColumn("{task.fields[detail]}"), console=self.console, transient=True, auto_refresh=False)
            self._bar.start()
            self._bar.add_task(stage, total=total, detail=detail)
        task = self._bar.task_ids[0]
        self._bar.update(task, completed=done, total=total, detail=detail)
        self._bar.refresh()

    def _end_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def close(self) -> None:
        """Take down a bar whose stage did not finish (an error or Ctrl-C came first)."""
        self._end_bar()
        self._stage = None


_reporters: list[Progress] = []


@contextmanager
def bars_closed() -> Iterator[None]:
    """Around a command: a bar its error interrupted is taken down before the message."""
    try:
        yield
    finally:
        for reporter in _reporters:
            reporter.close()
        _reporters.clear()


_plain_tenths: dict[tuple[int, str], int] = {}


def advance(progress: Report, stage: str, done: int, total: int, detail: str = "") -> None:
    """Report `done` of `total` steps of `stage` to any reporter."""
    step = getattr(progress, "step", None)
    if callable(step):
        step(stage, done, total, detail)
        return
    key = (id(progress), stage)
    if done <= 1:
        _plain_tenths.pop(key, None)
    if done >= total or _tenth(done, total) > _plain_tenths.get(key, -1):
        _plain_tenths[key] = -1 if done >= total else _tenth(done, total)
        progress(_counted(stage, done, total, detail))
