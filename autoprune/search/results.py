"""Reading studies back: which exist, their fronts, and the trial a user picks."""

from __future__ import annotations

from typing import Any

import optuna

from ..study_attrs import SETTINGS_ATTR
from .searcher import best_feasible, finished_count, infeasible_count
from .storage import open_storage, shown_url


class StudyNotFound(ValueError):
    """No study of that name: the message lists the ones that exist."""


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
