"""Screening: many candidates evaluated off the shelf before any fine-tuning, and the promotion of
the best of them to fine-tuning.

A screen applies a candidate's reduction to the dense baseline's weights and evaluates it, with
no training, on a fixed seeded subset of validation images (`--screen-images`): seconds where a
fine-tune takes minutes. Screens live in a companion study `<study>:screen` in the same storage:
a search killed while screening resumes without redoing finished screens, and off-the-shelf
results never mix with fine-tuned ones (the front, and the fine-tuning sampler's model, hold only
fine-tuned trials). Ray actors evaluate batches of configs in parallel; only the driver writes.

Promotion enqueues the best screened structures into the fine-tuning study (Pareto order on
screen accuracy and throughput, with a quota per reducer). Training-only parameters (distillation,
learning rate) cannot be screened, so the fine-tuning sampler chooses them for promoted trials.
Whether the screen ranks configs as fine-tuning does is checked, not assumed: `screen_tau`.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import optuna
from optuna.trial import TrialState

from ..study import finished_count, within_budget
from ..study_attrs import (PROMOTED_ATTR, SCREEN_ACCURACY, SCREEN_OF_ATTR, SCREEN_SUFFIX, SCREEN_TRIAL, UID_ATTR,
                           WARM_START, WARM_STARTED_ATTR)
from .pareto import kendall_tau, pareto_order
from .searcher import end_trial, failure_text, format_duration, next_trial, record_infeasible, recover_interrupted
from .space import TRAINING_ONLY, Candidate
from .trainable import FAILED

SCREEN_OBJECTIVES = ("accuracy", "throughput")  # off the shelf, on the screen images; both maximised
SCREEN_SAMPLER = "tpe"   # measured against qmc and random: benchmarks/screen_sampler.py
SCREEN_BATCH = 4         # configs per actor call: small, so the sampler sees results often
PROMOTED_SHARE = 0.5     # of the fine-tunes left after the warm starts; the sampler proposes the rest
REDUCER_QUOTA = 0.5      # no reducer takes more than this share of the promoted slots
RELIABLE_TAU, MIN_PAIRS = 0.3, 8
THROUGHPUT_NOTE = "screen throughput predicted from the calibrated latency table"


class Speed(Protocol):
    """What screening needs of `speed.SpeedModel`: predicted images/s of a config and its ratio to dense."""

    def throughput(self, prune) -> float: ...
    def speedup(self, prune) -> float: ...


class ScreenError(ValueError):
    """A screen study that belongs to another study: the search refuses it before anything runs."""


class Pool(Protocol):
    """What screening needs of `ray.util.ActorPool` (a test may pass an in-process one)."""

    def submit(self, fn: Callable, value: Any) -> None: ...
    def get_next_unordered(self) -> Any: ...
    def has_next(self) -> bool: ...
    def has_free(self) -> bool: ...


def screen_study(study: optuna.Study) -> optuna.Study:
    """The companion study holding `study`'s screens, created on first use. One left behind by
    another study of the same name (the main study was deleted and made again) is refused."""
    name = study.study_name + SCREEN_SUFFIX
    screen = optuna.create_study(storage=study._storage, study_name=name, directions=["maximize", "maximize"],
                                 load_if_exists=True)
    owner = screen.user_attrs.get(SCREEN_OF_ATTR)
    if owner is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            screen.set_metric_names(list(SCREEN_OBJECTIVES))
        screen.set_user_attr(SCREEN_OF_ATTR, study.user_attrs[UID_ATTR])
    elif owner != study.user_attrs[UID_ATTR]:
        raise ScreenError(f"study {name!r} holds the screens of another study named {study.study_name!r} "
                         "(made before this one); choose another --study name")
    return screen


def screen_sampler(kind: str, seed: int, target: int) -> optuna.samplers.BaseSampler:
    """The sampler of the screen study, seeded by the caller (by the study's size on a resume, so
    a resumed search does not replay its first proposals)."""
    if kind == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(multivariate=True, group=True, constant_liar=True, seed=seed,
                                              n_startup_trials=max(10, target // 4))
    if kind == "qmc":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"screen sampler {kind!r} is unknown; accepted: tpe, qmc, random")


def screen_and_promote(
    study: optuna.Study,
    target: int,
    slots: int,
    seed: int,
    propose: Callable[[optuna.Trial], Candidate],
    cost_of: Callable[[Candidate], float],
    budget: float,
    constraint: str,
    speed: Speed,
    warm_start: Callable[[optuna.Study], list[str]],
    open_pool: Callable[[], Any],
    log: Callable[[str], None] = print,
    leased: Callable[[], bool] = lambda: True,
) -> ScreenRun | None:
    """The screening stage of a search on `study`: resume or start its screen study (warm starts
    screened first), screen up to `target`, then promote `slots` configs, once. None when an
    earlier run already promoted. `open_pool()` is a context manager giving the workers."""
    if PROMOTED_ATTR in study.user_attrs:
        return None
    if slots == 0:  # a later search with more --trials screens then
        log("screening skipped: the warm starts take every fine-tune --trials allows")
        return None
    screen = screen_study(study)
    recovered = recover_interrupted(screen)
    if recovered:
        log(f"resuming screening: screens {recovered} were interrupted; queued to run again")
    if not screen.user_attrs.get(WARM_STARTED_ATTR):
        warm_start(screen)
        screen.set_user_attr(WARM_STARTED_ATTR, True)
    run = ScreenRun(screened=finished_count(screen))
    if run.screened < target:
        screen.sampler = screen_sampler(SCREEN_SAMPLER, (seed + len(screen.trials)) % 2**32, target)
        log(f"screening {target - run.screened} configs off the shelf ({run.screened} done before; {THROUGHPUT_NOTE})")
        with open_pool() as pool:
            run = run_screening(screen, propose, cost_of, budget, constraint, speed, target, pool, SCREEN_BATCH,
                                log, leased)
        if run.stopped:
            return run
    promoted = promote(study, screen, slots)
    log(f"promoted to fine-tuning: {len(promoted)} screened configs (screens {', '.join(map(str, promoted)) or 'none'})")
    return run


@dataclass
class ScreenRun:
    """What one screening pass did (the study holds the results)."""

    screened: int = 0       # finished screens in the study (complete or failed), this pass included
    proposed: int = 0       # proposals this pass
    infeasible: int = 0     # of which over budget (never screened)
    screened_here: int = 0  # finished screens this pass
    logged: float = 0.0     # when progress was last written
    stopped: str | None = None  # why screening stopped before its target, if it did
    seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)


def run_screening(
    screen: optuna.Study,
    propose: Callable[[optuna.Trial], Candidate],
    cost_of: Callable[[Candidate], float],
    budget: float,
    constraint: str,
    speed: Speed,
    target: int,
    pool: Pool,
    batch: int,
    log: Callable[[str], None] = print,
    leased: Callable[[], bool] = lambda: True,
    max_proposals: int = 500,
) -> ScreenRun:
    """Screen until `screen` holds `target` finished screens. The driver proposes (queued trials
    first: re-runs, warm starts), checks the budget (`cost_of` against `budget`, recorded as the
    `constraint`), hands batches of configs to `pool` and records every result with `speed`'s
    predicted throughput; a config over budget is recorded infeasible and never evaluated."""
    run = ScreenRun(screened=finished_count(screen))
    live: dict[int, tuple[optuna.Trial, float]] = {}
    in_a_row = 0  # proposals over budget since the last one within
    while True:
        while pool.has_free() and not run.stopped and run.screened + len(live) < target:
            if not leased():
                run.stopped = "another search took over this study"
                break
            jobs = []
            while len(jobs) < batch and run.screened + len(live) < target and in_a_row < max_proposals:
                trial = next_trial(screen)
                try:
                    candidate = propose(trial)
                    cost = cost_of(candidate)
                except Exception as error:  # a proposal that cannot be built ends FAIL, as a fine-tune's does
                    end_trial(screen, trial, "failed", reason=f"the proposal could not be built: {failure_text(error)}")
                    run.screened += 1
                    continue
                run.proposed += 1
                if cost > budget:
                    run.infeasible += 1
                    in_a_row += 1
                    record_infeasible(screen, trial, candidate, cost, budget, constraint)
                    continue
                in_a_row = 0
                trial.set_user_attr("prune_config", candidate.prune.to_dict())
                trial.set_user_attr(f"predicted_{constraint}", cost)
                trial.set_constraint(constraint, cost / budget - 1)
                live[trial.number] = (trial, candidate)
                jobs.append((trial.number, candidate.prune.to_dict()))
            if in_a_row >= max_proposals:
                run.stopped = (f"no config within budget among {max_proposals} proposals in a row; "
                               "the space barely reaches the budget: raise it or widen the space")
            if not jobs:
                break
            pool.submit(lambda actor, work: actor.evaluate.remote(work), jobs)
        if not pool.has_next():
            break
        for number, result in pool.get_next_unordered():
            trial, candidate = live.pop(number)
            _record(screen, trial, speed.throughput(candidate.prune), speed.speedup(candidate.prune), result)
            run.screened += 1
            run.screened_here += 1
        _progress(screen, run, target, log)
    run.seconds = time.perf_counter() - run.started
    return run


def _record(screen: optuna.Study, trial: optuna.Trial, throughput: float, speedup: float,
            result: dict[str, Any]) -> None:
    """A screen's result, outcome last (as fine-tunes record theirs: a kill in between is recovered)."""
    if FAILED in result:
        end_trial(screen, trial, "failed", reason=result[FAILED])
        return
    values = [result["top1"], throughput]
    if not all(math.isfinite(v) for v in values):
        end_trial(screen, trial, "failed", reason=f"non-finite screen result: top-1 {values[0]}, throughput {values[1]}")
        return
    for key, value in (("accuracy", values[0]), ("loss", result["loss"]), ("predicted_throughput", throughput),
                       ("speedup", speedup), ("seconds", result["seconds"])):
        trial.set_user_attr(key, value)
    end_trial(screen, trial, "complete", values=values)


def _progress(screen: optuna.Study, run: ScreenRun, target: int, log: Callable[[str], None]) -> None:
    """A line every few seconds, and at the end."""
    now = time.perf_counter()
    if now - run.logged < 5 and run.screened < target:
        return
    run.logged, elapsed = now, now - run.started
    left = elapsed / max(1, run.screened_here) * max(0, target - run.screened)
    best = best_screen(screen)
    best_text = (f"best {best.values[0]:.2f}% at {best.user_attrs['speedup']:.2f}x (screen {best.number})"
                 if best else "no screen result yet")
    log(f"[screen {run.screened}/{target}] {best_text} | {format_duration(elapsed)} elapsed, "
        f"~{format_duration(left)} left")


def best_screen(screen: optuna.Study) -> optuna.trial.FrozenTrial | None:
    complete = [t for t in screen.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if within_budget(t)]
    return max(complete, key=lambda t: (t.values[0], t.values[1]), default=None)


# -- promotion --------------------------------------------------------------------------------------

def promotion_slots(trials: int, warm_starts: int) -> int:
    """How many screened configs to fine-tune: a share of the fine-tunes the warm starts leave."""
    return math.ceil(max(0, trials - warm_starts) * PROMOTED_SHARE)


def choose_promoted(candidates: list[optuna.trial.FrozenTrial], slots: int) -> list[optuna.trial.FrozenTrial]:
    """The best `slots` screened configs by Pareto order on (screen accuracy, throughput), each
    reducer taking at most REDUCER_QUOTA of the slots while others have candidates left. One
    screen per distinct config (configs that differ only in training settings screen the same)."""
    distinct: dict[str, optuna.trial.FrozenTrial] = {}
    for trial in sorted(candidates, key=lambda t: t.number):
        distinct.setdefault(json.dumps(trial.user_attrs["prune_config"], sort_keys=True), trial)
    pool = list(distinct.values())
    order = [pool[i] for i in pareto_order([(t.values[0], t.values[1]) for t in pool])]
    cap = max(1, math.floor(slots * REDUCER_QUOTA))
    chosen, taken = [], Counter()
    for trial in order:
        reducer = trial.user_attrs["prune_config"]["reducer"]
        if len(chosen) < slots and taken[reducer] < cap:
            chosen.append(trial)
            taken[reducer] += 1
    for trial in order:  # only one reducer left with candidates: it may fill the rest
        if len(chosen) < slots and trial not in chosen:
            chosen.append(trial)
    return chosen


def promote(study: optuna.Study, screen: optuna.Study, slots: int) -> list[int]:
    """Enqueue the chosen screens' structures into `study` (once: the study records it; a kill in
    between enqueues nothing twice, as `skip_if_exists` compares with the earlier enqueues).
    Warm starts are fine-tuned anyway, and so are configs equal to one."""
    warm = {json.dumps(t.user_attrs.get("prune_config"), sort_keys=True) for t in screen.get_trials(deepcopy=False)
            if t.user_attrs.get(WARM_START)}
    candidates = [t for t in screen.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                  if within_budget(t) and json.dumps(t.user_attrs["prune_config"], sort_keys=True) not in warm]
    chosen = choose_promoted(candidates, slots)
    for trial in chosen:
        structure = {name: value for name, value in trial.params.items() if name not in TRAINING_ONLY}
        study.enqueue_trial(structure, user_attrs={SCREEN_TRIAL: trial.number, SCREEN_ACCURACY: trial.values[0]},
                            skip_if_exists=True)
    study.set_user_attr(PROMOTED_ATTR, [t.number for t in chosen])
    return [t.number for t in chosen]


# -- is the proxy any good? --------------------------------------------------------------------------

@dataclass(frozen=True)
class ProxyCheck:
    """Kendall tau between screen accuracy and fine-tuned accuracy over the complete fine-tunes."""

    tau: float | None
    pairs: int

    @property
    def reliable(self) -> bool:
        return self.tau is not None and self.pairs >= MIN_PAIRS and self.tau >= RELIABLE_TAU

    def verdict(self) -> str:
        if self.pairs < MIN_PAIRS:
            shown = "" if self.tau is None else f"Kendall tau {self.tau:.3f} over "
            return (f"{shown}{self.pairs} fine-tuned trial(s) with a screen score: too few to judge the screen "
                    f"(needs {MIN_PAIRS})")
        if self.tau is None:
            return (f"{self.pairs} fine-tuned trials with a screen score, but the screen scores or the fine-tuned "
                    "accuracies are all equal: nothing to rank, so the screen cannot be judged")
        text = f"Kendall tau {self.tau:.3f} between screen and fine-tuned top-1 over {self.pairs} trials"
        if self.reliable:
            return text + f": the screen ranks configs as fine-tuning does (tau >= {RELIABLE_TAU})"
        return (text + f": too weak to rely on (tau < {RELIABLE_TAU}); here the screen's ranking says little "
                "about accuracy after fine-tuning")

    def to_dict(self) -> dict[str, Any]:
        return {"tau": self.tau, "pairs": self.pairs, "reliable": self.reliable}


def screen_tau(study: optuna.Study) -> ProxyCheck:
    pairs = [(t.user_attrs[SCREEN_ACCURACY], t.values[0])
             for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
             if isinstance(t.user_attrs.get(SCREEN_ACCURACY), (int, float))]
    return ProxyCheck(kendall_tau([p[0] for p in pairs], [p[1] for p in pairs]) if len(pairs) >= 2 else None,
                      len(pairs))
