"""A Ray Tune searcher that drives an Optuna study by ask/tell, and the study bookkeeping.

Ray's own Optuna integration gets early stops, NaN metrics, missing objectives and resumption
wrong (search.md); this searcher owns all of it. The study is the single source of truth: every
proposal, its outcome and its measurements live there, so a killed search resumes from it.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from ..config import PruneConfig
from ..progress import LiveProgress, format_duration
from ..study import OBJECTIVE_ATTRS, OUTCOME_STATES, best_feasible, finished_count, outcome_of
from ..study_attrs import OUTCOME, REASON, RETRY_OF, RUNG, SCREEN_ACCURACY, SCREEN_TRIAL, WARM_START
from ..train import MAX_SEED, TrainConfig
from .halving import SuccessiveHalving
from .space import Candidate
from .trainable import FAILED, FINAL

# What a re-run of an interrupted trial keeps from it: where its config came from.
_CARRIED = (WARM_START, SCREEN_TRIAL)


def recover_interrupted(study: optuna.Study) -> list[int]:
    """Settle trials left RUNNING by a dead search: one whose outcome was already written gets
    the state it was about to get; the others are marked FAIL (reason kept) and their params
    enqueued again, so that they are re-run. Return the numbers of the re-run ones."""
    recovered = []
    storage = study._storage
    queued = {t.user_attrs.get(RETRY_OF) for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        outcome = outcome_of(trial)
        if outcome in OUTCOME_STATES:
            values = [trial.user_attrs[name] for name in OBJECTIVE_ATTRS] if outcome == "complete" else None
            storage.set_trial_state_values(trial._trial_id, OUTCOME_STATES[outcome], values)
            continue
        # the re-run is queued before the trial is closed, once: a kill in between loses neither
        if trial.number not in queued:
            attrs = {k: v for k, v in trial.user_attrs.items() if k in _CARRIED}
            study.enqueue_trial(trial.params, user_attrs={**attrs, RETRY_OF: trial.number})
        storage.set_trial_user_attr(trial._trial_id, REASON, "the search driving this trial stopped before it finished")
        storage.set_trial_user_attr(trial._trial_id, OUTCOME, "interrupted")
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        recovered.append(trial.number)
    return recovered


@dataclass
class Progress:
    """Prints one line per finished trial: count, best within budget, time used and left; and,
    through `running`, a live line per running trial fed by its per-epoch reports."""

    total: int
    done_before: int
    write: Callable[[str], None] = print
    started: float = field(default_factory=time.perf_counter)
    done_now: int = 0
    running: LiveProgress | None = None  # None: one line per epoch through `write`

    def __post_init__(self) -> None:
        if self.running is None:
            self.running = LiveProgress(self.write)

    def trial_started(self, key: str, number: int, label: str, epochs: float) -> None:
        self.running.start(key, f"  trial {number} {label}", epochs)

    def trial_epoch(self, key: str, result: dict) -> None:
        self.running.update(key, result.get("progress", result["epoch"]),
                            f"loss {result.get('train_loss', float('nan')):.3f}, "
                            f"val top-1 {result.get('accuracy', float('nan')):.2f}%")

    def trial_ended(self, key: str) -> None:
        self.running.finish(key)

    def line(self, study: optuna.Study, trial_number: int, text: str, counts: bool = True) -> None:
        """`counts`: whether the trial is one of the `total` (a trial stopped at a rung is not)."""
        self.done_now += counts
        done = self.done_before + self.done_now
        elapsed = time.perf_counter() - self.started
        left = elapsed / max(1, self.done_now) * max(0, self.total - done)
        best = best_feasible(study)
        best_text = (f"best {best.values[0]:.2f}% at {best.values[1]:.0f} img/s (trial {best.number})"
                     if best else "no feasible result yet")
        self.write(f"[{done}/{self.total}] trial {trial_number}: {text} | {best_text} | "
                   f"{format_duration(elapsed)} elapsed, ~{format_duration(left)} left")


def next_trial(study: optuna.Study) -> optuna.Trial:
    """Re-runs of interrupted trials first, then other queued trials (warm starts, promoted
    screens) in order, then a new proposal. (`Study.ask` would take the queue oldest first.)"""
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    waiting.sort(key=lambda t: (RETRY_OF not in t.user_attrs, t.number))
    for queued in waiting:
        try:
            if study._storage.set_trial_state_values(queued._trial_id, TrialState.RUNNING):
                return optuna.trial.Trial(study, queued._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return study.ask()


def record_infeasible(study: optuna.Study, trial: optuna.Trial, candidate: Candidate, cost: float,
                      budget: float, constraint: str = "flops") -> None:
    """A proposal over budget ends PRUNED with a positive constraint (`flops`, or `seconds` per
    image for a speed budget), never trained: TPE reads that constraint and learns where the
    budget ends."""
    trial.set_user_attr("prune_config", candidate.prune.to_dict())
    trial.set_user_attr(f"predicted_{constraint}", cost)
    trial.set_constraint(constraint, cost / budget - 1)
    end_trial(study, trial, "infeasible")


def end_trial(study: optuna.Study, trial: optuna.Trial, outcome: str, values: list[float] | None = None,
              reason: str | None = None) -> None:
    """Outcome last before the state: `recover_interrupted` relies on this order."""
    if reason is not None:
        trial.set_user_attr(REASON, reason)
    trial.set_user_attr(OUTCOME, outcome)
    if values is None:
        study.tell(trial, state=OUTCOME_STATES[outcome])
    else:
        study.tell(trial, values)


def failure_text(error: Exception) -> str:
    """`Type: first line of the message`, for a reason attribute."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


class StudySearcher(Searcher):
    """Proposes candidates through `study` with `propose` (budget-exact: `Proposer.propose`), checks
    each against the budget with `flops_of` as a safety net (a config over budget is never
    trained, and counted), and records every outcome. A trial's throughput objective is
    `throughput_of` (predicted, deterministic); its measured timing is recorded beside it. With
    `halving`, `at_rung` decides at each rung whether a fine-tune goes on."""

    def __init__(
        self,
        study: optuna.Study,
        propose: Callable[[optuna.Trial], Candidate],
        budget: float,
        flops_of: Callable[[Candidate], float],
        throughput_of: Callable[[Candidate], float],
        train_config: Callable[[Candidate, int], dict[str, Any]],
        target: int,
        progress: Progress,
        max_proposals: int = 500,
        leased: Callable[[], bool] = lambda: True,  # False once another search took the study over
        halving: SuccessiveHalving | None = None,
        constraint: str = "flops",  # what `budget` and `flops_of` count: flops, or seconds per image
    ) -> None:
        # no metric for Ray: its strict check would abort the run on a failure report (search.md #3)
        super().__init__(metric=None, mode=None)
        self.study, self.propose, self.budget = study, propose, budget
        self.flops_of, self.train_config = flops_of, train_config
        self.constraint, self.throughput_of = constraint, throughput_of
        self.target, self.progress, self.max_proposals = target, progress, max_proposals
        self.leased, self.halving = leased, halving
        self.live: dict[str, optuna.Trial] = {}
        self.proposed = self.infeasible = 0
        self.exhausted: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Ray pickles the searcher with the Tuner, for a `Tuner.restore` that autoprune never uses
        (it resumes from the study); the lease check is live state of this process and stays behind."""
        return {**self.__dict__, "leased": _always_leased}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def suggest(self, trial_id: str):
        if not self.exhausted and not self.leased():
            self.exhausted = ("another search took over this study (its lease went stale, e.g. the storage was "
                              "unreachable for a while); this one stopped proposing trials")
        if self.exhausted or finished_count(self.study) + len(self.live) >= self.target:
            return Searcher.FINISHED if not self.live else None
        for _ in range(self.max_proposals):
            trial = next_trial(self.study)
            try:
                candidate = self.propose(trial)
                flops = self.flops_of(candidate)
                predicted = self.throughput_of(candidate)
                train_config = self.train_config(candidate, trial.number)
            except Exception as error:  # a proposal that cannot be built ends FAIL; the search goes on
                reason = f"the proposal could not be built: {failure_text(error)}"
                self._fail(trial, reason)
                self.progress.line(self.study, trial.number, f"FAILED: {reason}")
                return None
            self.proposed += 1
            if flops <= self.budget:
                break
            self.infeasible += 1
            record_infeasible(self.study, trial, candidate, flops, self.budget, self.constraint)
        else:
            self.exhausted = (f"no config within budget among {self.max_proposals} proposals in a row; "
                              "the space barely reaches the budget: raise it or widen the space")
            return Searcher.FINISHED if not self.live else None
        trial.set_user_attr("prune_config", candidate.prune.to_dict())
        trial.set_user_attr(f"predicted_{self.constraint}", flops)
        trial.set_user_attr("predicted_throughput", predicted)
        trial.set_user_attr("ray_trial_id", trial_id)
        trial.set_user_attr("train_config", train_config)
        self.live[trial_id] = trial
        self.progress.trial_started(trial_id, trial.number, candidate.prune.describe(),
                                    TrainConfig.from_dict(train_config).epochs)
        return {"trial_number": trial.number, "prune_config": candidate.prune.to_dict(), "train_config": train_config}

    def at_rung(self, trial_id: str, epoch: int, accuracy: float) -> bool:
        """Whether a fine-tune that reached a successive-halving rung goes on (the scheduler asks)."""
        trial = self.live.get(trial_id)
        if trial is None or self.halving is None:
            return True
        return self.halving.decide(trial, epoch, accuracy)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """A running trial's per-epoch report: its live progress line."""
        if trial_id in self.live and "epoch" in result and not result.get(FINAL) and not result.get(FAILED):
            self.progress.trial_epoch(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        trial = self.live.pop(trial_id, None)
        if trial is None:
            return
        self.progress.trial_ended(trial_id)
        if self.study._storage.get_trial(trial._trial_id).state.is_finished():
            # a search that took over the study settled it (and queued it to run again)
            self.progress.write(f"trial {trial.number} was settled by the search that took over this study; "
                                "its result here is dropped")
            return
        label = _label(trial)
        if error or result is None:
            self._fail(trial, "the Ray worker running it died or raised outside the trial (see the Ray logs)")
            self.progress.line(self.study, trial.number, f"{label} FAILED (worker error)")
            return
        if result.get(FAILED):
            self._fail(trial, result[FAILED])
            self.progress.line(self.study, trial.number, f"{label} FAILED: {result[FAILED]}")
            return
        if not result.get(FINAL):
            # successive halving wrote the outcome and its reason at the rung; Ray only stopped it
            halted = trial.user_attrs.get(RUNG) is not None
            where = f"epoch {result.get('epoch', '?')} ({result.get('accuracy', float('nan')):.2f}%)"
            self._end(trial, "stopped", reason=None if halted else f"stopped after {where}")
            self.progress.line(self.study, trial.number, f"{label} stopped at {where}", counts=False)
            return
        # the prediction is deterministic: the front is not ranked by timing noise
        predicted = trial.user_attrs["predicted_throughput"]
        values = [result.get("accuracy"), predicted]
        if any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
            self._fail(trial, f"non-finite or missing objectives: accuracy={values[0]}, throughput={values[1]}")
            self.progress.line(self.study, trial.number, f"{label} FAILED (bad metrics)")
            return
        for key in ("flops", "flops_std", "params", "throughput", "dense_throughput", "speedup", "accuracy",
                    "top5", "test_accuracy", "dense_mode_accuracy", "checkpoint_path", "seconds", "node_id",
                    SCREEN_ACCURACY):
            trial.set_user_attr(key, result.get(key))
        if isinstance(result.get("throughput"), (int, float)):
            trial.set_user_attr("throughput_error", result["throughput"] / predicted - 1)
        cost = result["flops"] if self.constraint == "flops" else trial.user_attrs[f"predicted_{self.constraint}"]
        trial.set_constraint(self.constraint, cost / self.budget - 1)
        self._end(trial, "complete", values=values)
        self.progress.line(self.study, trial.number,
                           f"{label} {values[0]:.2f}% {result['flops'] / 1e9:.3f} GFLOPs {values[1]:.0f} img/s predicted "
                           f"({result['speedup']:.2f}x measured)")

    def _fail(self, trial: optuna.Trial, reason: str) -> None:
        self._end(trial, "failed", reason=reason)

    def _end(self, trial: optuna.Trial, outcome: str, values: list[float] | None = None,
             reason: str | None = None) -> None:
        end_trial(self.study, trial, outcome, values, reason)


def _always_leased() -> bool:
    return True


def _label(trial) -> str:
    """A trial's config as a short label for progress lines."""
    return PruneConfig.from_dict(trial.user_attrs["prune_config"]).describe()


def fine_tuning_searcher(settings, study, propose, cost_of, limit, throughput_of, trials, done, log, leased,
                         running: LiveProgress | None = None) -> StudySearcher:
    """The searcher of a search's fine-tuning stage (`settings` a `SearchSettings`, `limit` a
    `speed.Limit`), its sampler (TPE, or random for comparisons) seeded by the study's size (a
    resumed search does not replay its first proposals). The sampler learns from fine-tuned trials
    only: screens stay in their own study, as off-the-shelf accuracy is not on the scale of
    fine-tuned accuracy; what the screen knows reaches it through the promoted configs, which it
    sees fine-tuned."""
    seed = (settings.seed + len(study.trials)) % (MAX_SEED + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.sampler = optuna.samplers.RandomSampler(seed=seed) if settings.sampler == "random" else \
            optuna.samplers.TPESampler(multivariate=True, group=True, constant_liar=True, seed=seed,
                                       n_startup_trials=min(10, max(4, trials // 4)))
    return StudySearcher(
        study, propose, limit.limit, cost_of, throughput_of,
        train_config=lambda c, number: dataclasses.replace(
            settings.recipe, **c.train_overrides(), seed=settings.seed + number).to_dict(),
        target=trials, progress=Progress(total=trials, done_before=done, write=log, running=running), leased=leased,
        halving=SuccessiveHalving(study, settings.recipe.epochs, settings.halving) if settings.halving else None,
        constraint=limit.name)
