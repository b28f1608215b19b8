"""Search quality and orchestration overhead on the CPU quickstart preset.

    .venv/bin/python benchmarks/search_quality.py [--trials 16] [--seeds 0 1 2] [--epochs 1]

For each seed, a fresh study searches the quickstart model at a 60 % budget; we compare the best
accuracy within budget found in all trials against the best warm-start (hand-designed) config of
the same study, and measure the orchestration overhead per trial: wall time between a trial's
start and end in the study, minus the time its fine-tuning and evaluation took in the worker.
"""

import argparse
import dataclasses
import statistics
from pathlib import Path

import optuna

from autoprune.search import SearchSettings, search
from autoprune.study_attrs import OUTCOME, WARM_START


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--budget", default="60%")
    parser.add_argument("--out", default="benchmarks/search_quality.md")
    args = parser.parse_args()
    storage = f"sqlite:///{Path('studies/search_quality.db').resolve()}"
    rows, overheads, trial_times = [], [], []
    for seed in args.seeds:
        settings = SearchSettings.from_preset("quickstart", budget=args.budget, seed=seed)
        settings = dataclasses.replace(settings, recipe=dataclasses.replace(settings.recipe, epochs=args.epochs))
        name = f"quality-seed{seed}-{args.trials}"
        search(settings, trials=args.trials, study_name=name, storage=storage)
        study = optuna.load_study(study_name=name, storage=storage)
        complete = [t for t in study.trials if t.user_attrs.get(OUTCOME) == "complete"
                    and all(v <= 0 for v in t.constraints.values())]
        warm = [t for t in complete if t.user_attrs.get(WARM_START)]
        best = max(complete, key=lambda t: t.values[0])
        best_warm = max(warm, key=lambda t: t.values[0])
        for t in complete:
            wall = (t.datetime_complete - t.datetime_start).total_seconds()
            overheads.append(wall - t.user_attrs["seconds"])
            trial_times.append(wall)
        infeasible = sum(t.user_attrs.get(OUTCOME) == "infeasible" for t in study.trials)
        rows.append((seed, best, best_warm, infeasible, len(study.trials), complete))
        print(rows[-1][0], best.values, best_warm.values, flush=True)
    lines = [
        "# Search quality and overhead on the quickstart preset",
        "",
        f"{args.trials} finished trials per study, budget {args.budget} of dense, {args.epochs} epoch(s) per trial, "
        "2-core CPU, concurrency 1, default search space.",
        "",
        f"    .venv/bin/python benchmarks/search_quality.py --trials {args.trials} --seeds "
        f"{' '.join(map(str, args.seeds))} --epochs {args.epochs}",
        "",
        "| seed | best within budget (any trial) | best warm start (hand-designed) | accuracy gain | "
        "fastest trial within 0.3 points of that warm start | speedup gain | proposals over budget |",
        "|---:|---|---|---:|---|---:|---:|",
    ]
    gains, speed_gains = [], []
    for seed, best, warm, infeasible, total, complete in rows:
        gain = best.values[0] - warm.values[0]
        gains.append(gain)
        fast = max((t for t in complete if t.values[0] >= warm.values[0] - 0.3), key=lambda t: t.user_attrs["speedup"])
        speed_gains.append(fast.user_attrs["speedup"] / warm.user_attrs["speedup"])
        describe = lambda t: (f"{t.values[0]:.2f}%, {t.user_attrs['speedup']:.2f}x ({t.user_attrs['prune_config']['reducer']}, "
                              f"{t.user_attrs['flops'] / 1e6:.1f} MFLOPs, trial {t.number})")
        lines.append(f"| {seed} | {describe(best)} | {describe(warm)} [{warm.user_attrs[WARM_START]}] | "
                     f"{gain:+.2f} | {describe(fast)} | {speed_gains[-1]:.2f}x | {infeasible}/{total} |")
    lines += [
        "",
        f"Mean over seeds: accuracy gain of the search over the best hand-designed config {statistics.mean(gains):+.2f} "
        f"points (top-1, val); speedup over dense of the fastest trial within 0.3 points of it "
        f"{statistics.mean(speed_gains):.2f}x the hand-designed config's (speedups are timed against the dense "
        "model inside each trial's process).",
        "",
        f"Orchestration overhead per trial (wall time in the study minus the worker's fine-tune + evaluation): "
        f"median {statistics.median(overheads):.2f} s, max {max(overheads):.2f} s, "
        f"= {statistics.median(overheads) / statistics.median(trial_times):.1%} of the median trial "
        f"({statistics.median(trial_times):.1f} s).",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
