"""Live progress lines: redrawn in place on a terminal, one line per update elsewhere; and the
search's per-epoch trial lines in both modes, end to end with a real local Ray."""

from __future__ import annotations

import dataclasses
import io
import re
import sys
from pathlib import Path

import pytest

from autoprune.data import SyntheticOptions
from autoprune.progress import LiveProgress
from autoprune.search import SearchSettings, search
from autoprune.train import TrainConfig
from autoprune.trial import ModelSpec

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def screen(stream: str) -> list[str]:
    """What a terminal shows after `stream`: lines, newlines, cursor up (ESC[nA), carriage
    return and erase below (ESC[J) — the sequences LiveProgress writes, and nothing else."""
    rows, row = [""], 0
    for token in re.findall(r"\x1b\[(\d*)([AJ])|(\r)|(\n)|([^\x1b\r\n]+)", stream):
        count, command, cr, newline, text = token
        if command == "A":
            row = max(0, row - int(count or 1))
        elif command == "J":
            del rows[row + 1:]
            rows[row] = ""
        elif newline:
            row += 1
            if row == len(rows):
                rows.append("")
        elif text:
            rows[row] += text
        elif not cr:
            raise AssertionError(f"unexpected output {token!r}")
    return [line for line in rows if line]


def test_line_mode_writes_one_line_per_update_and_nothing_else():
    lines, clock = [], FakeClock()
    live = LiveProgress(lines.append, clock=clock)
    live.start("a", "trial 3 tome r=4", total=4)
    live.write("a permanent line")
    clock.now = 30
    live.update("a", 1, "loss 1.500, val top-1 40.00%")
    clock.now = 60
    live.update("a", 2, "loss 1.200, val top-1 55.00%")
    live.finish("a")
    live.update("a", 3, "after the end")  # a late report of a finished item is dropped
    assert lines == [
        "a permanent line",
        "trial 3 tome r=4: epoch 1/4, loss 1.500, val top-1 40.00% | 0m30s elapsed, ~1m30s left",
        "trial 3 tome r=4: epoch 2/4, loss 1.200, val top-1 55.00% | 1m00s elapsed, ~1m00s left",
    ]


def test_fractional_totals_count_the_partial_epoch():
    lines, clock = [], FakeClock()
    live = LiveProgress(lines.append, clock=clock)
    live.start("a", "t", total=1.5)
    clock.now = 10
    live.update("a", 1.0)
    clock.now = 15
    live.update("a", 1.5)
    assert lines == ["t: epoch 1/2 | 0m10s elapsed, ~0m05s left", "t: epoch 2/2 | 0m15s elapsed, ~0m00s left"]


def test_terminal_mode_redraws_live_lines_in_place_below_permanent_output():
    terminal, clock = FakeTerminal(), FakeClock()
    written = []
    live = LiveProgress(written.append, terminal=terminal, clock=clock)
    live.start("a", "trial 1", total=2)
    live.start("b", "trial 2", total=3)
    assert screen(terminal.getvalue()) == ["trial 1: epoch 0/2 | 0m00s elapsed", "trial 2: epoch 0/3 | 0m00s elapsed"]
    clock.now = 20
    live.update("a", 1, "loss 0.900")
    live.update("b", 1, "loss 1.100")
    live.write("[1/4] trial 0: done")
    assert screen(terminal.getvalue()) == [
        "[1/4] trial 0: done",
        "trial 1: epoch 1/2, loss 0.900 | 0m20s elapsed, ~0m20s left",
        "trial 2: epoch 1/3, loss 1.100 | 0m20s elapsed, ~0m40s left",
    ]
    live.finish("a")
    live.write("[2/4] trial 1: done")
    clock.now = 40
    live.update("b", 2, "loss 0.800")
    assert screen(terminal.getvalue()) == [
        "[1/4] trial 0: done", "[2/4] trial 1: done",
        "trial 2: epoch 2/3, loss 0.800 | 0m40s elapsed, ~0m20s left",
    ]
    live.finish("b")
    assert screen(terminal.getvalue()) == ["[1/4] trial 0: done", "[2/4] trial 1: done"]
    assert not written  # on a terminal everything goes to the terminal, in order


def test_terminal_lines_are_cut_to_the_terminal_width(monkeypatch):
    import os
    import shutil

    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=(80, 24): os.terminal_size((30, 24)))
    terminal = FakeTerminal()
    live = LiveProgress(terminal=terminal, clock=FakeClock())
    live.start("a", "a label much longer than the terminal is wide", total=1)
    assert screen(terminal.getvalue()) == ["a label much longer than the "]  # 29 columns: no wrap


def test_for_output_picks_terminal_mode_only_for_print_on_a_terminal(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setattr(sys, "stdout", FakeTerminal())
    assert LiveProgress.for_output(print).terminal is sys.stdout
    assert LiveProgress.for_output([].append).terminal is None   # a caller's own log: lines
    monkeypatch.setenv("TERM", "dumb")
    assert LiveProgress.for_output(print).terminal is None
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setattr(sys, "stdout", io.StringIO())            # redirected to a file or pipe
    assert LiveProgress.for_output(print).terminal is None


# -- the search's trial lines -----------------------------------------------------------------------

TINY = ModelSpec("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3})
SYNTHETIC = SyntheticOptions(num_classes=4, train_size=64, val_size=32, test_size=0, image_size=32)
TWO_EPOCHS = TrainConfig(epochs=2, batch_size=16, workers=0)
EPOCH_LINE = re.compile(r"^  trial (\d+) .+: epoch (\d)/2, loss \d+\.\d{3}, val top-1 \d+\.\d{2}% \| "
                        r"\d+m\d\ds elapsed, ~\d+m\d\ds left$")


def settings() -> SearchSettings:
    return SearchSettings(budget="75%", model=TINY, synthetic=SYNTHETIC, recipe=TWO_EPOCHS,
                          baseline_recipe=TrainConfig(epochs=1, batch_size=16, workers=0),
                          space=str(ROOT / "search_spaces" / "default.yaml"))


@pytest.fixture(scope="module")
def ray_session():
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_search_logs_one_line_per_trial_epoch_when_not_on_a_terminal(ray_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = []
    search(settings(), trials=1, study_name="s", storage=f"sqlite:///{tmp_path / 's.db'}",
           min_baseline_accuracy=0, log=lines.append)
    epochs = [EPOCH_LINE.match(line) for line in lines if " epoch " in line and line.startswith("  trial")]
    assert all(epochs), lines
    per_trial = {}
    for match in epochs:
        per_trial.setdefault(match[1], []).append(int(match[2]))
    assert len(per_trial) == 1 and all(seen == [1, 2] for seen in per_trial.values()), lines
    finished = [i for i, line in enumerate(lines) if line.startswith("[")]
    for number, seen in per_trial.items():  # each trial's epoch lines come before its result line
        last_epoch = max(i for i, line in enumerate(lines) if line.startswith(f"  trial {number} "))
        assert any(i > last_epoch and f"trial {number}:" in lines[i] for i in finished)
    assert not any("\x1b" in line for line in lines)
    assert any(re.match(r"  baseline: epoch 1/1, loss \d\.\d{3}, val top-1 \d+\.\d\d% \| ", line) for line in lines)


def test_search_redraws_trial_lines_in_place_on_a_terminal(ray_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TERM", "xterm")
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    search(dataclasses.replace(settings(), seed=1), trials=1, study_name="s",
           storage=f"sqlite:///{tmp_path / 's.db'}", min_baseline_accuracy=0, log=print)
    output = terminal.getvalue()
    assert "\x1b[1A\r\x1b[J" in output and re.search(r"  trial \d+ .+: epoch 2/2, loss", output)
    shown = screen(output)
    # the live line is gone once its trial ended; the permanent lines are all there, once each
    assert not any(" epoch " in line and line.startswith("  trial") for line in shown), shown
    assert sum(line.startswith("[1/1] trial") for line in shown) == 1
    assert any(line.startswith("dense baseline: val top-1") for line in shown)
    assert not any(line.startswith("  baseline: epoch") for line in shown)  # redrawn, then gone
    assert any(line.startswith("Pareto front") for line in shown)
