"""A study report: what a search found, as CSV tables, Markdown and one self-contained HTML page.

    from autoprune.report import write_report
    write_report("sqlite:///studies/autoprune.db", "quickstart")   # -> studies/quickstart/report.html

The report reads a snapshot of the study (copied into memory first), so a study that a search is
still driving is neither locked nor slowed, and is never written to. It writes, in `out_dir`:

- `trials.csv`: every trial (outcome, config, metrics); `pareto.csv`: the Pareto front only.
- `report.md`: settings, the front, the warm-start configs and what the search gained over them,
  outcome counts and failure reasons.
- `report.html`: the same plus plots (accuracy vs throughput and vs GFLOPs, hypervolume over the
  trials, parameter importance) and token-reduction maps of the front's models on validation
  images. Plots are embedded (SVG and PNG data URIs) and the styles inline: it renders offline.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as _dt
import html
import io
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from .config import ConfigError, PruneConfig
from .search.budget import BudgetError, format_flops, parse_budget
from .storage import shown_url
from .study import OUTCOME_ORDER, load_study, pareto_front, trial_outcome, within_budget
from .study_attrs import DENSE_ATTR, REASON, SETTINGS_ATTR, WARM_START

REDUCER_COLORS = {  # Okabe-Ito: tells the reducers apart, also for colour-blind readers
    "evit": "#0072B2", "tome": "#E69F00", "ppt": "#009E73", "tps": "#CC79A7",
    "bat": "#56B4E9", "sait": "#D55E00", "none": "#555555",
}
SAMPLE_IMAGES = 4


# -- reading the study ------------------------------------------------------------------------------

def snapshot_study(storage_url: str, study_name: str) -> optuna.Study:
    """A copy of the study in memory: later reads never touch (or lock) the user's storage.

    Raises `StudyNotFound` (listing the studies there) for an unknown name, `StorageError` for a
    storage that cannot be opened."""
    source = load_study(storage_url, study_name)
    memory = optuna.storages.InMemoryStorage()
    with _quiet_optuna():
        optuna.copy_study(from_study_name=study_name, from_storage=source._storage, to_storage=memory)
        study = optuna.load_study(study_name=study_name, storage=memory)
    engine = getattr(source._storage, "engine", None)
    if engine is not None:
        engine.dispose()  # close the connections now: nothing else is read from the storage
    return study


@contextlib.contextmanager
def _quiet_optuna():
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


@dataclass
class Row:
    """One trial, flattened for tables and plots."""

    trial: FrozenTrial
    number: int
    state: str
    outcome: str
    reason: str
    reducer: str
    layers: str
    settings: str          # the config label without reducer and layers
    label: str             # the full config label (PruneConfig.describe) plus training changes
    training: str
    warm_start: str
    accuracy: float | None
    test_accuracy: float | None
    flops: float | None
    predicted_flops: float | None
    throughput: float | None
    speedup: float | None
    params: float | None
    checkpoint: str
    feasible: bool
    on_front: bool = False
    stopped_accuracy: float | None = None  # last accuracy an early-stopped trial reported

    @property
    def gflops(self) -> float | None:
        return None if self.flops is None else self.flops / 1e9

    @property
    def plot_flops(self) -> float | None:
        """Measured FLOPs, else predicted (infeasible proposals and trials that did not finish)."""
        return self.flops if self.flops is not None else self.predicted_flops


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _describe(config: dict | None) -> tuple[str, str, str, str]:
    """(reducer, layers, other settings, full label) of a stored prune_config."""
    if not isinstance(config, dict):
        return "", "", "", ""
    try:
        label = PruneConfig.from_dict(config).describe()
    except (ConfigError, TypeError):
        label = json.dumps(config, sort_keys=True)
        return str(config.get("reducer", "")), "", label, label
    parts = label.split()
    layers = next((p[1:] for p in parts if p.startswith("@")), "")
    settings = " ".join(p for p in parts[1:] if not p.startswith("@"))
    return parts[0], layers, settings, label


def _training(train_config: dict | None, recipe: dict) -> str:
    """What a trial's fine-tuning changed from the study's recipe (distillation, learning rate)."""
    if not isinstance(train_config, dict):
        return ""
    changes = []
    beta = _number(train_config.get("beta")) or 0.0
    if beta > 0:
        changes.append(f"distill {train_config.get('distill', '?')} β={beta:.2g}")
    lr, base_lr = _number(train_config.get("lr")), _number(recipe.get("lr"))
    if lr is not None and (base_lr is None or not math.isclose(lr, base_lr, rel_tol=1e-6)):
        changes.append(f"lr {lr:.2g}")
    return ", ".join(changes)


def trial_rows(study: optuna.Study, recipe: dict | None = None) -> list[Row]:
    front = {t.number for t in pareto_front(study)} if len(study.directions) == 2 else set()
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        outcome = trial_outcome(trial)
        reducer, layers, settings, label = _describe(attrs.get("prune_config"))
        if not reducer:
            reducer = str(trial.params.get("reducer", ""))
        training = _training(attrs.get("train_config"), recipe or {})
        complete = trial.state == TrialState.COMPLETE and trial.values is not None and len(trial.values) >= 2
        accuracy = trial.values[0] if complete else _number(attrs.get("accuracy"))
        throughput = trial.values[1] if complete else _number(attrs.get("throughput"))
        stopped = None
        if outcome == "stopped":
            found = re.search(r"accuracy (-?[\d.]+)%", str(attrs.get(REASON, "")))
            stopped = float(found.group(1)) if found else None
        rows.append(Row(
            trial=trial, number=trial.number, state=trial.state.name, outcome=outcome,
            reason=str(attrs.get(REASON) or ""), reducer=reducer, layers=layers, settings=settings,
            label=label + (f" + {training}" if training else ""), training=training,
            warm_start=str(attrs.get(WARM_START) or ""), accuracy=_number(accuracy),
            test_accuracy=_number(attrs.get("test_accuracy")), flops=_number(attrs.get("flops")),
            predicted_flops=_number(attrs.get("predicted_flops")), throughput=_number(throughput),
            speedup=_number(attrs.get("speedup")), params=_number(attrs.get("params")),
            checkpoint=str(attrs.get("checkpoint_path") or ""),
            feasible=within_budget(trial),
            on_front=trial.number in front, stopped_accuracy=stopped))
    return rows


def _dataframe(rows: Sequence[Row]):
    import pandas as pd

    columns = ["number", "state", "outcome", "reason", "reducer", "layers", "config", "training", "warm_start",
               "accuracy", "test_accuracy", "gflops", "predicted_gflops", "throughput", "speedup", "params",
               "on_front", "checkpoint_path"]
    return pd.DataFrame([{
        "number": r.number, "state": r.state, "outcome": r.outcome, "reason": r.reason, "reducer": r.reducer,
        "layers": r.layers, "config": r.label, "training": r.training, "warm_start": r.warm_start,
        "accuracy": r.accuracy, "test_accuracy": r.test_accuracy, "gflops": r.gflops,
        "predicted_gflops": None if r.predicted_flops is None else r.predicted_flops / 1e9,
        "throughput": r.throughput, "speedup": r.speedup, "params": r.params, "on_front": r.on_front,
        "checkpoint_path": r.checkpoint,
    } for r in rows], columns=columns)


# -- what the report says -------------------------------------------------------------------------

@dataclass
class Context:
    """Everything the Markdown and HTML renderings share."""

    name: str
    storage: str
    taken: str
    settings: dict
    dense: dict | None
    budget_flops: float | None
    rows: list[Row]
    front: list[Row]

    @property
    def complete(self) -> list[Row]:
        return [r for r in self.rows if r.outcome == "complete" and r.accuracy is not None and r.throughput is not None]

    @property
    def has_test(self) -> bool:
        return any(r.test_accuracy is not None for r in self.complete)

    def count(self, outcome: str) -> int:
        return sum(r.outcome == outcome for r in self.rows)


def _budget_flops(settings: dict, dense: dict | None) -> float | None:
    text = settings.get("budget")
    if text is None:
        return None
    try:
        budget = parse_budget(str(text))
    except BudgetError:
        return None
    if not budget.relative:
        return budget.resolve(0.0)
    dense_flops = _number((dense or {}).get("flops")) or _dense_flops_from_model(settings)
    return budget.resolve(dense_flops) if dense_flops else None


def _dense_flops_from_model(settings: dict) -> float | None:
    """The dense model's FLOPs in closed form, for studies that recorded no dense baseline."""
    try:
        from .flops import predict_flops
        from .trial import create_unweighted

        model = settings["model"]
        return predict_flops(create_unweighted(model["name"], dict(model.get("kwargs") or {})))
    except Exception:  # any missing or odd setting: the plot just goes without a budget line
        return None


def _fmt(value: float | None, spec: str, suffix: str = "", missing: str = "–") -> str:
    return missing if value is None else f"{value:{spec}}{suffix}"


def _gflops(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _params(value: float | None) -> str:
    return "–" if value is None else f"{value / 1e6:.3g} M"


def _settings_items(ctx: Context) -> list[tuple[str, str]]:
    s, items = ctx.settings, []
    model = s.get("model") or {}
    if model:
        kwargs = ", ".join(f"{k}={v}" for k, v in (model.get("kwargs") or {}).items())
        items.append(("model", f"{model.get('name', '?')}" + (f" ({kwargs})" if kwargs else "")
                      + f", weights: {model.get('init', '?')}"))
    if "data" in s:
        data = str(s["data"])
        if data == "synthetic" and isinstance(s.get("synthetic"), dict):
            syn = s["synthetic"]
            data += (f" ({syn.get('num_classes')} classes, {syn.get('image_size')} px, "
                     f"{syn.get('train_size')}/{syn.get('val_size')}/{syn.get('test_size')} train/val/test, "
                     f"seed {syn.get('seed')})")
        items.append(("data", data))
    if "budget" in s:
        budget = str(s["budget"])
        if ctx.budget_flops is not None:
            budget += f" = {format_flops(ctx.budget_flops)} per image"
        items.append(("budget", budget))
    if ctx.dense:
        val = (ctx.dense.get("val") or {}).get("top1")
        items.append(("dense baseline", f"{_fmt(_number(val), '.2f', '% val top-1')}, "
                      f"{format_flops(ctx.dense['flops']) if _number(ctx.dense.get('flops')) else '? FLOPs'}, "
                      f"{_fmt(_number(ctx.dense.get('throughput')), '.0f', ' img/s')}"))
    space = s.get("space")
    if isinstance(space, dict):
        items.append(("search space", "reducers " + ", ".join(map(str, space.get("reducers", []))) or "?"))
    for key, title in (("recipe", "trial recipe"), ("baseline_recipe", "baseline recipe")):
        recipe = s.get(key)
        if isinstance(recipe, dict):
            shown = [f"{recipe.get('epochs')} epochs", f"batch {recipe.get('batch_size')}", f"lr {recipe.get('lr')}"]
            if _number(recipe.get("keep_rate_warmup")):
                shown.append(f"keep-rate warm-up {recipe['keep_rate_warmup']}")
            if _number(recipe.get("beta")):
                shown.append(f"distill {recipe.get('distill')} β={recipe['beta']}")
            items.append((title, ", ".join(shown)))
    for key, title in (("seed", "seed"), ("early_stopping", "early stopping"), ("device", "device")):
        if key in s:
            value = s[key]
            items.append((title, ("on" if value else "off") if isinstance(value, bool) else str(value)))
    return items


def _front_table(ctx: Context) -> tuple[list[str], list[list[str]]]:
    headers = ["trial", "reducer", "layers", "settings", "warm start", "val top-1"]
    if ctx.has_test:
        headers.append("test top-1")
    headers += ["GFLOPs", "img/s", "speedup", "params"]
    body = []
    if ctx.dense:
        dense_row = ["dense", "none", "–", "", "", _fmt(_number((ctx.dense.get("val") or {}).get("top1")), ".2f", "%")]
        if ctx.has_test:
            dense_row.append("–")
        dense_row += [_gflops((_number(ctx.dense.get("flops")) or 0) / 1e9 or None),
                      _fmt(_number(ctx.dense.get("throughput")), ".0f"), "1.00×", "–"]
        body.append(dense_row)
    for r in ctx.front:
        line = [str(r.number), r.reducer, r.layers or "all",
                r.settings + (f" · {r.training}" if r.training else ""), r.warm_start,
                _fmt(r.accuracy, ".2f", "%")]
        if ctx.has_test:
            line.append(_fmt(r.test_accuracy, ".2f", "%"))
        line += [_gflops(r.gflops), _fmt(r.throughput, ".0f"), _fmt(r.speedup, ".2f", "×"), _params(r.params)]
        body.append(line)
    return headers, body


def _warm_start_table(ctx: Context) -> tuple[list[str], list[list[str]]]:
    headers = ["warm start", "trial", "outcome", "val top-1"] + (["test top-1"] if ctx.has_test else []) + \
        ["GFLOPs", "img/s", "speedup", "on front"]
    body = []
    for r in ctx.rows:
        if not r.warm_start:
            continue
        line = [r.warm_start, str(r.number), r.outcome, _fmt(r.accuracy, ".2f", "%")]
        if ctx.has_test:
            line.append(_fmt(r.test_accuracy, ".2f", "%"))
        line += [_gflops((r.plot_flops / 1e9 if r.plot_flops is not None else None)), _fmt(r.throughput, ".0f"),
                 _fmt(r.speedup, ".2f", "×"), "yes" if r.on_front else ""]
        body.append(line)
    return headers, body


def warm_start_gain(ctx: Context) -> str:
    """What the search found beyond the hand-designed configs, in one or two sentences."""
    feasible = [r for r in ctx.complete if r.feasible]
    warm = [r for r in feasible if r.warm_start]
    searched = [r for r in feasible if not r.warm_start]
    if not any(r.warm_start for r in ctx.rows):
        return "No hand-designed config was enqueued (none fits the budget, or the study was not made by a search)."
    if not warm:
        return "No warm-start config finished within the budget, so there is nothing to compare the search with."
    best_warm = max(warm, key=lambda r: (r.accuracy, r.throughput))
    text = (f"Best warm start: {best_warm.warm_start} (trial {best_warm.number}), {best_warm.accuracy:.2f}% at "
            f"{best_warm.throughput:.0f} img/s.")
    if not searched:
        return text + " No searched config has finished yet."
    best = max(searched, key=lambda r: (r.accuracy, r.throughput))
    gain = best.accuracy - best_warm.accuracy
    text += (f" The most accurate searched config (trial {best.number}, {best.reducer}) reaches {best.accuracy:.2f}% "
             f"({gain:+.2f} points) at {best.throughput:.0f} img/s.")
    as_good = [r for r in searched if r.accuracy >= best_warm.accuracy]
    if as_good:
        fastest = max(as_good, key=lambda r: r.throughput)
        ratio = fastest.throughput / best_warm.throughput
        text += (f" At equal or better accuracy, the fastest searched config (trial {fastest.number}) runs "
                 f"{fastest.throughput:.0f} img/s, {ratio:.2f}× the best warm start's throughput.")
    else:
        text += " No searched config matches the best warm start's accuracy yet."
    return text


def _outcome_table(ctx: Context) -> tuple[list[str], list[list[str]]]:
    meaning = {
        "complete": "trained and measured", "stopped": "stopped early by ASHA (not on the front)",
        "failed": "raised or diverged while training (no accuracy)",
        "infeasible": "predicted over budget: never trained", "interrupted": "the search stopped mid-trial (re-run)",
        "running": "training now", "queued": "waiting to run",
    }
    counts: dict[str, int] = {}
    for r in ctx.rows:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    order = [o for o in OUTCOME_ORDER if o in counts] + sorted(set(counts) - set(OUTCOME_ORDER))
    return ["outcome", "trials", "meaning"], [[o, str(counts[o]), meaning.get(o, "")] for o in order]


def _failure_table(ctx: Context, limit: int = 12) -> tuple[list[str], list[list[str]]]:
    failed = [r for r in ctx.rows if r.outcome in ("failed", "interrupted")]
    body = [[str(r.number), r.label or r.reducer, r.reason or "(no reason recorded)"] for r in failed[-limit:]]
    return ["trial", "config", "reason"], body


def _status_note(ctx: Context) -> str | None:
    """The one-line caveat at the top when there is nothing (or nothing measured) to show."""
    if not ctx.rows:
        return "The study has no trials yet: there is nothing to plot. Run (or resume) the search and report again."
    if not ctx.complete:
        parts = [f"{ctx.count(o)} {o}" for o in OUTCOME_ORDER if ctx.count(o)]
        return ("No trial has completed yet (" + ", ".join(parts) + "), so there is no accuracy to plot and no "
                "Pareto front. The outcome table and the failure reasons below say what happened.")
    if not ctx.front:
        return "Trials completed, but none within the budget: the Pareto front is empty."
    return None


# -- plots ----------------------------------------------------------------------------------------

def _style():
    import matplotlib

    return matplotlib.rc_context({
        "font.size": 11, "axes.titlesize": 13, "axes.titleweight": "bold", "axes.labelsize": 11.5,
        "legend.fontsize": 9.5, "axes.spines.top": False, "axes.spines.right": False,
        "axes.grid": True, "grid.color": "#dfe3e8", "grid.linewidth": 0.8, "axes.axisbelow": True,
        "axes.edgecolor": "#8a94a3", "xtick.color": "#3d4451", "ytick.color": "#3d4451",
        "svg.fonttype": "path", "svg.hashsalt": "autoprune",
    })


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _svg_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _png_uri(fig, dpi: int = 110) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _color(reducer: str) -> str:
    return REDUCER_COLORS.get(reducer, "#777777")


def tradeoff_plot(ctx: Context, x: str) -> str:
    """Accuracy against throughput (x="throughput") or GFLOPs (x="gflops"), as an SVG data URI."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    by_flops = x == "gflops"
    flops_seen = [r.flops or r.predicted_flops or 0 for r in ctx.rows] + [ctx.budget_flops or 0]
    unit, unit_name = (1e9, "GFLOPs") if max(flops_seen) >= 1e8 else (1e6, "MFLOPs")
    with _style():
        fig = _figure(10.5, 5.6)
        ax = fig.add_subplot()

        def xof(r: Row) -> float | None:
            if by_flops:
                return None if r.flops is None else r.flops / unit
            return r.throughput

        complete = [r for r in ctx.complete if xof(r) is not None]
        handles: list = []
        for reducer in sorted({r.reducer for r in complete}, key=lambda n: list(REDUCER_COLORS).index(n)
                              if n in REDUCER_COLORS else 99):
            group = [r for r in complete if r.reducer == reducer]
            inside = [r for r in group if r.feasible]
            over = [r for r in group if not r.feasible]
            ax.scatter([xof(r) for r in inside], [r.accuracy for r in inside], s=46, color=_color(reducer),
                       edgecolor="white", linewidth=0.7, alpha=0.9, zorder=3)
            if over:
                ax.scatter([xof(r) for r in over], [r.accuracy for r in over], s=46, facecolor="none",
                           edgecolor=_color(reducer), linewidth=1.4, zorder=3)
            handles.append(Line2D([], [], marker="o", linestyle="", markersize=8, color=_color(reducer),
                                  markeredgecolor="white", label=f"{reducer} ({len(group)})"))
        if any(not r.feasible for r in complete):
            handles.append(Line2D([], [], marker="o", linestyle="", markersize=8, markerfacecolor="none",
                                  markeredgecolor="#555", label="measured over budget (hollow)"))
        front = [r for r in ctx.front if xof(r) is not None]
        if front:
            ax.scatter([xof(r) for r in front], [r.accuracy for r in front], s=120, facecolor="none",
                       edgecolor="#111", linewidth=1.3, zorder=4)
        if not by_flops and front:
            ordered = sorted(front, key=lambda r: r.throughput)
            ax.step([r.throughput for r in ordered], [r.accuracy for r in ordered], where="post", color="#111",
                    linewidth=1.6, zorder=2)
            handles.append(Line2D([], [], color="#111", linewidth=1.6, marker="o", markerfacecolor="none",
                                  markersize=10, label=f"Pareto front ({len(front)})"))
        elif by_flops:
            inside = sorted((r for r in complete if r.feasible), key=lambda r: r.flops / unit)
            steps_x, steps_y, best = [], [], -math.inf
            for r in inside:
                if r.accuracy > best:
                    best = r.accuracy
                    steps_x.append(r.flops / unit)
                    steps_y.append(best)
            if steps_x:
                right = ctx.budget_flops / unit if ctx.budget_flops else steps_x[-1]
                ax.step(steps_x + [max(right, steps_x[-1])], steps_y + [steps_y[-1]], where="post", color="#111",
                        linewidth=1.6, zorder=2)
                handles.append(Line2D([], [], color="#111", linewidth=1.6,
                                      label=f"best accuracy within x {unit_name}"))
            if front:
                handles.append(Line2D([], [], color="none", marker="o", markerfacecolor="none",
                                      markeredgecolor="#111", markersize=10,
                                      label=f"on the accuracy/throughput front ({len(front)})"))
        tested = [r for r in front if r.test_accuracy is not None]
        if tested:
            for r in tested:
                ax.plot([xof(r), xof(r)], [r.accuracy, r.test_accuracy], color="#9aa3af", linewidth=1,
                        linestyle=":", zorder=2)
            ax.scatter([xof(r) for r in tested], [r.test_accuracy for r in tested], marker="_", s=110,
                       color="#4b5563", linewidth=2, zorder=3)
            handles.append(Line2D([], [], marker="_", linestyle="", markersize=11, markeredgewidth=2,
                                  color="#4b5563", label="test top-1 of front trials"))
        for r in complete:
            if r.warm_start:
                ax.scatter([xof(r)], [r.accuracy], marker="*", s=300, color=_color(r.reducer), edgecolor="#111",
                           linewidth=0.9, zorder=5)
                ax.annotate(r.warm_start, (xof(r), r.accuracy), xytext=(7, 6), textcoords="offset points",
                            fontsize=9, color="#222", zorder=6,
                            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none",
                                  "alpha": 0.75})
        if any(r.warm_start for r in complete):
            handles.append(Line2D([], [], marker="*", linestyle="", markersize=14, color="#bbb",
                                  markeredgecolor="#111", label="warm start (hand-designed)"))
        dense_acc = _number(((ctx.dense or {}).get("val") or {}).get("top1"))
        dense_x = _number((ctx.dense or {}).get("flops" if by_flops else "throughput"))
        if dense_acc is not None and dense_x is not None:
            dense_x = dense_x / unit if by_flops else dense_x
            ax.scatter([dense_x], [dense_acc], marker="D", s=70, color="#111", zorder=5)
            # dense is the costliest point (rightmost by FLOPs) and the slowest (leftmost by
            # throughput): label it on the side facing the other trials, never under the legend
            ax.annotate("dense", (dense_x, dense_acc), xytext=(-8 if by_flops else 7, -12), textcoords="offset points",
                        ha="right" if by_flops else "left", fontsize=9.5, fontweight="bold")
            handles.append(Line2D([], [], marker="D", linestyle="", markersize=8, color="#111",
                                  label="dense baseline"))
        if by_flops and ctx.budget_flops:
            ax.axvline(ctx.budget_flops / unit, color="#c0392b", linestyle="--", linewidth=1.5, zorder=1)
            handles.append(Line2D([], [], color="#c0392b", linestyle="--", linewidth=1.5,
                                  label=f"budget {format_flops(ctx.budget_flops)}"))

        # trials without a measured accuracy/throughput
        accuracies = [r.accuracy for r in complete] + [r.test_accuracy for r in tested]
        accuracies += [dense_acc] if dense_acc is not None else []
        stopped = [r for r in ctx.rows if r.outcome == "stopped"]
        infeasible = [r for r in ctx.rows if r.outcome == "infeasible"]
        failed = [r for r in ctx.rows if r.outcome in ("failed", "interrupted")]
        if by_flops:
            placed = [r for r in stopped if r.stopped_accuracy is not None and r.plot_flops is not None]
            if placed:
                ax.scatter([r.plot_flops / unit for r in placed], [r.stopped_accuracy for r in placed], s=34,
                           facecolor="none", edgecolor="#8a8a8a", linewidth=1.2, zorder=2)
                accuracies += [r.stopped_accuracy for r in placed]
            rugs = [(infeasible, "x", "#8a8a8a", 0.035), (failed, "v", "#333333", 0.075),
                    ([r for r in stopped if r not in placed], "o", "#8a8a8a", 0.115)]
            axis = ax.get_xaxis_transform()
            for group, marker, color, height in rugs:
                located = [r.plot_flops / unit for r in group if r.plot_flops is not None]
                if located:
                    style = ({"facecolor": "none", "edgecolor": color} if marker == "o" else {"color": color})
                    ax.scatter(located, [height] * len(located), transform=axis, marker=marker, s=30,
                               linewidth=1.1, zorder=2, clip_on=False, **style)
        where = f"at predicted {unit_name} along the bottom" if by_flops else "not on this plot: no throughput"
        if stopped:
            handles.append(Line2D([], [], marker="o", linestyle="", markersize=7, markerfacecolor="none",
                                  markeredgecolor="#8a8a8a",
                                  label=f"stopped early ({len(stopped)}; " +
                                        ("last accuracy" if by_flops else "no throughput") + ")"))
        if infeasible:
            handles.append(Line2D([], [], marker="x", linestyle="", markersize=7, color="#8a8a8a",
                                  label=f"infeasible, never trained ({len(infeasible)}; {where})"))
        if failed:
            handles.append(Line2D([], [], marker="v", linestyle="", markersize=7, color="#333333",
                                  label=f"failed, no accuracy ({len(failed)}; {where})"))

        xs = [xof(r) for r in complete] + ([dense_x] if dense_acc is not None and dense_x is not None else [])
        if by_flops:
            xs += [r.plot_flops / unit for r in ctx.rows if r.outcome != "complete" and r.plot_flops is not None]
            xs += [ctx.budget_flops / unit] if ctx.budget_flops else []
        if xs:
            left, right = min(xs), max(xs)
            pad = max(right - left, abs(right) * 0.05, 1e-12) * 0.06
            ax.set_xlim(left - pad, right + pad * 1.5)
        if accuracies:
            low, high = min(accuracies), max(accuracies)
            span = max(high - low, 1.0)
            ax.set_ylim(low - span * (0.22 if by_flops else 0.08), high + span * 0.1)
        ax.set_ylabel("validation top-1 accuracy (%)")
        if by_flops:
            ax.set_xlabel(f"{unit_name} per image (measured; predicted for untrained proposals)")
            ax.xaxis.set_major_locator(MaxNLocator(nbins=8))
            ax.set_title("Accuracy vs compute")
        else:
            ax.set_xlabel("throughput (images/s, higher is faster)")
            ax.set_title("Accuracy vs throughput")
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                  borderaxespad=0.0)
        return _svg_uri(fig)


def hypervolume_2d(points: Iterable[tuple[float, float]]) -> float:
    """Area dominated by `points` (both coordinates maximised) above the reference point (0, 0)."""
    volume, covered = 0.0, 0.0
    for first, second in sorted((p for p in points if p[0] > 0 and p[1] > 0), key=lambda p: -p[0]):
        if second > covered:
            volume += first * (second - covered)
            covered = second
    return volume


def hypervolume_history(rows: Sequence[Row]) -> list[tuple[int, float]]:
    """(trial number, hypervolume of the feasible complete trials up to it), per trial."""
    history, points = [], []
    for r in sorted(rows, key=lambda r: r.number):
        if r.outcome == "complete" and r.feasible and r.accuracy is not None and r.throughput is not None:
            points.append((r.accuracy, r.throughput))
        history.append((r.number, hypervolume_2d(points)))
    return history


def hypervolume_plot(ctx: Context) -> str:
    history = hypervolume_history(ctx.rows)
    dense_acc = _number(((ctx.dense or {}).get("val") or {}).get("top1"))
    dense_thr = _number((ctx.dense or {}).get("throughput"))
    scale = dense_acc * dense_thr if dense_acc and dense_thr else 1.0
    with _style():
        fig = _figure(10.5, 3.8)
        ax = fig.add_subplot()
        xs = [n for n, _ in history]
        ys = [v / scale for _, v in history]
        ax.step(xs, ys, where="post", color="#0072B2", linewidth=2)
        previous = 0.0
        by_number = {r.number: r for r in ctx.rows}
        for n, y in zip(xs, ys):
            if y > previous + 1e-12:
                ax.scatter([n], [y], s=40, color=_color(by_number[n].reducer), edgecolor="white", zorder=3)
            previous = y
        warm = [r.number for r in ctx.rows if r.warm_start]
        if warm:
            ax.axvspan(min(warm) - 0.5, max(warm) + 0.5, color="#f1c40f", alpha=0.15, linewidth=0)
            ax.text(min(warm) - 0.4, 0.97, "warm starts", transform=ax.get_xaxis_transform(), va="top",
                    fontsize=9, color="#7a5d00")
        if scale != 1.0:
            ax.axhline(1.0, color="#111", linestyle=":", linewidth=1)
            ax.text(xs[-1] if xs else 0, 1.0, " dense model", va="bottom", ha="right", fontsize=9)
            ax.set_ylabel("hypervolume / dense model's")
        else:
            ax.set_ylabel("hypervolume (% × img/s)")
        ax.set_xlabel("trial number")
        ax.set_title("Search progress: hypervolume of the front (reference: 0 %, 0 img/s)")
        ax.set_ylim(bottom=0)
        return _svg_uri(fig)


def param_importances(study: optuna.Study) -> dict[str, float] | None:
    """fANOVA importance of the parameters for accuracy; None when the study cannot support it."""
    try:
        with _quiet_optuna():
            result = optuna.importance.get_param_importances(
                study, target=lambda t: t.values[0])
    except Exception:  # too few trials, a single value per parameter, or conditional params only
        return None
    return dict(result) or None


def importance_plot(importances: dict[str, float]) -> str:
    ranked = sorted(importances.items(), key=lambda kv: kv[1])
    items = [kv for kv in ranked if kv[1] >= 0.005][-14:] or ranked[-3:]
    hidden = len(ranked) - len(items)
    with _style():
        fig = _figure(10.5, 0.42 * len(items) + 1.4)
        ax = fig.add_subplot()
        ax.barh([k for k, _ in items], [v for _, v in items], color="#0072B2", height=0.6)
        for i, (_, v) in enumerate(items):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize=9.5)
        ax.set_xlabel("importance for validation accuracy (fANOVA, sums to 1)"
                      + (f"; {hidden} more parameters below 0.005 not shown" if hidden else ""))
        ax.set_title("Which parameters mattered for accuracy")
        ax.grid(axis="y", visible=False)
        ax.set_xlim(0, max(v for _, v in items) * 1.15 or 1)
        return _svg_uri(fig)


# -- token-reduction maps -------------------------------------------------------------------------

@dataclass
class MapEntry:
    row: Row
    image: str | None = None   # PNG data URI
    note: str = ""


def patch_status(source, valid=None):
    """Per patch, for one image: -1 pruned (held by no token), 0 kept as itself, g >= 1 merged into
    token group g (several patches in one token). `source` is [N, P] (tokens x patches)."""
    import torch

    if valid is not None:
        source = source[valid]
    held = source.sum(0)
    owner = source.argmax(0)
    members = (source > 1e-6).sum(1)
    status = torch.zeros(source.shape[1], dtype=torch.long)
    status[held <= 1e-6] = -1
    merged_tokens = [int(t) for t in torch.nonzero(members > 1).flatten()]
    for group, token in enumerate(merged_tokens, start=1):
        status[(owner == token) & (held > 1e-6)] = group
    return status


def _load_model(settings: dict, row: Row):
    import timm
    import torch

    from .patch import apply

    state = torch.load(row.checkpoint, map_location="cpu", weights_only=True)
    model = timm.create_model(settings["model"]["name"], num_classes=int(state["head.weight"].shape[0]),
                              **dict(settings["model"].get("kwargs") or {}))
    model.load_state_dict(state)
    return apply(model, PruneConfig.from_dict(row.trial.user_attrs["prune_config"])).eval()


def _sample_images(settings: dict, model):
    import torch

    from .data import SyntheticOptions, load_datasets, model_data_config

    config = model_data_config(model)
    synthetic = SyntheticOptions(**settings["synthetic"]) if isinstance(settings.get("synthetic"), dict) \
        else SyntheticOptions()
    # the synthetic val split depends on the seed, class count and image size only: skip rendering
    # the train and test images, which the maps do not use (seconds for a full-size study)
    synthetic = dataclasses.replace(synthetic, train_size=synthetic.num_classes, test_size=0)
    datasets = load_datasets(settings["data"], config, synthetic=synthetic)
    val = datasets.val
    count = min(SAMPLE_IMAGES, len(val))
    step = len(val) / count
    items = [val[int(i * step)] for i in range(count)]
    images = torch.stack([image for image, _ in items])
    labels = [int(label) for _, label in items]
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["std"]).view(1, 3, 1, 1)
    shown = (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return images, shown, labels, datasets.classes


# distinct colours for merged tokens, the most distinct first (Trubetskoy's list, without greys)
GROUP_COLORS = ("#e6194B", "#3cb44b", "#4363d8", "#ffe119", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
                "#bfef45", "#469990", "#9A6324", "#800000", "#808000", "#000075", "#fabed4", "#dcbeff",
                "#aaffc3", "#ffd8b1")


def _group_colors(count: int) -> list[tuple[float, float, float]]:
    from matplotlib.colors import to_rgb

    return [to_rgb(GROUP_COLORS[i % len(GROUP_COLORS)]) for i in range(count)]


def map_figure(row: Row, model, images, shown, labels, classes) -> tuple[str, str]:
    """One figure per config: the images, then which patches were kept, merged or pruned."""
    import numpy as np
    import torch
    from matplotlib.patches import Patch

    model.track_source = True
    with torch.no_grad():
        logits = model(images)
    tokens = model.final_tokens
    grid = tuple(model.patch_embed.grid_size)
    height, width = shown.shape[1:3]
    count = len(images)
    summaries = []
    with _style():
        fig = _figure(2.55 * count, 5.6)
        axes = fig.subplots(2, count, squeeze=False)
        for b in range(count):
            source = tokens.source[b].float()
            valid = None if tokens.valid is None else tokens.valid[b]
            status = patch_status(source, valid).reshape(grid).numpy()
            groups = int(status.max()) if status.size else 0
            colors = _group_colors(groups)
            overlay = np.zeros(grid + (4,))
            overlay[status == -1] = (0.07, 0.07, 0.09, 0.82)
            for g in range(1, groups + 1):
                overlay[status == g] = colors[g - 1] + (0.55,)
            kept, pruned = int((status == 0).sum()), int((status == -1).sum())
            merged = int((status > 0).sum())
            predicted = int(logits[b].argmax())
            truth = classes[labels[b]] if labels[b] < len(classes) else str(labels[b])
            guess = classes[predicted] if predicted < len(classes) else str(predicted)
            top, bottom = axes[0][b], axes[1][b]
            top.imshow(shown[b], extent=(0, width, height, 0), interpolation="nearest")
            top.set_title(f"{truth}\npredicted: {guess} {'✓' if predicted == labels[b] else '✗'}", fontsize=10,
                          fontweight="normal", color="#1d2433" if predicted == labels[b] else "#b03a2e")
            bottom.imshow(shown[b], extent=(0, width, height, 0), interpolation="nearest")
            bottom.imshow(overlay, extent=(0, width, height, 0), interpolation="nearest")
            ph, pw = height / grid[0], width / grid[1]
            bottom.vlines([pw * i for i in range(1, grid[1])], 0, height, color="white", linewidth=0.4, alpha=0.6)
            bottom.hlines([ph * i for i in range(1, grid[0])], 0, width, color="white", linewidth=0.4, alpha=0.6)
            bottom.set_xlim(0, width)
            bottom.set_ylim(height, 0)
            bottom.set_title(f"kept {kept} · merged {merged}→{groups} · pruned {pruned}", fontsize=9.5,
                             fontweight="normal")
            for ax in (top, bottom):
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
            summaries.append(kept + groups)
        fig.legend(handles=[Patch(facecolor="none", edgecolor="#777", label="kept as itself (no tint)"),
                            Patch(facecolor=(0.07, 0.07, 0.09, 0.82), label="pruned (held by no token)"),
                            Patch(facecolor=_group_colors(1)[0] + (0.55,),
                                  label="merged (one colour per token holding several patches)")],
                   loc="outside lower center", ncol=3, frameon=False, fontsize=10)
        patches = grid[0] * grid[1]
        note = (f"{grid[0]}×{grid[1]} = {patches} patches; the final block sees "
                f"{', '.join(map(str, summaries))} patch tokens for these images")
        return _png_uri(fig), note


def token_maps(ctx: Context, maps: int) -> list[MapEntry]:
    """Maps of the first `maps` front configs; a note instead of an entry where one cannot be drawn."""
    entries = [MapEntry(r) for r in ctx.front[:max(0, maps)]]
    if not entries:
        return []
    model_settings = ctx.settings.get("model")
    if not isinstance(model_settings, dict) or "data" not in ctx.settings:
        for entry in entries:
            entry.note = "the study records no model or data settings: maps skipped"
        return entries
    sample = None
    for entry in entries:
        row = entry.row
        if not row.checkpoint or not Path(row.checkpoint).is_file():
            entry.note = f"checkpoint missing ({row.checkpoint or 'none recorded'}): map skipped"
            continue
        try:
            model = _load_model(ctx.settings, row)
            if sample is None:
                sample = _sample_images(ctx.settings, model)
            entry.image, entry.note = map_figure(row, model, *sample)
        except Exception as error:  # a moved dataset, changed code, an unreadable file: say so, go on
            entry.note = f"map skipped: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return entries


# -- rendering --------------------------------------------------------------------------------------

def _md_table(headers: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(map(cell, line)) + " |" for line in body]
    return "\n".join(lines)


_NUMERIC = re.compile(r"^[–+\-]?[\d.,]+\s*(%|×|M)?$|^–$")


def _html_table(headers: Sequence[str], body: Sequence[Sequence[str]], highlight_first: bool = False) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    rows = []
    for index, line in enumerate(body):
        cells = "".join(
            f'<td class="num">{html.escape(c)}</td>' if _NUMERIC.match(str(c)) else f"<td>{html.escape(str(c))}</td>"
            for c in line)
        css = ' class="ref"' if highlight_first and index == 0 else ""
        rows.append(f"<tr{css}>{cells}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def render_markdown(ctx: Context) -> str:
    out = [f"# autoprune report: study `{ctx.name}`", "",
           f"Snapshot of {ctx.storage} taken {ctx.taken}: {len(ctx.rows)} trials. "
           "Plots and token-reduction maps are in report.html; every trial is in trials.csv, the front in pareto.csv.",
           ""]
    note = _status_note(ctx)
    if note:
        out += [f"> **Note:** {note}", ""]
    out += ["## Settings", ""]
    items = _settings_items(ctx)
    out += [f"- **{k}**: {v}" for k, v in items] if items else ["(the study records no autoprune settings)"]
    out += ["", "## Pareto front (validation accuracy vs throughput, within budget)", ""]
    if ctx.front:
        out += [_md_table(*_front_table(ctx)), "",
                "The front is chosen on validation accuracy" + ("; test accuracy is shown alongside." if ctx.has_test
                                                                 else ".")]
    else:
        out.append("No trial is on the front yet.")
    out += ["", "## Warm starts (hand-designed configs)", ""]
    headers, body = _warm_start_table(ctx)
    if body:
        out += [_md_table(headers, body), ""]
    out += [warm_start_gain(ctx), "", "## Outcomes", "", _md_table(*_outcome_table(ctx)) if ctx.rows else "No trials.",
            ""]
    failures = _failure_table(ctx)
    if failures[1]:
        out += ["## Failures", "", _md_table(*failures), ""]
    return "\n".join(out).rstrip() + "\n"


CSS = """
:root { --ink:#1d2433; --muted:#5b6472; --line:#e3e7ed; --bg:#f4f6f9; --card:#fff; --accent:#0072B2; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", "DejaVu Sans", Arial, sans-serif; }
header { background:#17202e; color:#fff; padding:28px 40px 22px; }
header h1 { margin:0 0 6px; font-size:26px; font-weight:650; letter-spacing:-0.01em; }
header h1 code { background:rgba(255,255,255,.12); color:#fff; }
header p { margin:0; color:#c5cede; }
nav { margin-top:14px; display:flex; flex-wrap:wrap; gap:6px 16px; font-size:14px; }
nav a { color:#9fd3ff; text-decoration:none; } nav a:hover { text-decoration:underline; }
main { max-width:1240px; margin:0 auto; padding:24px 28px 48px; }
section { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:20px 26px;
  margin:0 0 22px; box-shadow:0 1px 2px rgba(20,30,50,.04); }
h2 { font-size:20px; margin:0 0 12px; }
h3 { font-size:16px; margin:18px 0 6px; }
p { margin:8px 0; } .muted { color:var(--muted); font-size:14px; }
code { font: 13px/1.4 ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace;
  background:#eef1f5; padding:1px 5px; border-radius:4px; }
.note { background:#fff8e1; border:1px solid #f2d27a; border-left:5px solid #e0a800; padding:12px 16px;
  border-radius:8px; margin:0 0 22px; font-size:15.5px; }
.cards { display:grid; grid-template-columns:repeat(auto-fit, minmax(200px, 1fr)); gap:14px; margin:0 0 22px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:14px 18px; }
.card .k { color:var(--muted); font-size:13px; text-transform:uppercase; letter-spacing:.04em; }
.card .v { font-size:24px; font-weight:650; margin-top:2px; }
.card .s { color:var(--muted); font-size:13px; }
.scroll { overflow-x:auto; }
table { border-collapse:collapse; width:100%; font-size:14px; font-variant-numeric:tabular-nums; }
th { text-align:left; background:#eef1f5; color:#2b3442; font-weight:600; padding:7px 10px;
  border-bottom:1px solid #d5dbe3; white-space:nowrap; }
td { padding:6px 10px; border-bottom:1px solid var(--line); vertical-align:top; }
td.num { text-align:right; white-space:nowrap; }
tbody tr:nth-child(even) { background:#fafbfc; }
tr.ref td { background:#f1f3f6; color:#4a5261; font-style:italic; }
dl.settings { display:grid; grid-template-columns:max-content 1fr; gap:6px 18px; margin:0; }
dl.settings dt { color:var(--muted); } dl.settings dd { margin:0; }
figure { margin:6px 0 14px; } figure img { max-width:100%; height:auto; display:block; }
figure img.plot { width:100%; }
figcaption { color:var(--muted); font-size:13.5px; margin-top:4px; }
details { margin-top:10px; } summary { cursor:pointer; color:var(--accent); }
pre { background:#f6f8fa; border:1px solid var(--line); border-radius:6px; padding:10px 12px; overflow-x:auto;
  font-size:12.5px; }
.map { border-top:1px solid var(--line); padding-top:12px; margin-top:12px; }
.map:first-of-type { border-top:none; padding-top:0; }
.skip { color:#8a5a00; }
footer { color:var(--muted); font-size:13px; text-align:center; padding:0 0 30px; }
"""


def _cards(ctx: Context) -> str:
    cards = []
    feasible = [r for r in ctx.complete if r.feasible]
    if feasible:
        best = max(feasible, key=lambda r: (r.accuracy, r.throughput))
        cards.append(("best val top-1 within budget", f"{best.accuracy:.2f}%",
                      f"trial {best.number} · {best.reducer} · {best.throughput:.0f} img/s"))
        fastest = max(ctx.front or feasible, key=lambda r: r.throughput)
        speed = f"{fastest.speedup:.2f}× dense · " if fastest.speedup else ""
        cards.append(("fastest on the front", f"{fastest.throughput:.0f} img/s",
                      f"{speed}trial {fastest.number} · {fastest.accuracy:.2f}%"))
    dense_acc = _number(((ctx.dense or {}).get("val") or {}).get("top1"))
    if dense_acc is not None:
        cards.append(("dense baseline", f"{dense_acc:.2f}%",
                      f"{_fmt(_number(ctx.dense.get('throughput')), '.0f', ' img/s')}"))
    cards.append(("trials", str(len(ctx.rows)),
                  " · ".join(f"{ctx.count(o)} {o}" for o in OUTCOME_ORDER if ctx.count(o)) or "none yet"))
    cards.append(("Pareto front", str(len(ctx.front)), "configs within budget, none dominated"))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{html.escape(k)}</div><div class="v">{html.escape(v)}</div>'
        f'<div class="s">{html.escape(s)}</div></div>' for k, v, s in cards) + "</div>"


def _figure_html(uri: str, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    css = "plot" if uri.startswith("data:image/svg") else "raster"
    return f'<figure><img class="{css}" src="{uri}" alt="{html.escape(alt)}">{cap}</figure>'


def render_html(ctx: Context, study: optuna.Study, maps: int) -> tuple[str, int]:
    """The page, and how many map entries it holds."""
    esc = html.escape
    sections: list[tuple[str, str, str]] = []  # (anchor, title, body)

    items = _settings_items(ctx)
    body = ('<dl class="settings">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items) + "</dl>"
            if items else "<p>The study records no autoprune settings.</p>")
    if ctx.settings:
        body += ("<details><summary>all settings (JSON)</summary><pre>" +
                 esc(json.dumps(ctx.settings, indent=2, sort_keys=True, default=str)) + "</pre></details>")
    sections.append(("settings", "Settings", body))

    if ctx.complete:
        body = (_figure_html(tradeoff_plot(ctx, "throughput"), "accuracy vs throughput",
                             "Every complete trial, coloured by reducer; the black step line is the Pareto front "
                             "(no other trial is both more accurate and faster). Stars are the hand-designed "
                             "warm-start configs.") +
                _figure_html(tradeoff_plot(ctx, "gflops"), "accuracy vs GFLOPs",
                             "The same trials against compute. The red dashed line is the budget; proposals "
                             "predicted over it were never trained (× along the bottom), failed trials (▼) have "
                             "no accuracy."))
    else:
        body = f'<p class="skip">{esc(_status_note(ctx) or "")}</p>'
    sections.append(("plots", "Accuracy trade-offs", body))

    if ctx.front:
        body = _html_table(*_front_table(ctx), highlight_first=bool(ctx.dense))
        body += ('<p class="muted">The front is chosen on validation accuracy and throughput' +
                 ("; test accuracy (never used for choosing) is shown alongside." if ctx.has_test else ".") +
                 " Export one with <code>autoprune export --study " + esc(ctx.name) + " --trial N --out DIR</code>."
                 "</p>")
    else:
        body = "<p>No trial is on the front yet.</p>"
    sections.append(("front", "Pareto front", body))

    headers, rows = _warm_start_table(ctx)
    body = (_html_table(headers, rows) if rows else "") + f"<p>{esc(warm_start_gain(ctx))}</p>"
    sections.append(("warm", "Warm starts vs search", body))

    if ctx.complete:
        body = _figure_html(hypervolume_plot(ctx), "hypervolume over trials",
                            "Area under the front (accuracy × throughput), relative to the dense model's "
                            "rectangle; dots mark the trials that grew it, coloured by reducer.")
    else:
        body = "<p>No complete trial yet: the front is empty.</p>"
    sections.append(("progress", "Search progress", body))

    importances = param_importances(study) if ctx.complete else None
    if importances:
        body = _figure_html(importance_plot(importances), "parameter importance",
                            "fANOVA on the complete trials, for validation accuracy. Parameters sampled only for "
                            "some reducers are left out by Optuna when they are not in every trial.")
    else:
        body = ("<p>Parameter importance: not enough trials (it needs several complete trials whose "
                "parameters vary).</p>")
    sections.append(("importance", "Parameter importance", body))

    entries = token_maps(ctx, maps)
    if entries:
        parts = ['<p class="muted">For each front config, 4 validation images and, below each, what the model\'s '
                 "last block receives: patches kept as themselves (unchanged), merged into a token that holds "
                 "several patches (one colour per such token), or pruned (dark).</p>"]
        for entry in entries:
            r = entry.row
            title = (f"Trial {r.number}: {r.label or r.reducer} — {_fmt(r.accuracy, '.2f', '%')} val top-1, "
                     f"{_fmt(r.throughput, '.0f', ' img/s')}")
            inner = (_figure_html(entry.image, f"token map of trial {r.number}", entry.note) if entry.image
                     else f'<p class="skip">{esc(entry.note)}</p>')
            parts.append(f'<div class="map" data-trial="{r.number}"><h3>{esc(title)}</h3>{inner}</div>')
        body = "".join(parts)
    else:
        body = "<p>No front config to map yet.</p>"
    sections.append(("maps", "Token-reduction maps", body))

    body = _html_table(*_outcome_table(ctx)) if ctx.rows else "<p>No trials yet.</p>"
    failures = _failure_table(ctx)
    if failures[1]:
        body += "<h3>Failure reasons (latest)</h3>" + _html_table(*failures)
    sections.append(("outcomes", "Outcomes", body))

    note = _status_note(ctx)
    nav = "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t, _ in sections)
    page = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>autoprune report: {esc(ctx.name)}</title><style>{CSS}</style></head><body>",
        f"<header><h1>autoprune report: <code>{esc(ctx.name)}</code></h1>",
        f"<p>Snapshot of {esc(ctx.storage)} taken {esc(ctx.taken)} · {len(ctx.rows)} trials · "
        "tables: trials.csv, pareto.csv</p>",
        f"<nav>{nav}</nav></header><main>",
        f'<div class="note"><strong>Note:</strong> {esc(note)}</div>' if note else "",
        _cards(ctx),
    ]
    for anchor, title, body in sections:
        page.append(f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>')
    page.append("</main><footer>Made by autoprune report from a read-only snapshot of the study.</footer>"
                "</body></html>")
    return "\n".join(page), len(entries)


# -- entry point ------------------------------------------------------------------------------------

def build_context(study: optuna.Study, storage_url: str) -> Context:
    settings = study.user_attrs.get(SETTINGS_ATTR) or {}
    dense = study.user_attrs.get(DENSE_ATTR)
    rows = trial_rows(study, settings.get("recipe") if isinstance(settings.get("recipe"), dict) else {})
    by_number = {r.number: r for r in rows}
    front = [by_number[t.number] for t in pareto_front(study)] if len(study.directions) == 2 else []
    return Context(name=study.study_name, storage=shown_url(storage_url),
                   taken=_dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip(),
                   settings=settings, dense=dense if isinstance(dense, dict) else None,
                   budget_flops=_budget_flops(settings, dense if isinstance(dense, dict) else None),
                   rows=rows, front=front)


def write_report(storage_url: str, study_name: str, out_dir: str | Path | None = None, maps: int = 3) -> Path:
    """Write trials.csv, pareto.csv, report.md and report.html for the study; return report.html's path.

    Reads a snapshot of the study (so a running search is not disturbed). Raises `StudyNotFound`
    for an unknown study and `StorageError` for a storage that cannot be opened."""
    study = snapshot_study(storage_url, study_name)
    out = Path(out_dir) if out_dir is not None else Path("studies") / study_name
    out.mkdir(parents=True, exist_ok=True)
    ctx = build_context(study, storage_url)
    table = _dataframe(ctx.rows)
    table.to_csv(out / "trials.csv", index=False)
    front_numbers = [r.number for r in ctx.front]
    table.set_index("number").loc[front_numbers].reset_index().to_csv(out / "pareto.csv", index=False)
    (out / "report.md").write_text(render_markdown(ctx), encoding="utf-8")
    page, _ = render_html(ctx, study, maps)
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
