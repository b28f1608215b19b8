"""Is the dense baseline worth reducing? A model near chance has learnt nothing a reducer could
keep: every trial would measure noise, and the front and report would look like results. The
search stops before any trial instead, saying what the baseline reached and what to change."""

from __future__ import annotations

from pathlib import Path

from ..train import TrainConfig
from ..trial import ModelSpec

CHANCE_MARGIN = 5.0  # percentage points above chance a baseline must reach by default


def baseline_refusal(accuracy: float, classes: int, data: str, model: ModelSpec, recipe: TrainConfig,
                     minimum: float | None, cached_in: Path) -> str | None:
    """One line saying why the search stops, or None when `accuracy` (val top-1, %) is at least
    `minimum` (default: chance, 100/classes, plus CHANCE_MARGIN points)."""
    chance = 100.0 / classes
    floor = chance + CHANCE_MARGIN if minimum is None else minimum
    if accuracy >= floor:
        return None
    rule = f"chance + {CHANCE_MARGIN:g} points" if minimum is None else "--min-baseline-accuracy"
    if model.init == "scratch":
        advice = (f"train it longer (--baseline-epochs, now {recipe.epochs:g}), or start from weights that "
                  "know the task: --checkpoint FILE (a model trained on this data) or --pretrained")
    elif recipe.epochs == 0:
        advice = ("fine-tune it on this data (--baseline-epochs 2 or more): 0 epochs take the weights as they are, "
                  f"and a classifier without exactly {classes} outputs starts untrained")
    else:
        advice = (f"fine-tune it longer (--baseline-epochs, now {recipe.epochs:g}) or at another rate "
                  f"(--baseline-lr, now {recipe.lr:g}), or start from a checkpoint trained on this data")
    return (f"the dense baseline reached {accuracy:.1f}% val top-1 on {data} ({classes} classes, chance "
            f"{chance:.1f}%), below the {floor:.1f}% ({rule}) that makes it worth reducing: {advice}; "
            f"it stays cached in {cached_in}")
