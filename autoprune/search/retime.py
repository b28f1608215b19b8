"""The front re-timed at the end of a search: each front config against the dense model, more
interleaved rounds than a trial's own timing (a few rounds, taken while the machine did whatever
else it did), so the measured speedups a user reads beside the predicted ones are worth comparing.
Stored on the study (finished trials cannot change), and done again only when the front changed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna

from ..config import PruneConfig
from ..study import pareto_front
from ..study_attrs import FRONT_TIMING_ATTR

FRONT_ROUNDS = 15  # as the latency validation: the median of 15 rounds is stable on a shared CPU
# the dense model re-timed this far from the table's prediction: the machine is not as it was when
# the table was made. Speedups often survive it (quickstart tables 16-18 % off kept them within 3-6 %),
# not always (a DeiT-S table 26 % off predicted them 10 % high): benchmarks/latency_validation_cpu.md
MACHINE_CHANGED = 0.15


@dataclass(frozen=True)
class FrontTiming:
    """img/s of the dense model and of each front trial (by number), one interleaved run."""

    rounds: int
    batch_size: int
    dense: float
    trials: dict[int, float]

    def speedup(self, number: int) -> float | None:
        rate = self.trials.get(number)
        return None if rate is None else rate / self.dense

    def machine_note(self, predicted_dense: float) -> str | None:
        """A warning when the dense model, re-timed, runs far from the table's prediction."""
        change = self.dense / predicted_dense - 1
        if abs(change) <= MACHINE_CHANGED:
            return None
        return (f"the dense model re-timed at {self.dense:.0f} img/s, {change:+.0%} from the latency table's "
                f"{predicted_dense:.0f}: the machine's load differs from when the table was made; speedups, being "
                "ratios, often still agree (the measured column shows whether they do), and where they do not, "
                "calibrate again with the machine as it will serve before a new study (autoprune calibrate --refresh)")

    def to_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "batch_size": self.batch_size, "dense": self.dense,
                "trials": {str(number): rate for number, rate in self.trials.items()}}

    @classmethod
    def of(cls, study: optuna.Study) -> "FrontTiming | None":
        record = study.user_attrs.get(FRONT_TIMING_ATTR)
        if not isinstance(record, dict):
            return None
        return cls(int(record["rounds"]), int(record["batch_size"]), float(record["dense"]),
                   {int(number): float(rate) for number, rate in record["trials"].items()})


TimeModels = Callable[[dict[str, tuple[PruneConfig, Path | None]], int], dict[str, float]]


def retime_front(study: optuna.Study, time_models: TimeModels, batch_size: int, log: Callable[[str], None],
                 rounds: int = FRONT_ROUNDS) -> FrontTiming | None:
    """Time the study's front with `time_models(configs and checkpoints by name, rounds)` (img/s
    by name, "dense" among them) unless the stored timing already covers exactly this front."""
    front = pareto_front(study)
    if not front:
        return None
    stored = FrontTiming.of(study)
    numbers = {t.number for t in front}
    if stored is not None and set(stored.trials) == numbers and (stored.rounds, stored.batch_size) == (rounds, batch_size):
        return stored
    models = {}
    for trial in front:
        checkpoint = Path(trial.user_attrs.get("checkpoint_path") or "")
        models[str(trial.number)] = (PruneConfig.from_dict(trial.user_attrs["prune_config"]),
                                     checkpoint if checkpoint.is_file() else None)
    missing = [name for name, (_, checkpoint) in models.items() if checkpoint is None]
    log(f"re-timing the {len(front)} front configs against dense: {rounds} interleaved rounds at batch {batch_size}"
        + (f" (trials {', '.join(missing)}: checkpoint gone, timed with the baseline's weights)" if missing else ""))
    try:
        rates = time_models(models, rounds)
    except Exception as error:  # the trials are recorded already: a failed timing costs only the timing
        log(f"re-timing the front failed ({type(error).__name__}: {error}); the front shows each trial's own timing")
        return None
    timing = FrontTiming(rounds, batch_size, rates["dense"], {int(name): rates[name] for name in models})
    study.set_user_attr(FRONT_TIMING_ATTR, timing.to_dict())
    return timing
