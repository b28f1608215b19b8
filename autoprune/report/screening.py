"""The report's screening section: how many configs were screened off the shelf and promoted to
fine-tuning, what successive halving stopped, and whether the screen ranked configs as
fine-tuning did (Kendall tau), said plainly when it is too weak to rely on."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import optuna

from ..search.screen import THROUGHPUT_NOTE, ProxyCheck, screen_tau
from ..study import StudyNotFound
from ..study_attrs import OUTCOME, PROMOTED_ATTR, RUNG, SCREEN_SUFFIX
from .rows import snapshot_study


@dataclass(frozen=True)
class Stages:
    """What the stages before and during fine-tuning did, for one study."""

    screened: int | None       # None: the study was not screened
    screen_failed: int
    screen_infeasible: int
    promoted: int
    screen_images: int | None
    check: ProxyCheck
    stopped_by_rung: dict[int, int]

    def sentences(self) -> list[str]:
        lines = []
        if self.screened is not None:
            lines.append(f"Screened {self.screened} configs off the shelf (the dense baseline's weights, no "
                         f"training) on {self.screen_images or '?'} validation images ({self.screen_failed} failed, "
                         f"{self.screen_infeasible} proposals over budget); {self.promoted} promoted to fine-tuning; "
                         f"{THROUGHPUT_NOTE}.")
            lines.append(f"Screen as a proxy: {self.check.verdict()}.")
        if self.stopped_by_rung:
            lines.append("Successive halving stopped " + ", ".join(
                f"{count} at epoch {rung}" for rung, count in sorted(self.stopped_by_rung.items())) +
                " (PRUNED, never on the front).")
        return lines


def study_stages(study: optuna.Study, storage_url: str, settings: dict) -> Stages | None:
    """The stages of `study` (a snapshot); its screens are read from a snapshot of the companion study."""
    try:
        screen = snapshot_study(storage_url, study.study_name + SCREEN_SUFFIX)
    except StudyNotFound:
        screen = None
    rungs = Counter(t.user_attrs.get(RUNG) for t in study.get_trials(deepcopy=False)
                    if t.user_attrs.get(OUTCOME) == "stopped" and isinstance(t.user_attrs.get(RUNG), int))
    if screen is None and not rungs:
        return None
    outcomes = Counter(t.user_attrs.get(OUTCOME) for t in screen.get_trials(deepcopy=False)) if screen else Counter()
    return Stages(screened=outcomes["complete"] + outcomes["failed"] if screen else None,
                  screen_failed=outcomes["failed"], screen_infeasible=outcomes["infeasible"],
                  promoted=len(study.user_attrs.get(PROMOTED_ATTR) or ()),
                  screen_images=settings.get("screen_images"), check=screen_tau(study), stopped_by_rung=dict(rungs))
