"""Orchestration overhead per trial: everything a search adds around fine-tuning and evaluation.

    .venv/bin/python benchmarks/search_overhead.py [--trials 10]

Runs a search of tiny trials on the quickstart model (0.1 epoch each) in a scratch folder and, per
trial, takes the time from the moment the searcher asked the study for it to the moment it told
the result, minus the time the worker spent in fine-tuning and evaluation (`seconds`), plus the
gap before the next trial is asked. The first trial also pays for starting the Ray worker.
"""

import argparse
import dataclasses
import os
import statistics
import tempfile
from pathlib import Path

import optuna

from autoprune.search import SearchSettings, search
from autoprune.study_attrs import OUTCOME


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args()
    baselines = Path("studies").resolve()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)
        os.symlink(baselines, "studies")  # reuse the cached quickstart baseline
        settings = SearchSettings.from_preset("quickstart", budget="70%")
        settings = dataclasses.replace(settings, recipe=dataclasses.replace(settings.recipe, epochs=0.1))
        storage = f"sqlite:///{Path(scratch) / 'overhead.db'}"
        name = f"overhead-{os.getpid()}"
        search(settings, trials=args.trials, study_name=name, storage=storage, log=lambda line: None)
        study = optuna.load_study(study_name=name, storage=storage)
    run = sorted((t for t in study.trials if t.user_attrs.get(OUTCOME) == "complete"), key=lambda t: t.datetime_start)
    overheads, totals = [], []
    for before, after in zip(run, run[1:] + [None]):
        wall = (before.datetime_complete - before.datetime_start).total_seconds()
        gap = (after.datetime_start - before.datetime_complete).total_seconds() if after else 0.0
        overheads.append(wall - before.user_attrs["seconds"] + gap)
        totals.append(wall + gap)
    steady = overheads[1:]
    print(f"{len(run)} trials; overhead per trial: first {overheads[0]:.2f} s (starts the worker), then median "
          f"{statistics.median(steady):.2f} s, max {max(steady):.2f} s; median trial {statistics.median(totals):.2f} s")


if __name__ == "__main__":
    main()
