"""What a study means: the outcome of each trial, which trials count as finished, the feasible
Pareto front, the best result within budget, and reading studies back by name.

The search that writes a study and the report, listings, `show` and `export` that read it all ask
this module, so a rule such as "a trial on the front is complete and within budget" lives in one
place. The attribute names themselves stay in `study_attrs`, which imports nothing: the command
line reads the default storage from it to build its parser before Optuna is loaded.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from .storage import open_storage, shown_url
from .study_attrs import OUTCOME, SCREEN_SUFFIX, SETTINGS_ATTR

OBJECTIVES = ("accuracy", "throughput")  # both maximised, in this order
# the user attributes holding a complete trial's objective values (throughput: predicted from the
# latency table; a fine-tune's measured timing is its `throughput` attribute, beside it)
OBJECTIVE_ATTRS = ("accuracy", "predicted_throughput")
# what `--trials` counts: fine-tunes that ran to their end (a trial successive halving stopped at
# a lower rung did not; a failure counts, so that a space whose trials all fail still ends)
FINISHED_OUTCOMES = ("complete", "failed")
# every outcome a report lists, in the order it lists them
OUTCOME_ORDER = ("complete", "stopped", "failed", "infeasible", "interrupted", "running", "queued")

# The state each outcome ends in. The outcome (and everything it reports) is written before the
# state, so a search killed between the two leaves a RUNNING trial whose outcome says how it ended.
OUTCOME_STATES = {"complete": TrialState.COMPLETE, "failed": TrialState.FAIL,
                  "stopped": TrialState.PRUNED, "infeasible": TrialState.PRUNED}
# what a trial with no recorded outcome (a live one, or one from outside autoprune) is shown as
_STATE_OUTCOME = {TrialState.COMPLETE: "complete", TrialState.FAIL: "failed", TrialState.PRUNED: "stopped",
                  TrialState.RUNNING: "running", TrialState.WAITING: "queued"}


class StudyNotFound(ValueError):
    """No study of that name: the message lists the ones that exist."""


def outcome_of(trial: FrozenTrial) -> str | None:
    """The outcome the search recorded, if any."""
    return trial.user_attrs.get(OUTCOME)


def trial_outcome(trial: FrozenTrial) -> str:
    """The outcome to show for a trial: the recorded one once the trial is finished, else its state.
    A live trial's outcome may be written an instant before its state: the state wins."""
    return ((outcome_of(trial) if trial.state.is_finished() else None)
            or _STATE_OUTCOME.get(trial.state, trial.state.name.lower()))


def within_budget(trial: FrozenTrial) -> bool:
    """Whether the trial met its FLOPs constraint (a trial with none recorded counts as within)."""
    return all(v <= 0 for v in trial.constraints.values())


def finished_count(study: optuna.Study) -> int:
    """Trials that trained to their end (complete or failed)."""
    return sum(outcome_of(t) in FINISHED_OUTCOMES for t in study.get_trials(deepcopy=False))


def infeasible_count(study: optuna.Study) -> int:
    """Proposals screened out over budget, never trained."""
    return sum(outcome_of(t) == "infeasible" for t in study.get_trials(deepcopy=False))


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """Complete, within-budget trials not dominated in (accuracy, throughput), by accuracy."""
    return sorted(study.best_trials, key=lambda t: -t.values[0])


def best_feasible(study: optuna.Study) -> FrozenTrial | None:
    """The most accurate complete trial within budget."""
    feasible = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if within_budget(t)]
    return max(feasible, key=lambda t: (t.values[0], t.values[1]), default=None)


def load_study(storage_url: str, name: str) -> optuna.Study:
    storage = open_storage(storage_url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if name not in names:
        known = ", ".join(sorted(names)) or "none yet"
        raise StudyNotFound(f"--study: no study {name!r} in {shown_url(storage_url)} (studies there: {known})")
    return optuna.load_study(study_name=name, storage=storage)


def study_rows(storage_url: str) -> list[dict[str, Any]]:
    """One summary per study: settings that define it, trial counts and the best result."""
    storage = open_storage(storage_url)
    rows = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if summary.study_name.endswith(SCREEN_SUFFIX):  # a study's screens are part of that study
            continue
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        settings = study.user_attrs.get(SETTINGS_ATTR, {})
        best = best_feasible(study) if len(study.directions) == 2 else None
        rows.append({
            "study": summary.study_name,
            "model": settings.get("model", {}).get("name", "?"),
            "budget": settings.get("budget", "?"),
            "data": settings.get("data", "?"),
            "finished": finished_count(study),
            "trials": len(study.trials),
            "infeasible": infeasible_count(study),
            "best": f"{best.values[0]:.2f}% at {best.values[1]:.0f} img/s (trial {best.number})" if best else "-",
        })
    return rows
