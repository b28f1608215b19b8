"""What a study contains, as the report reads it: a snapshot of the study, and one flat `Row` per
trial (outcome, config, measurements, whether it is on the front), also as the CSV table."""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..config import ConfigError, PruneConfig
from ..study import load_study, pareto_front, trial_outcome, within_budget
from ..study_attrs import REASON, RUNG, SCREEN_ACCURACY, WARM_START


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
    throughput: float | None  # the objective: predicted (studies before prediction: measured)
    speedup: float | None
    measured_throughput: float | None
    throughput_error: float | None  # measured / predicted - 1
    params: float | None
    checkpoint: str
    feasible: bool
    on_front: bool = False
    stopped_accuracy: float | None = None  # the accuracy at which a trial was stopped
    screen_accuracy: float | None = None   # off the shelf, on the screen images, before fine-tuning
    rung: int | None = None                # the successive-halving rung (epoch) it was stopped at

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
            measured_throughput=_number(attrs.get("throughput")), throughput_error=_number(attrs.get("throughput_error")),
            checkpoint=str(attrs.get("checkpoint_path") or ""),
            feasible=within_budget(trial),
            on_front=trial.number in front, stopped_accuracy=stopped,
            screen_accuracy=_number(attrs.get(SCREEN_ACCURACY)),
            rung=attrs.get(RUNG) if isinstance(attrs.get(RUNG), int) else None))
    return rows


def rows_table(rows: Sequence[Row]):
    import pandas as pd

    columns = ["number", "state", "outcome", "reason", "reducer", "layers", "config", "training", "warm_start",
               "accuracy", "test_accuracy", "gflops", "predicted_gflops", "throughput", "measured_throughput",
               "throughput_error", "speedup", "params",
               "on_front", "screen_accuracy", "rung", "checkpoint_path"]
    return pd.DataFrame([{
        "number": r.number, "state": r.state, "outcome": r.outcome, "reason": r.reason, "reducer": r.reducer,
        "layers": r.layers, "config": r.label, "training": r.training, "warm_start": r.warm_start,
        "accuracy": r.accuracy, "test_accuracy": r.test_accuracy, "gflops": r.gflops,
        "predicted_gflops": None if r.predicted_flops is None else r.predicted_flops / 1e9,
        "throughput": r.throughput, "measured_throughput": r.measured_throughput,
        "throughput_error": r.throughput_error, "speedup": r.speedup, "params": r.params, "on_front": r.on_front,
        "screen_accuracy": r.screen_accuracy, "rung": r.rung, "checkpoint_path": r.checkpoint,
    } for r in rows], columns=columns)
