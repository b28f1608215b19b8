"""What the report says: the `Context` both renderings share (settings, dense baseline, budget,
rows, front) and the tables and sentences built from it, as plain text cells."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

import optuna

from ..search.budget import BudgetError, format_flops, parse_budget
from ..search.retime import FrontTiming
from ..storage import shown_url
from ..study import OUTCOME_ORDER, pareto_front
from ..study_attrs import DENSE_ATTR, SETTINGS_ATTR
from .rows import Row, _number, trial_rows
from .screening import Stages, study_stages


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
    stages: Stages | None = None  # screening and successive halving, when the study used them
    front_timing: FrontTiming | None = None  # the front re-timed against dense at the end of the search

    @property
    def complete(self) -> list[Row]:
        return [r for r in self.rows if r.outcome == "complete" and r.accuracy is not None and r.throughput is not None]

    @property
    def has_test(self) -> bool:
        return any(r.test_accuracy is not None for r in self.complete)

    @property
    def dense_throughput(self) -> float | None:
        """The dense model's img/s on the scale of the trials' objective: predicted where the study
        predicts (its measured figure otherwise)."""
        dense = self.dense or {}
        return _number(dense.get("predicted_throughput", dense.get("throughput")))

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
        from ..flops import predict_flops
        from ..trial import create_unweighted

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
    if "screen" in s:
        items.append(("screening", f"{s['screen']} configs on {s.get('screen_images')} val images" if s["screen"]
                      else "off"))
    if "halving" in s:
        items.append(("successive halving", f"eta {s['halving']}" if s["halving"] else "off"))
    if s.get("early_stopping"):
        items.append(("early stopping", "ASHA (a study from before successive halving)"))
    for key, title in (("seed", "seed"), ("device", "device")):
        if key in s:
            items.append((title, str(s[key])))
    return items


def _front_table(ctx: Context) -> tuple[list[str], list[list[str]]]:
    headers = ["trial", "reducer", "layers", "settings", "warm start", "val top-1"]
    if ctx.has_test:
        headers.append("test top-1")
    headers += ["GFLOPs", "img/s", "measured img/s", "prediction error", "measured speedup", "params"]
    timing = ctx.front_timing
    body = []
    if ctx.dense:
        dense_row = ["dense", "none", "–", "", "", _fmt(_number((ctx.dense.get("val") or {}).get("top1")), ".2f", "%")]
        if ctx.has_test:
            dense_row.append("–")
        predicted, measured = _number(ctx.dense.get("predicted_throughput")), _number(ctx.dense.get("throughput"))
        error = None if predicted is None or measured is None else measured / predicted - 1
        if timing is not None:  # the front's errors are of speedups: dense's is 0 by definition
            measured, error = timing.dense, None
        dense_row += [_gflops((_number(ctx.dense.get("flops")) or 0) / 1e9 or None),
                      _fmt(predicted if predicted is not None else measured, ".0f"), _fmt(measured, ".0f"),
                      _fmt(error, "+.0%"), "1.00×", "–"]
        body.append(dense_row)
    for r in ctx.front:
        line = [str(r.number), r.reducer, r.layers or "all",
                r.settings + (f" · {r.training}" if r.training else ""), r.warm_start,
                _fmt(r.accuracy, ".2f", "%")]
        if ctx.has_test:
            line.append(_fmt(r.test_accuracy, ".2f", "%"))
        measured, error, speedup = r.measured_throughput, r.throughput_error, r.speedup
        if timing is not None and r.number in timing.trials:
            measured, speedup = timing.trials[r.number], timing.speedup(r.number)
            predicted = (r.throughput / ctx.dense_throughput) if r.throughput and ctx.dense_throughput else None
            error = None if predicted is None else speedup / predicted - 1
        line += [_gflops(r.gflops), _fmt(r.throughput, ".0f"), _fmt(measured, ".0f"),
                 _fmt(error, "+.0%"), _fmt(speedup, ".2f", "×"), _params(r.params)]
        body.append(line)
    return headers, body


def throughput_note(ctx: Context) -> str:
    """What the front's throughput columns are."""
    batch = (ctx.dense or {}).get("serve_batch")
    if batch is None:  # a study from before the latency model: its objective was the timing
        return "img/s is the trial's own interleaved timing against the dense model."
    predicted = (f"img/s is the throughput objective, predicted at batch {batch} from the latency table calibrated "
                 "for this model and device (deterministic, so the front is not ranked by timing noise); ")
    timing = ctx.front_timing
    if timing is not None:
        note = timing.machine_note(ctx.dense_throughput) if ctx.dense_throughput else None
        return predicted + (f"measured img/s and speedup come from re-timing the front against the dense model at the "
                            f"end of the search (median of {timing.rounds} interleaved rounds at batch "
                            f"{timing.batch_size}), and the prediction error is measured speedup / predicted speedup - 1."
                            + (f" Note: {note}." if note else ""))
    return predicted + ("measured img/s is the trial's own interleaved timing, and the prediction error is "
                        "measured / predicted - 1.")


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


def over_budget_line(ctx: Context) -> str:
    """How many proposals the budget check screened out: 0 with budget-exact proposals."""
    proposals = [r for r in ctx.rows if r.predicted_flops is not None]
    over = sum(r.outcome == "infeasible" for r in proposals)
    return (f"Proposals over budget: {over} of {len(proposals)} (each proposal's FLOPs are predicted before "
            "training; one over budget is screened out, never trained).")


def _outcome_table(ctx: Context) -> tuple[list[str], list[list[str]]]:
    meaning = {
        "complete": "trained and measured", "stopped": "stopped at a lower rung by successive halving (not on the front)",
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
                   rows=rows, front=front, stages=study_stages(study, storage_url, settings),
                   front_timing=FrontTiming.of(study))
