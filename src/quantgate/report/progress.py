"""What a long command tells the person running it while it works, on stderr (stdout stays for
results and --json): progress bars on a terminal; plain lines when stderr is a pipe or a file, so
a CI log gets a few readable lines per step instead of bars redrawn (or printed once, at the end);
nothing but errors with --quiet.

    with Feedback(quiet=False) as feedback:
        feedback.say("checking 3 files against the manifest")
        execute(cfg, feedback)                 # a Feedback is a progress sink (engines.registry.Progress)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

LINE_EVERY_S = 10.0  # a non-terminal progress line at least this often while a step advances


class Feedback:
    """A progress sink, (description, total steps) -> advance(n), and `say` for one-line notes."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.bars: Progress | None = None

    def __enter__(self) -> Feedback:
        if not self.quiet and self.stream.isatty():
            self.bars = Progress(TextColumn("{task.description:<16}"), BarColumn(), TextColumn("{task.completed}/"
                                 "{task.total}"), TimeElapsedColumn(), console=Console(file=self.stream),
                                 transient=False)
            self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bars is not None:
            self.bars.stop()
            self.bars = None

    def say(self, text: str) -> None:
        if self.quiet:
            return
        if self.bars is not None:
            self.bars.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(f"quantgate: {text}", file=self.stream, flush=True)

    def __call__(self, description: str, total: int) -> Callable[[int], None]:
        if self.quiet:
            return lambda n: None
        if self.bars is not None:
            task = self.bars.add_task(description, total=total)
            return lambda n: self.bars.advance(task, n) if self.bars is not None else None
        return _Lines(self, description, total)


class _Lines:
    """One line when a step starts, then when it passes each quarter of its total (or LINE_EVERY_S
    has passed since the last line), and when it ends."""

    def __init__(self, feedback: Feedback, description: str, total: int):
        self.feedback, self.description, self.total = feedback, description, max(total, 1)
        self.done, self.quarter = 0, 0
        self.start = self.last = time.monotonic()
        feedback.say(f"{description}: started ({total} steps)")

    def __call__(self, n: int) -> None:
        self.done += n
        now, quarter = time.monotonic(), min(4, self.done * 4 // self.total)
        if quarter > self.quarter or now - self.last >= LINE_EVERY_S or self.done >= self.total:
            self.quarter, self.last = quarter, now
            end = " done" if self.done >= self.total else ""
            self.feedback.say(f"{self.description}: {self.done}/{self.total}{end} ({now - self.start:.1f} s)")
