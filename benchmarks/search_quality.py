"""Does the search beat hand-designed configs, and for what compute? Arms compared on the quickstart preset.

    .venv/bin/python benchmarks/search_quality.py [--budgets 60% 35%] [--seeds 0 1 2] [--trials 16]
        [--epochs 2] [--arms random tpe legacy pipeline] [--synthetic num_classes=20,...] [--spread 0]
        [--out benchmarks/search_quality.md]

Arms: a fresh study per (arm, budget, seed), each ending at the same number of finished
fine-tunes (`--trials`) of the same recipe, so every search arm spends the same fine-tuning epochs.
- hand: the papers' configs solved to the budget. They are the warm starts every study enqueues
  first, so they are read from the tpe arm's study (same seeds, same training: the same results).
- random: random sampling of the budget-exact space.
- tpe: TPE in the budget-exact space (this version's search).
- legacy: TPE in the previous parameterisation (per-layer amounts sampled, proposals over budget
  screened out), run from the tree of commit b7cbe16 (`git archive`) in a subprocess.
- pipeline: the full pipeline: TPE with off-the-shelf screening (the preset's 64 configs on 256
  val images) and successive halving at eta 2 (`pipeline_settings`); the other arms have neither.

Per arm and seed: the val-chosen best config within budget and its TEST top-1, with a paired
bootstrap 95 % interval of its difference to the best hand-designed config on the same test
images (per-image predictions are recomputed from the trials' checkpoints, and checked against
the recorded test top-1); the hypervolume of the front of test top-1 x measured speedup (reference
point: dense test top-1 - 10 points, speedup 1) per CPU-hour (trial wall time, ask to tell, x the
cores); proposals over budget; screening time and Kendall tau (the pipeline's, when it has them).
`--spread N` first evaluates N random proposals of the default space per budget off the shelf
(the baseline's weights, no training) and reports how far their val top-1 spreads: a spread under
3 points means the task is too easy to tell configs apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import numpy as np
import optuna
import timm
import torch

from autoprune import PruneConfig, apply, predict_flops
from autoprune.data import load_datasets, make_loader, model_data_config
from autoprune.search import Proposer, SearchSettings, SearchSpace, search
from autoprune.search.calibration import Calibration
from autoprune.search.summary import companion_screen
from autoprune.study import within_budget
from autoprune.study_attrs import OUTCOME, SCREEN_TAU_ATTR, WARM_START
from autoprune.train import evaluate
from autoprune.trial import create_unweighted, dense_baseline

ROOT = Path(__file__).resolve().parents[1]
LEGACY_COMMIT = "b7cbe16"  # the last tree with the previous parameterisation
LEGACY_DRIVER = """
import dataclasses
from autoprune.data import SyntheticOptions
from autoprune.search import SearchSettings, search
settings = SearchSettings.from_preset("quickstart", budget={budget!r}, seed={seed})
settings = dataclasses.replace(settings, synthetic=SyntheticOptions(**{synthetic!r}),
                               recipe=dataclasses.replace(settings.recipe, epochs={epochs!r}))
search(settings, trials={trials}, study_name={name!r}, storage={storage!r})
"""
REFERENCE_DROP = 10.0  # hypervolume reference: this many points below the dense test top-1, at speedup 1
BOOTSTRAP = 2000


def pipeline_settings(settings: SearchSettings) -> SearchSettings:
    """The full pipeline: off-the-shelf screening (the preset's count and images) and successive
    halving at eta 2 on top of TPE; the other arms run without either."""
    preset = SearchSettings.from_preset("quickstart", budget=settings.budget)
    return dataclasses.replace(settings, screen=preset.screen, screen_images=preset.screen_images, halving=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", nargs="+", default=["60%", "35%"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=None, help="per trial (default: the preset's)")
    parser.add_argument("--arms", nargs="*", default=["random", "tpe", "legacy", "pipeline"],
                        help="none: only the off-the-shelf spread (--spread)")
    parser.add_argument("--synthetic", default="", help="SyntheticOptions changes, e.g. num_classes=20,val_size=5000")
    parser.add_argument("--spread", type=int, default=0, help="off-the-shelf proposals per budget (0: skip)")
    parser.add_argument("--out", default="benchmarks/search_quality.md")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # batch 32: the serving batch the committed tables were measured at (the default then; a CPU
    # now defaults to 1), so the stored studies resume and the figures repeat
    base = SearchSettings.from_preset("quickstart", budget=args.budgets[0], serve_batch=32)
    changes = dict(item.split("=") for item in args.synthetic.split(",") if item)
    base = dataclasses.replace(base, synthetic=dataclasses.replace(base.synthetic, **{k: int(v) for k, v in changes.items()}))
    if args.epochs is not None:
        base = dataclasses.replace(base, recipe=dataclasses.replace(base.recipe, epochs=args.epochs))
    probe = create_unweighted(base.model.name, base.model.kwargs)
    datasets = load_datasets(base.data, model_data_config(probe), synthetic=base.synthetic)
    baseline = dense_baseline(base.model, datasets, base.data, base.baseline_recipe, base.synthetic)
    command = "    .venv/bin/python benchmarks/search_quality.py " + " ".join(sys.argv[1:])
    lines = ["# Search quality on the quickstart preset", "", command, "",
             f"Data: synthetic {dataclasses.asdict(base.synthetic)}; dense baseline val "
             f"{baseline.metrics['val']['top1']:.2f} %, test {baseline.metrics['test']['top1']:.2f} %. "
             f"{args.trials} finished fine-tunes of {base.recipe.epochs} epoch(s) per study; "
             f"{os.cpu_count()} cores, concurrency 1.", ""]
    if args.spread:
        lines += spread_section(base, baseline, datasets, args.budgets, args.spread)
    storage_dir = ROOT / "studies" / "search_quality"
    storage_dir.mkdir(parents=True, exist_ok=True)
    for budget in args.budgets if args.arms else ():
        rows = []
        for seed in args.seeds:
            settings = dataclasses.replace(base, budget=budget, seed=seed)
            studies = {arm: run_arm(arm, settings, args.trials, storage_dir) for arm in args.arms}
            studies = {arm: study for arm, study in studies.items() if study is not None}
            rows += measure_seed(seed, studies, baseline, datasets)
        lines += budget_section(budget, rows, baseline)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# -- running the arms -------------------------------------------------------------------------------

def run_arm(arm: str, settings: SearchSettings, trials: int, storage_dir: Path) -> optuna.Study | None:
    name = f"{arm}-{settings.budget.rstrip('%')}-seed{settings.seed}-{trials}x{settings.recipe.epochs:g}"
    storage = f"sqlite:///{storage_dir / f'{arm}.db'}"
    if arm == "legacy":
        run_legacy(settings, trials, name, storage)
    else:
        plain = dataclasses.replace(settings, screen=0, halving=0)
        chosen = {"random": dataclasses.replace(plain, sampler="random"), "tpe": plain,
                  "pipeline": pipeline_settings(settings)}[arm]
        search(chosen, trials=trials, study_name=name, storage=storage, log=lambda line: print(f"[{arm}] {line}", flush=True))
    return optuna.load_study(study_name=name, storage=storage)


def run_legacy(settings: SearchSettings, trials: int, name: str, storage: str) -> None:
    """The previous parameterisation's search, from the tree of LEGACY_COMMIT, sharing the baseline cache."""
    with tempfile.TemporaryDirectory() as tree:
        archive = subprocess.run(["git", "archive", LEGACY_COMMIT], cwd=ROOT, check=True, capture_output=True).stdout
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(tree, filter="data")
        driver = LEGACY_DRIVER.format(budget=settings.budget, seed=settings.seed, epochs=settings.recipe.epochs,
                                      synthetic=dataclasses.asdict(settings.synthetic), trials=trials, name=name,
                                      storage=storage)
        # run from a folder holding only a link to studies/: from this tree's root, `python -c` and the
        # Ray workers would import the current code before PYTHONPATH's (a silent 'legacy' arm)
        workdir = Path(tree) / "run"
        workdir.mkdir()
        (workdir / "studies").symlink_to(ROOT / "studies")
        subprocess.run([sys.executable, "-P", "-c", driver], cwd=workdir, check=True, env={**os.environ, "PYTHONPATH": tree})


# -- measuring ----------------------------------------------------------------------------------------

def measure_seed(seed: int, studies: dict[str, optuna.Study], baseline, datasets) -> list[dict]:
    """One row per arm (hand first), each with its test predictions, difference to hand and hypervolume."""
    complete = {arm: [t for t in study.trials if t.user_attrs.get(OUTCOME) == "complete"] for arm, study in studies.items()}
    reference = next((arm for arm in ("tpe", "random") if arm in complete), None)
    if reference is not None:
        complete = {"hand": [t for t in complete[reference] if t.user_attrs.get(WARM_START)], **complete}
    dense_test = baseline.metrics["test"]["top1"]
    rows = []
    for arm, trials in complete.items():
        feasible = [t for t in trials if within_budget(t)]
        best = max(feasible, key=lambda t: (t.values[0], t.values[1]), default=None)
        study = studies.get(arm)  # None for hand: its trials are the reference arm's warm starts
        proposals = [t for t in study.trials if "predicted_flops" in t.user_attrs] if study else []
        over = sum(t.user_attrs.get(OUTCOME) == "infeasible" for t in proposals)
        seconds = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials)
        rows.append({
            "arm": arm, "seed": seed, "best": best, "correct": test_predictions(best, baseline, datasets),
            "hypervolume": hypervolume([(t.user_attrs["test_accuracy"], t.user_attrs["speedup"]) for t in feasible],
                                       (dense_test - REFERENCE_DROP, 1.0)),
            "cpu_hours": seconds * (os.cpu_count() or 1) / 3600, "fine_tunes": len(trials),
            "over": f"{over}/{len(proposals)}" if study else "–",
            # the pipeline's screening: compute time of its screens, and how well they ranked the fine-tunes
            "screen_seconds": screen_seconds(study) if study else None,
            "kendall_tau": (study.user_attrs.get(SCREEN_TAU_ATTR) or {}).get("tau") if study else None,
        })
    hand = rows[0] if rows and rows[0]["arm"] == "hand" else None
    for row in rows:
        row["difference"] = (paired_bootstrap(row["correct"], hand["correct"], seed)
                             if hand is not None and row["correct"] is not None and hand["correct"] is not None else None)
    return rows


def screen_seconds(study: optuna.Study) -> float | None:
    screen = companion_screen(study)
    if screen is None:
        return None
    return sum(t.user_attrs.get("seconds") or 0.0 for t in screen.trials)


def test_predictions(trial, baseline, datasets) -> np.ndarray | None:
    """Per test image, whether the trial's fine-tuned model gets it right (from its checkpoint)."""
    if trial is None or datasets.test is None:
        return None
    model = timm.create_model(baseline.spec.name, num_classes=datasets.num_classes, **baseline.spec.kwargs)
    model.load_state_dict(torch.load(trial.user_attrs["checkpoint_path"], map_location="cpu", weights_only=True))
    model = apply(model, PruneConfig.from_dict(trial.user_attrs["prune_config"])).eval()
    correct = []
    with torch.no_grad():
        for images, labels in make_loader(datasets.test, 64, train=False):
            correct.append((model(images).argmax(dim=1) == labels).numpy())
    correct = np.concatenate(correct)
    recorded = trial.user_attrs.get("test_accuracy")
    if recorded is not None and abs(100 * correct.mean() - recorded) > 0.051:
        print(f"warning: trial {trial.number} recorded test top-1 {recorded:.2f} %, its checkpoint gives "
              f"{100 * correct.mean():.2f} %", flush=True)
    return correct


def paired_bootstrap(a: np.ndarray, b: np.ndarray, seed: int) -> tuple[float, float, float]:
    """Difference of top-1 (points) of a over b on the same images, with a 95 % percentile interval
    from resampling the images."""
    rng = np.random.default_rng(seed)
    delta = a.astype(np.float64) - b.astype(np.float64)
    draws = rng.integers(0, len(delta), size=(BOOTSTRAP, len(delta)))
    means = 100 * delta[draws].mean(axis=1)
    return 100 * delta.mean(), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def hypervolume(points: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by the points (both coordinates maximised) and bounded by the reference."""
    area, reached = 0.0, reference[1]
    for accuracy, speed in sorted(points, key=lambda p: -p[0]):
        if accuracy > reference[0] and speed > reached:
            area += (accuracy - reference[0]) * (speed - reached)
            reached = speed
    return area


# -- the off-the-shelf spread -----------------------------------------------------------------------

def spread_section(settings: SearchSettings, baseline, datasets, budgets: list[str], count: int) -> list[str]:
    """Val top-1 of `count` random proposals of the default space per budget, with the baseline's weights."""
    probe = create_unweighted(settings.model.name, settings.model.kwargs)
    probe.reset_classifier(datasets.num_classes)
    calibration = Calibration.from_dataset(baseline.model, datasets.val, settings.recipe.batch_size)

    def flops_of(prune: PruneConfig) -> float:
        return calibration.flops(prune) if prune.adaptive else predict_flops(probe, prune)

    lines = ["## Off-the-shelf spread of the default space", "",
             f"{count} random proposals per budget, evaluated with the dense baseline's weights (no fine-tuning) "
             "on the val split.", "", "| budget | min | 10th pct | median | 90th pct | max | spread (max - min) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for budget in budgets:
        limit = float(budget.rstrip("%")) / 100 * predict_flops(probe)
        proposer = Proposer(SearchSpace.from_file("default"), probe, limit, flops_of)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        accuracies = []
        for _ in range(count):
            trial = study.ask()
            model = apply(baseline.fresh_copy(), proposer.propose(trial).prune)
            accuracies.append(evaluate(model, datasets.val, settings.recipe.batch_size, 0)["top1"])
            study.tell(trial, accuracies[-1])
        p10, median, p90 = np.percentile(accuracies, [10, 50, 90])
        lines.append(f"| {budget} | {min(accuracies):.1f} | {p10:.1f} | {median:.1f} | {p90:.1f} | "
                     f"{max(accuracies):.1f} | {max(accuracies) - min(accuracies):.1f} |")
        print(lines[-1], flush=True)
    return lines + [""]


# -- the table ----------------------------------------------------------------------------------------

def budget_section(budget: str, rows: list[dict], baseline) -> list[str]:
    def label(trial) -> str:
        if trial is None:
            return "–"
        text = PruneConfig.from_dict(trial.user_attrs["prune_config"]).describe()
        if trial.user_attrs.get(WARM_START):
            text += f" [{trial.user_attrs[WARM_START]}]"
        return f"{text} (trial {trial.number})"

    def show(value, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    lines = [f"## Budget {budget}", "",
             "| arm | seed | val-chosen best within budget | val top-1 | test top-1 | test − best hand [95 % CI] | "
             "hypervolume | CPU-h | HV per CPU-h | fine-tunes | over budget | screening s | Kendall τ |",
             "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        best = row["best"]
        difference = row["difference"]
        shown = "–" if difference is None or row["arm"] == "hand" else \
            f"{difference[0]:+.2f} [{difference[1]:+.2f}, {difference[2]:+.2f}]"
        per_hour = row["hypervolume"] / row["cpu_hours"] if row["cpu_hours"] else None
        lines.append(f"| {row['arm']} | {row['seed']} | {label(best)} | "
                     f"{show(best.values[0] if best else None, '.2f')} | "
                     f"{show(best.user_attrs.get('test_accuracy') if best else None, '.2f')} | {shown} | "
                     f"{row['hypervolume']:.3f} | {row['cpu_hours']:.3f} | {show(per_hour, '.2f')} | "
                     f"{row['fine_tunes']} | {row['over']} | {show(row['screen_seconds'], '.0f')} | "
                     f"{show(row['kendall_tau'], '.2f')} |")
    lines += ["", "Summary over seeds:", ""]
    by_arm: dict[str, list[dict]] = {}
    for row in rows:
        by_arm.setdefault(row["arm"], []).append(row)
    legacy_rate = _mean_rate(by_arm.get("legacy", []))
    for arm, arm_rows in by_arm.items():
        differences = [r["difference"] for r in arm_rows if r["difference"] is not None]
        rate = _mean_rate(arm_rows)
        parts = [f"hypervolume per CPU-hour {rate:.2f}" + (f" ({rate / legacy_rate:.2f}x legacy's)"
                                                            if legacy_rate and arm != "legacy" else "")]
        if arm != "hand" and differences:
            beaten = sum(low > 0 for _, low, _ in differences)
            parts.insert(0, f"test top-1 {statistics.mean(d for d, _, _ in differences):+.2f} points over the best "
                            f"hand-designed config on average, beyond its 95 % interval on {beaten} of "
                            f"{len(differences)} seeds")
        lines.append(f"- {arm}: " + "; ".join(parts))
    return lines + [""]


def _mean_rate(rows: list[dict]) -> float:
    rates = [r["hypervolume"] / r["cpu_hours"] for r in rows if r["cpu_hours"]]
    return statistics.mean(rates) if rates else 0.0


if __name__ == "__main__":
    main()
