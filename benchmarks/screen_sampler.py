"""Which sampler finds the better screen front in the same number of screens, on the quickstart.

    .venv/bin/python benchmarks/screen_sampler.py [--screens 64] [--seeds 0 1 2] [--budget 60%]
                                                  [--out benchmarks/screen_sampler.md]

Each sampler (multivariate TPE, random, and scrambled Sobol QMC where scipy is installed) proposes `--screens` configs of the
default space within the budget; each is screened off the shelf (the quickstart baseline's
weights, no training) on the screen images, in this process. Off-the-shelf accuracy is
deterministic, so the comparison does not depend on the machine; the seconds column does.
Reported per sampler and seed: the hypervolume of the screen front in (top-1 %, speedup - 1)
(reference: 0 %, the dense model's speed), the best top-1 within budget, the reducers among the
configs promotion would pick for 8 slots, and proposals over budget. Warm starts are left out:
this compares samplers only.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import optuna
import torch

from autoprune import predict_flops
from autoprune.data import load_datasets, model_data_config
from autoprune.report.plots import hypervolume_2d
from autoprune.search import SearchSettings, SearchSpace, parse_budget
from autoprune.search.calibration import Calibration
from autoprune.search.execution import worker_context
from autoprune.search.proposals import Proposer
from autoprune.search.space import Candidate
from autoprune.search.screen import choose_promoted, run_screening, screen_sampler, screen_study
from autoprune.study import within_budget
from autoprune.study_attrs import UID_ATTR
from autoprune.search.trainable import ScreenWorker
from autoprune.trial import dense_baseline

# Optuna's QMC sampler needs scipy, which autoprune does not install: without it QMC is left out
SAMPLERS = ("tpe", "random") + (("qmc",) if importlib.util.find_spec("scipy") else ())


class InlinePool:
    """ray.util.ActorPool's interface over one in-process ScreenWorker."""

    def __init__(self, worker: ScreenWorker) -> None:
        self.worker, self.pending = worker, []

    def submit(self, fn, jobs):
        self.pending.append(self.worker.evaluate(jobs))

    def get_next_unordered(self):
        return self.pending.pop(0)

    def has_next(self):
        return bool(self.pending)

    def has_free(self):
        return not self.pending


def compare(settings: SearchSettings, screens: int, seeds: list[int], samplers=SAMPLERS) -> list[dict]:
    probe = settings.model.create(10)
    datasets = load_datasets(settings.data, model_data_config(probe), synthetic=settings.synthetic)
    baseline = dense_baseline(settings.model, datasets, settings.data, settings.baseline_recipe, settings.synthetic,
                              device=settings.device)
    probe = baseline.fresh_copy()
    space = SearchSpace.from_file(settings.space)
    budget = parse_budget(settings.budget).resolve(predict_flops(probe))
    calibration = Calibration.from_dataset(baseline.model, datasets.val, settings.recipe.batch_size)

    def flops_of(candidate):  # as the search counts them: mass-based SaiT on a calibration batch
        prune = candidate.prune
        return calibration.flops(prune) if prune.adaptive else predict_flops(probe, prune)

    proposer = Proposer(space, probe, budget, lambda prune: flops_of(Candidate(prune)))
    worker = ScreenWorker(worker_context(settings, baseline, Path("unused"), {"cpu": torch.get_num_threads(), "gpu": 0}))
    rows = []
    for sampler in samplers:
        for seed in seeds:
            study = optuna.create_study(directions=["maximize", "maximize"])
            study.set_user_attr(UID_ATTR, f"{sampler}-{seed}")
            screen = screen_study(study)
            screen.sampler = screen_sampler(sampler, seed, screens)
            started = time.perf_counter()
            run = run_screening(screen, proposer.propose, flops_of, budget,
                                baseline.metrics, screens, InlinePool(worker), 4, log=lambda line: None)
            complete = [t for t in screen.get_trials(states=(optuna.trial.TrialState.COMPLETE,)) if within_budget(t)]
            promoted = choose_promoted(complete, 8)
            rows.append({
                "sampler": sampler, "seed": seed,
                "hypervolume": hypervolume_2d((t.values[0], t.user_attrs["speedup"] - 1) for t in complete),
                "best": max((t.values[0] for t in complete), default=float("nan")),
                "promoted": sorted({t.user_attrs["prune_config"]["reducer"] for t in promoted}),
                "infeasible": run.infeasible, "proposed": run.proposed, "seconds": time.perf_counter() - started,
            })
            print(rows[-1], flush=True)
    return rows


def table(rows: list[dict], command: str, screens: int, budget: str) -> str:
    lines = ["# Screen sampler: which finds the better screen front in the same number of screens", "",
             f"Quickstart preset, default space, budget {budget}, {screens} screens per run (warm starts left out), "
             "screen images as the preset sets them. Accuracy is deterministic; seconds depend on the machine.", "",
             f"    {command}", "",
             "| sampler | seed | hypervolume (top-1 % x (speedup - 1)) | best top-1 | reducers promoted (8 slots) "
             "| over budget | seconds |", "|---|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['seed']} | {r['hypervolume']:.1f} | {r['best']:.2f}% | "
                     f"{', '.join(r['promoted'])} | {r['infeasible']}/{r['proposed']} | {r['seconds']:.0f} |")
    lines += ["", "| sampler | median hypervolume | median best top-1 |", "|---|---:|---:|"]
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        mine = [r for r in rows if r["sampler"] == sampler]
        lines.append(f"| {sampler} | {statistics.median(r['hypervolume'] for r in mine):.1f} | "
                     f"{statistics.median(r['best'] for r in mine):.2f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--screens", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", default="60%")
    parser.add_argument("--out", default="benchmarks/screen_sampler.md")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = SearchSettings.from_preset("quickstart", budget=args.budget)
    rows = compare(settings, args.screens, args.seeds)
    command = (f".venv/bin/python benchmarks/screen_sampler.py --screens {args.screens} --seeds "
               f"{' '.join(map(str, args.seeds))} --budget {args.budget}")
    Path(args.out).write_text(table(rows, command, args.screens, args.budget))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
