"""Live progress of long-running items (trials, screened configs): one line per running item.

    live = LiveProgress.for_output(print)     # terminal mode on a terminal, line mode otherwise
    live.start("t1", "trial 3 tome r=4", total=5)
    live.update("t1", done=1, detail="loss 1.20, val top-1 61.0%")
    live.write("a permanent line")             # printed above the live lines
    live.finish("t1")

On a terminal the lines of the running items are redrawn in place below the permanent output,
so a long trial shows where it is without scrolling. Elsewhere (a log file, a pipe, a test) each
update is written once, as a line of its own: a log gets one line per update (an epoch), never a
stream of redraws. Elapsed time counts from `start`; the time left extrapolates it linearly.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TextIO


def format_duration(seconds: float) -> str:
    """12m05s, or 1h02m past an hour."""
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


@dataclass
class _Item:
    label: str
    total: float
    unit: str
    started: float
    done: float = 0.0
    detail: str = ""


class LiveProgress:
    """The running items and their lines. `write` takes permanent lines (and, in line mode, the
    updates); with `terminal` (a stream on a terminal) the live lines are redrawn in place there."""

    def __init__(self, write: Callable[[str], None] = print, terminal: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._write, self.terminal, self.clock = write, terminal, clock
        self.items: dict[Hashable, _Item] = {}
        self._drawn = 0  # live lines currently on the terminal, below the permanent output

    @classmethod
    def for_output(cls, write: Callable[[str], None] = print) -> "LiveProgress":
        """Terminal mode when `write` is print and stdout is an interactive terminal."""
        stdout = sys.stdout
        interactive = write is print and stdout.isatty() and _terminal_can_redraw()
        return cls(write, terminal=stdout if interactive else None)

    def write(self, line: str) -> None:
        """A permanent line (a finished trial, a message): above the live lines on a terminal."""
        if self.terminal is None:
            self._write(line)
            return
        self._clear()
        self.terminal.write(line + "\n")
        self._draw()

    def start(self, key: Hashable, label: str, total: float, unit: str = "epoch") -> None:
        """An item begins: `total` units of work (fractions allowed)."""
        self.items[key] = _Item(label, float(total), unit, self.clock())
        if self.terminal is not None:
            self._redraw()

    def update(self, key: Hashable, done: float, detail: str = "") -> None:
        """`done` units of the item are finished; `detail` says how it goes (loss, accuracy...)."""
        item = self.items.get(key)
        if item is None:
            return
        item.done, item.detail = float(done), detail
        if self.terminal is None:
            self._write(self.line(key))
        else:
            self._redraw()

    def finish(self, key: Hashable) -> None:
        """The item is over (its result, if any, is a permanent line of the caller's)."""
        if self.items.pop(key, None) is not None and self.terminal is not None:
            self._redraw()

    def line(self, key: Hashable) -> str:
        """`label: epoch 2/5, detail | 1m10s elapsed, ~1m45s left`."""
        item = self.items[key]
        elapsed = self.clock() - item.started
        shown = math.ceil(item.done - 1e-9)
        text = f"{item.label}: {item.unit} {shown}/{math.ceil(item.total - 1e-9)}"
        if item.detail:
            text += f", {item.detail}"
        if item.done <= 0:
            return f"{text} | {format_duration(elapsed)} elapsed"
        left = elapsed / item.done * max(0.0, item.total - item.done)
        return f"{text} | {format_duration(elapsed)} elapsed, ~{format_duration(left)} left"

    # -- terminal mode ----------------------------------------------------------------------------

    def _clear(self) -> None:
        if self._drawn:
            self.terminal.write(f"\x1b[{self._drawn}A\r\x1b[J")  # up to the first live line, erase below
            self._drawn = 0

    def _draw(self) -> None:
        width = max(20, shutil.get_terminal_size().columns - 1)  # a wrapped line would break the redraw
        for key in self.items:
            self.terminal.write(self.line(key)[:width] + "\n")
        self._drawn = len(self.items)
        self.terminal.flush()

    def _redraw(self) -> None:
        self._clear()
        self._draw()


def _terminal_can_redraw() -> bool:
    return os.environ.get("TERM", "") not in ("", "dumb")
