"""Pareto ranking, Kendall tau, successive-halving rungs and decisions, screening and promotion:
hand-computed cases on in-memory studies (no Ray, no training)."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from autoprune.config import PruneConfig
from autoprune.search.halving import SuccessiveHalving, rung_epochs, survives
from autoprune.search.pareto import crowding_distance, dominates, kendall_tau, non_dominated_fronts, pareto_order
from autoprune.search.screen import (MIN_PAIRS, ProxyCheck, ScreenError, choose_promoted, promote, run_screening, screen_study,
                                     screen_tau)
from autoprune.search.searcher import recover_interrupted
from autoprune.search.space import Candidate
from autoprune.study_attrs import (OUTCOME, PROMOTED_ATTR, REASON, RETRY_OF, RUNG, RUNG_ACCURACY, SCREEN_ACCURACY,
                                   SCREEN_TRIAL, UID_ATTR, WARM_START)

optuna.logging.set_verbosity(optuna.logging.WARNING)


# -- pareto ---------------------------------------------------------------------------------------

def test_dominance_needs_one_strictly_better_objective():
    assert dominates((1, 2), (1, 1)) and not dominates((1, 1), (1, 2))
    assert not dominates((1, 1), (1, 1))
    assert not dominates((2, 0), (0, 2)) and not dominates((0, 2), (2, 0))


def test_non_dominated_fronts_peel_the_front_layer_by_layer():
    points = [(1, 5), (2, 4), (3, 3), (1, 1), (2, 2), (0, 0)]
    assert non_dominated_fronts(points) == [[0, 1, 2], [4], [3], [5]]
    assert non_dominated_fronts([(1, 1), (1, 1)]) == [[0, 1]]  # equal points share a front
    assert non_dominated_fronts([]) == []


def test_crowding_distance_by_hand():
    points = [(0, 10), (1, 8), (4, 4), (10, 0)]
    distance = crowding_distance(points, [0, 1, 2, 3])
    assert distance[0] == distance[3] == math.inf
    # point 1: (4-0)/10 + (10-4)/10 ; point 2: (10-1)/10 + (8-0)/10
    assert distance[1] == pytest.approx(1.0) and distance[2] == pytest.approx(1.7)
    assert crowding_distance([(1, 5), (2, 4), (3, 3)], [0, 1, 2])[1] == pytest.approx(2.0)
    assert crowding_distance(points, [1, 2]) == {1: math.inf, 2: math.inf}
    # an objective that does not vary adds nothing (and does not divide by zero)
    assert crowding_distance([(0, 1), (1, 1), (2, 1)], [0, 1, 2])[1] == pytest.approx(1.0)


def test_pareto_order_front_then_crowding_then_first_objective():
    points = [(0, 10), (1, 8), (4, 4), (10, 0), (3, 3)]
    # the ends tie at infinity: the more accurate first; then the more isolated; then front 2
    assert pareto_order(points) == [3, 0, 2, 1, 4]
    assert pareto_order([(5, 1), (5, 1)]) == [0, 1]


def test_kendall_tau_by_hand():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)  # 2 concordant, 1 discordant
    # tau-b: a tie in x: (2 - 0) / sqrt((2 + 1) * 2)
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))
    assert kendall_tau([1, 1, 1], [1, 2, 3]) is None and kendall_tau([1], [2]) is None
    with pytest.raises(ValueError):
        kendall_tau([1, 2], [1])


def test_proxy_verdict_says_when_the_screen_is_too_weak():
    assert ProxyCheck(0.6, MIN_PAIRS).reliable and "ranks configs as fine-tuning does" in ProxyCheck(0.6, MIN_PAIRS).verdict()
    weak = ProxyCheck(0.1, 20)
    assert not weak.reliable and "too weak to rely on (tau < 0.3)" in weak.verdict()
    few = ProxyCheck(0.9, MIN_PAIRS - 1)
    assert not few.reliable and "too few to judge" in few.verdict()
    assert "too few" in ProxyCheck(None, 0).verdict()


# -- successive halving ----------------------------------------------------------------------------

@pytest.mark.parametrize("epochs, eta, rungs", [
    (2, 2, (1,)), (2, 3, (1,)), (1, 2, ()), (4, 2, (1, 2)), (5, 3, (1, 2)), (9, 3, (1, 3)), (27, 3, (1, 3, 9)),
    (2.5, 2, (1,)), (0.5, 2, ()),
])
def test_rungs_sit_at_e_over_eta_to_the_k(epochs, eta, rungs):
    assert rung_epochs(epochs, eta) == rungs


def test_rungs_refuse_eta_below_2():
    with pytest.raises(ValueError, match="eta"):
        rung_epochs(4, 1)


def test_survival_is_the_best_1_over_eta_by_pareto_order():
    same_cost = [(90, -1.0), (80, -1.0), (70, -1.0)]
    assert survives(same_cost, 0, 3) and not survives(same_cost, 1, 3) and not survives(same_cost, 2, 3)
    assert survives(same_cost, 1, 2) and not survives(same_cost, 2, 2)  # ceil(3/2) = 2 go on
    # a cheaper, less accurate config is on the front too: it goes on when the front has room
    cheap = [(50, -0.5), (90, -1.0), (80, -1.0)]
    assert survives(cheap, 0, 2) and not survives(cheap, 0, 3)
    assert survives([(10, -1.0)], 0, 3)  # the first trial at a rung has nobody to lose to


def _running_trial(study, throughput: float, **attrs):
    trial = study.ask()
    trial.set_user_attr("predicted_throughput", throughput)
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    return trial


def test_halving_records_every_rung_and_writes_the_outcome_before_stopping():
    study = optuna.create_study(directions=["maximize", "maximize"])
    halving = SuccessiveHalving(study, epochs=4, eta=2)  # rungs at epochs 1 and 2
    first, second, third = (_running_trial(study, 100.0) for _ in range(3))
    assert halving.decide(first, 1, 80.0)
    assert not halving.decide(second, 1, 70.0)  # 2 at the rung, 1 goes on: the better one
    frozen = study.trials[second.number]
    assert frozen.user_attrs[RUNG] == 1 and frozen.user_attrs[OUTCOME] == "stopped"
    assert "epoch-1 rung (accuracy 70.00%)" in frozen.user_attrs[REASON]
    assert halving.decide(third, 1, 75.0)  # 3 there, 2 go on: 80 and 75
    assert halving.decide(first, 3, 10.0)  # not a rung: nothing recorded, nothing decided
    assert study.trials[first.number].user_attrs[RUNG_ACCURACY] == {"1": 80.0}
    assert halving.decide(first, 2, 85.0) and study.trials[first.number].user_attrs[RUNG_ACCURACY] == {"1": 80.0, "2": 85.0}


def test_halving_never_stops_a_warm_start_and_ignores_interrupted_records():
    study = optuna.create_study(directions=["maximize", "maximize"])
    halving = SuccessiveHalving(study, epochs=2, eta=2)
    best = _running_trial(study, 100.0)
    assert halving.decide(best, 1, 90.0)
    warm = _running_trial(study, 100.0, **{WARM_START: "evit 0.7"})
    assert halving.decide(warm, 1, 10.0) and OUTCOME not in study.trials[warm.number].user_attrs
    ghost = _running_trial(study, 100.0, **{RUNG_ACCURACY: {"1": 99.0}, OUTCOME: "interrupted"})
    assert ghost.number == 2
    # peers at the rung: 90 and the warm start's 10 (not the interrupted 99): 60 is second of 3
    assert halving.decide(_running_trial(study, 100.0), 1, 60.0)


# -- screening ---------------------------------------------------------------------------------------

DISTRIBUTIONS = {"reducer": CategoricalDistribution(["tome", "evit"]), "x": FloatDistribution(0.0, 1.0),
                 "lr": FloatDistribution(1e-5, 1e-3)}


def _screened(number_of_configs: list[tuple[str, float, float, float]]):
    """Complete screen trials (reducer, x, accuracy, throughput); prune_config from reducer and x."""
    trials = []
    for number, (reducer, x, accuracy, throughput) in enumerate(number_of_configs):
        prune = (PruneConfig(reducer="tome", r=max(1, round(x * 10))) if reducer == "tome"
                 else PruneConfig(reducer="evit", layers=(1,), keep_rate=round(0.5 + x / 2, 2)))
        trial = create_trial(values=[accuracy, throughput], params={"reducer": reducer, "x": x, "lr": 1e-4},
                             distributions=DISTRIBUTIONS, user_attrs={"prune_config": prune.to_dict()},
                             constraints={"flops": -0.1})
        trial.number = number
        trials.append(trial)
    return trials


def test_promotion_gives_no_reducer_more_than_its_quota_while_others_have_candidates():
    candidates = _screened([("tome", i / 10, 90 - i, 100 + i) for i in range(1, 7)]  # 6 tome on the front
                           + [("evit", 0.2, 60, 100), ("evit", 0.6, 50, 101)])    # 2 dominated evit
    chosen = choose_promoted(candidates, 4)
    assert [t.user_attrs["prune_config"]["reducer"] for t in chosen].count("tome") == 2
    assert {t.number for t in chosen} >= {6, 7}
    # only one reducer has candidates: it fills every slot
    assert len(choose_promoted(candidates[:6], 4)) == 4


def test_promotion_counts_configs_that_differ_only_in_training_once():
    candidates = _screened([("tome", 0.30, 80, 100), ("tome", 0.31, 80, 100), ("tome", 0.6, 70, 120)])
    chosen = choose_promoted(candidates, 3)  # x 0.30 and 0.31 both give r = 3
    assert [t.number for t in chosen] == [0, 2]


def test_promote_enqueues_structures_once_and_skips_warm_starts():
    study = optuna.create_study(directions=["maximize", "maximize"])
    study.set_user_attr(UID_ATTR, "abc")
    screen = screen_study(study)
    for trial in _screened([("tome", 0.3, 80, 100), ("evit", 0.4, 70, 130), ("tome", 0.8, 60, 160)]):
        screen.add_trial(trial)
    warm = _screened([("evit", 0.4, 70, 130)])[0]
    screen.add_trial(create_trial(values=warm.values, params=warm.params, distributions=DISTRIBUTIONS,
                                  user_attrs={**warm.user_attrs, WARM_START: "evit 0.7"}))
    promoted = promote(study, screen, 3)  # the evit config equals the warm start: fine-tuned anyway
    assert promoted == [0, 2]
    assert study.user_attrs[PROMOTED_ATTR] == promoted
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 2 and all(set(t.system_attrs["fixed_params"]) == {"reducer", "x"} for t in waiting)
    assert {t.user_attrs[SCREEN_TRIAL] for t in waiting} == {0, 2}
    assert {t.user_attrs[SCREEN_ACCURACY] for t in waiting} == {80, 60}
    promote(study, screen, 3)  # a search killed after enqueuing resumes and promotes again: nothing doubles
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 2


def test_a_screen_study_left_by_another_study_of_the_same_name_is_refused():
    storage = optuna.storages.InMemoryStorage()
    first = optuna.create_study(storage=storage, study_name="s", directions=["maximize", "maximize"])
    first.set_user_attr(UID_ATTR, "one")
    screen_study(first)
    other = optuna.create_study(storage=storage, study_name="t", directions=["maximize", "maximize"])
    other.set_user_attr(UID_ATTR, "two")
    optuna.create_study(storage=storage, study_name="t:screen", directions=["maximize", "maximize"]).set_user_attr(
        "autoprune:screen_of", "one")
    with pytest.raises(ScreenError, match="holds the screens of another study"):
        screen_study(other)
    assert screen_study(first).study_name == "s:screen"


def test_screen_tau_pairs_screen_and_fine_tuned_accuracy():
    study = optuna.create_study(directions=["maximize", "maximize"])
    for screened, tuned in ((50, 90), (60, 91), (40, 88), (70, 89)):
        study.add_trial(create_trial(values=[tuned, 100.0], user_attrs={SCREEN_ACCURACY: screened}))
    study.add_trial(create_trial(values=[95.0, 100.0]))  # no screen score: not a pair
    check = screen_tau(study)
    assert check.pairs == 4 and check.tau == pytest.approx(kendall_tau([50, 60, 40, 70], [90, 91, 88, 89]))


class _InlinePool:
    """`ray.util.ActorPool`'s four methods, evaluating in-process with a fake screen worker."""

    def __init__(self, evaluate, slots: int = 2) -> None:
        self.actor, self.pending, self.slots = _Actor(evaluate), [], slots

    def submit(self, fn, value):
        self.pending.append(fn(self.actor, value))

    def get_next_unordered(self):
        return self.pending.pop(0)

    def has_next(self):
        return bool(self.pending)

    def has_free(self):
        return len(self.pending) < self.slots


class _Actor:
    def __init__(self, evaluate):
        self.evaluate = type("Method", (), {"remote": staticmethod(evaluate)})


def _propose(trial) -> Candidate:
    rate = trial.suggest_float("keep_rate", 0.3, 1.0)
    return Candidate(PruneConfig(reducer="evit", layers=(1,), keep_rate=rate))


def _evaluate(jobs):
    results = []
    for number, prune in jobs:
        rate = prune["keep_rate"]
        if rate > 0.95:
            results.append((number, {"autoprune_failed": "RuntimeError: boom"}))
        else:
            results.append((number, {"top1": 100 * rate, "loss": 1 - rate, "seconds": 0.01}))
    return results


class _Speed:
    """Throughput inversely proportional to the keep rate (the dense model: 100 img/s)."""

    def throughput(self, prune):
        return 100.0 / prune.keep_rate

    def speedup(self, prune):
        return 1 / prune.keep_rate


def test_screening_records_each_screen_skips_over_budget_ones_and_resumes_without_redoing():
    study = optuna.create_study(directions=["maximize", "maximize"])
    study.set_user_attr(UID_ATTR, "u")
    screen = screen_study(study)
    screen.sampler = optuna.samplers.RandomSampler(seed=0)
    flops_of = lambda candidate: candidate.prune.keep_rate * 1e9  # noqa: E731
    lines = []
    run = run_screening(screen, _propose, flops_of, 0.8e9, "flops", _Speed(), 6, _InlinePool(_evaluate), 2, lines.append)
    outcomes = [t.user_attrs.get(OUTCOME) for t in screen.trials]
    assert run.screened == 6 and outcomes.count("complete") + outcomes.count("failed") == 6
    assert outcomes.count("infeasible") == run.infeasible and run.proposed == 6 + run.infeasible
    for trial in screen.get_trials(states=(TrialState.COMPLETE,)):
        rate = trial.params["keep_rate"]
        assert trial.values == pytest.approx([100 * rate, 100 / rate])
        assert trial.user_attrs["speedup"] == pytest.approx(1 / rate) and trial.constraints["flops"] <= 0
    assert lines and lines[-1].startswith("[screen 6/6] best ")
    # a search killed mid-screen leaves a RUNNING screen: recovered, re-run first, nothing redone
    orphan = screen.ask()
    orphan.suggest_float("keep_rate", 0.3, 1.0)
    before = {t.number for t in screen.trials if t.user_attrs.get(OUTCOME) in ("complete", "failed")}
    assert recover_interrupted(screen) == [orphan.number]
    run = run_screening(screen, _propose, flops_of, 1.1e9, "flops", _Speed(), 8, _InlinePool(_evaluate), 2, lines.append)
    finished = [t for t in screen.trials if t.user_attrs.get(OUTCOME) in ("complete", "failed")]
    assert run.screened == len(finished) == 8 and before <= {t.number for t in finished}
    retry = [t for t in screen.trials if t.user_attrs.get(RETRY_OF) == orphan.number]
    assert len(retry) == 1 and retry[0].params == screen.trials[orphan.number].params
    failed = [t for t in screen.trials if t.user_attrs.get(OUTCOME) == "failed"]
    assert all(t.state == TrialState.FAIL and t.user_attrs[REASON] for t in failed)
