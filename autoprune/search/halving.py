"""Successive halving on fine-tuning epochs, promoting by Pareto rank (accuracy, cost).

Ray Tune's schedulers rank on one metric and Optuna's pruners refuse multi-objective studies, so
autoprune decides itself. Rungs sit at E/eta^k whole epochs below the full E. When a fine-tune
reports the epoch of a rung, it goes on only if it is in the best 1/eta (by `pareto_order` on
validation accuracy at that rung and predicted throughput) of every trial that reached that
rung so far, as asynchronous successive halving (ASHA) does with one metric. Only accuracy
changes with training, so speed needs no re-measuring at a rung.

The rung table lives in the study: each trial records its accuracy at each rung it reaches, and
a stopped trial its outcome and rung before Ray stops it, so a search killed at any moment
resumes with the same table. Warm starts are recorded but never stopped: every study measures
the hand-designed configs at full fidelity.
"""

from __future__ import annotations

import math
from typing import Callable

import optuna
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from ..study import outcome_of
from ..study_attrs import OUTCOME, REASON, RUNG, RUNG_ACCURACY, WARM_START
from .pareto import pareto_order
from .trainable import FAILED, FINAL


def rung_epochs(epochs: float, eta: int) -> tuple[int, ...]:
    """The whole epochs below `epochs` at which trials are compared: E/eta^k rounded, k = 1, 2, ...
    (at least 1). Empty when a trial is too short to have a rung below full fidelity."""
    if eta < 2:
        raise ValueError(f"successive halving: eta {eta!r} is invalid; accepted: an integer >= 2")
    rungs, k = set(), 1
    while epochs / eta ** k >= 0.5:
        rung = max(1, round(epochs / eta ** k))
        if rung < epochs:
            rungs.add(rung)
        k += 1
    return tuple(sorted(rungs))


def survives(points: list[tuple[float, float]], index: int, eta: int) -> bool:
    """Whether points[index] is among the best ceil(n/eta) of the n points by Pareto order."""
    keep = math.ceil(len(points) / eta)
    return pareto_order(points).index(index) < keep


class SuccessiveHalving:
    """Rung decisions for the fine-tunes of `study` (the driver calls `decide`; it writes the study)."""

    def __init__(self, study: optuna.Study, epochs: float, eta: int) -> None:
        self.study, self.eta = study, eta
        self.rungs = rung_epochs(epochs, eta)

    def decide(self, trial: optuna.Trial, epoch: int, accuracy: float) -> bool:
        """Record the trial's accuracy at `epoch`; False (with the trial's outcome written as
        stopped at that rung) when it should stop there."""
        if epoch not in self.rungs:
            return True
        reached = {**trial.user_attrs.get(RUNG_ACCURACY, {}), str(epoch): accuracy}
        trial.set_user_attr(RUNG_ACCURACY, reached)
        if trial.user_attrs.get(WARM_START):
            return True
        points = [(accuracy, trial.user_attrs["predicted_throughput"])]
        for other in self.study.get_trials(deepcopy=False):
            record = other.user_attrs.get(RUNG_ACCURACY, {})
            # an interrupted trial's record would count its re-run twice
            if other.number != trial.number and str(epoch) in record and outcome_of(other) != "interrupted":
                points.append((record[str(epoch)], other.user_attrs["predicted_throughput"]))
        if survives(points, 0, self.eta):
            return True
        # written before Ray stops the trial: a search killed now resumes with it settled
        trial.set_user_attr(RUNG, epoch)
        trial.set_user_attr(REASON, stopped_reason(epoch, accuracy, len(points), self.eta))
        trial.set_user_attr(OUTCOME, "stopped")
        return False


def stopped_reason(epoch: int, accuracy: float, peers: int, eta: int) -> str:
    return (f"stopped by successive halving at the epoch-{epoch} rung (accuracy {accuracy:.2f}%): "
            f"not in the best 1/{eta} of the {peers} trials there")


class HalvingScheduler(FIFOScheduler):
    """Ray Tune's side of successive halving: at a rung it asks `at_rung(trial_id, epoch, accuracy)`
    and stops the trial when that says no. Everything else runs first in, first out."""

    _supports_buffered_results = False  # every epoch's report must reach the rung check

    def __init__(self, rungs: tuple[int, ...], at_rung: Callable[[str, int, float], bool]) -> None:
        super().__init__()
        self.rungs, self.at_rung = set(rungs), at_rung

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        epoch, accuracy = result.get("epoch"), result.get("accuracy")
        if (epoch in self.rungs and not result.get(FINAL) and not result.get(FAILED)
                and isinstance(accuracy, (int, float)) and math.isfinite(accuracy)):
            return TrialScheduler.CONTINUE if self.at_rung(trial.trial_id, epoch, accuracy) else TrialScheduler.STOP
        return TrialScheduler.CONTINUE

