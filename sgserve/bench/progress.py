"""Live progress of a benchmark on stderr.

On a terminal, rich draws one bar per (point, endpoint) that stays on screen with its final numbers.
Anywhere else (a pipe, a log file, CI) a bar would be noise, so the same information comes as plain
"[bench] ..." lines, at most one every few seconds plus one per finished point.
"""
from __future__ import annotations

import math
import sys
import time
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

PROGRESS_TTY_S = 0.5  # seconds between redraws on a terminal
PROGRESS_LOG_S = 2.0  # seconds between progress lines when stderr is a file or pipe
PREFIX = "[bench] "


class BenchProgress:
    """Progress of the points of one run; ``head`` names a point and endpoint, ``text`` its numbers so far."""

    def __init__(self, enabled: bool, stream: IO[str] | None = None, console: Console | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.console = console or Console(file=self.stream, highlight=False)
        self.tty = self.console.is_terminal and not self.console.is_dumb_terminal
        self._bars: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._last = -math.inf

    def update(self, head: str, done: float, total: float | None, text: str, final: bool = False) -> None:
        """Shows ``head: text``; ``done`` of ``total`` (seconds or requests) fills the bar on a terminal."""
        if not self.enabled:
            return
        if self.tty:
            self._draw(head, done, total, text, final)
            return
        now = time.monotonic()
        if final or now - self._last >= PROGRESS_LOG_S:
            self._last = now
            self._line(f"{head}: {text}")

    def note(self, line: str) -> None:
        """A line that is not progress (a warning); above the bars on a terminal."""
        if not self.enabled:
            return
        if self.tty:
            self.console.print(PREFIX + line, markup=False, highlight=False)
        else:
            self._line(line)

    def close(self) -> None:
        """Stops redrawing; the finished bars stay on screen."""
        if self._bars is not None:
            self._bars.stop()
            self._bars = None

    def _line(self, line: str) -> None:
        self.stream.write(PREFIX + line + "\n")
        self.stream.flush()

    def _draw(self, head: str, done: float, total: float | None, text: str, final: bool) -> None:
        if self._bars is None:
            self._bars = Progress(TextColumn(PREFIX + "{task.description}", markup=False), BarColumn(bar_width=24),
                                  TextColumn("{task.fields[text]}", markup=False), console=self.console,
                                  refresh_per_second=1 / PROGRESS_TTY_S, redirect_stdout=False)
            self._bars.start()
        task = self._tasks.get(head)
        if task is None:
            task = self._tasks[head] = self._bars.add_task(head, total=total, text=text)
        completed = total if final and total else done
        self._bars.update(task, completed=completed, total=total, text=text)
        if final:
            self._bars.refresh()
