"""The search service end to end on a tiny ViT and tiny synthetic data, with a real local Ray."""

import contextlib
import dataclasses
import functools
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest

from autoprune.cli import main
from autoprune.data import SyntheticOptions
from autoprune.search import SearchError, SearchSettings
from autoprune.search import search as _search
from autoprune.search.retime import FRONT_ROUNDS, FrontTiming
from autoprune.study_attrs import (OUTCOME, PROMOTED_ATTR, REASON, RETRY_OF, RUNG, RUNG_ACCURACY, SCREEN_ACCURACY, SETTINGS_ATTR,
                                   SCREEN_TAU_ATTR, SCREEN_TRIAL, WARM_START)
from autoprune.lease import StudyLease
from autoprune.storage import open_storage
from autoprune.train import TrainConfig
from autoprune.trial import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelSpec("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3})
SYNTHETIC = SyntheticOptions(num_classes=4, train_size=64, val_size=32, test_size=32, image_size=32)
RECIPE = TrainConfig(epochs=1, batch_size=16, workers=0)
SLOW = TrainConfig(epochs=40, batch_size=16, workers=0)  # trials of a few seconds, to be killed in
# the tiny baselines here stay near chance (25 %): the search would refuse them before any trial
search = functools.partial(_search, min_baseline_accuracy=0)


def tiny_settings(**changes) -> SearchSettings:
    base = SearchSettings(budget="75%", model=TINY, synthetic=SYNTHETIC, recipe=RECIPE, baseline_recipe=RECIPE,
                          space=str(ROOT / "search_spaces" / "default.yaml"), screen=0)
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def ray_session():
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # baselines and Ray results go under ./studies
    return tmp_path


def storage_url(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'studies.db'}"


def test_search_finishes_the_requested_trials_within_budget(ray_session, workdir):
    lines = []
    result = search(tiny_settings(), trials=3, study_name="s", storage=storage_url(workdir), log=lines.append)
    study = optuna.load_study(study_name="s", storage=storage_url(workdir))
    finished = [t for t in study.trials if t.user_attrs.get(OUTCOME) in ("complete", "failed", "stopped")]
    assert result.finished == len(finished) == 3
    complete = [t for t in finished if t.user_attrs[OUTCOME] == "complete"]
    assert complete and all(t.constraints["flops"] <= 0 for t in complete)
    for trial in complete:
        attrs = trial.user_attrs
        assert {"prune_config", "train_config", "flops", "params", "throughput", "speedup", "accuracy",
                "ray_trial_id", "checkpoint_path"} <= set(attrs)
        assert Path(attrs["checkpoint_path"]).exists()
        # the throughput objective is the prediction (deterministic); the timing is kept beside it
        assert trial.values == [attrs["accuracy"], attrs["predicted_throughput"]]
        assert attrs["throughput_error"] == pytest.approx(attrs["throughput"] / attrs["predicted_throughput"] - 1)
    assert any(t.user_attrs.get(WARM_START) for t in study.trials)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    # budget-exact proposals: none over budget, and the count says so
    assert result.infeasible == 0 and any(line.startswith("over budget 0/3 proposals") for line in lines), lines
    budget = complete[0].user_attrs["flops"] / (1 + complete[0].constraints["flops"])
    assert all(t.user_attrs["predicted_flops"] <= budget * (1 + 1e-9) for t in complete)
    assert any(line.startswith("[3/3]") and "left" in line for line in lines)
    assert any("Pareto front" in line for line in lines)
    # the front re-timed against dense with more rounds than a trial's own timing, and printed
    timing = FrontTiming.of(study)
    # on a CPU the serving batch defaults to 1 (latency), stored with the study's settings
    assert study.user_attrs[SETTINGS_ATTR]["serve_batch"] == 1
    assert timing is not None and (timing.rounds, timing.batch_size) == (FRONT_ROUNDS, 1) and timing.dense > 0
    assert set(timing.trials) == {t.number for t in result.front} and all(r > 0 for r in timing.trials.values())
    printed = next(line for line in lines if "Pareto front" in line)
    assert f"median of {FRONT_ROUNDS} interleaved rounds" in printed
    assert f"{timing.speedup(result.front[0].number):.2f}x" in printed.splitlines()[3]
    # the same command again: nothing left to do, warm starts are not enqueued twice, the front is not re-timed
    retimed = len([line for line in lines if line.startswith("re-timing")])
    assert retimed == 1
    again = search(tiny_settings(), trials=3, study_name="s", storage=storage_url(workdir), log=lines.append)
    assert again.finished == 3 and len(optuna.load_study(study_name="s", storage=storage_url(workdir)).trials) == len(study.trials)
    assert len([line for line in lines if line.startswith("re-timing")]) == retimed


def test_a_speed_budget_is_met_by_prediction_and_resumes_only_at_the_same_serving_batch(ray_session, workdir):
    from autoprune.study_attrs import DENSE_ATTR

    lines = []
    result = search(tiny_settings(budget="1.05x", serve_batch=32), trials=2, study_name="fast",
                    storage=storage_url(workdir), log=lines.append)
    study = optuna.load_study(study_name="fast", storage=storage_url(workdir))
    dense = study.user_attrs[DENSE_ATTR]
    assert dense["serve_batch"] == 32 and dense["predicted_throughput"] > 0
    required = 1.05 * dense["predicted_throughput"]
    complete = [t for t in study.trials if t.user_attrs.get(OUTCOME) == "complete"]
    assert result.finished == 2 and complete and result.infeasible == 0
    for trial in complete:  # the constraint is on predicted seconds per image, never FLOPs
        assert set(trial.constraints) == {"seconds"} and trial.constraints["seconds"] <= 0
        assert trial.values[1] == trial.user_attrs["predicted_throughput"] >= required * (1 - 1e-9)
        assert trial.user_attrs["predicted_seconds"] == pytest.approx(1 / trial.values[1])
    assert any(line.startswith("study 'fast'") and "img/s (dense" in line for line in lines), lines
    with pytest.raises(SearchError, match=r"refusing to resume: serve_batch: stored 32, requested 64"):
        search(tiny_settings(budget="1.05x", serve_batch=64), trials=3, study_name="fast", storage=storage_url(workdir),
               log=lambda line: None)
    again = search(tiny_settings(budget="1.05x", serve_batch=32), trials=2, study_name="fast",
                   storage=storage_url(workdir), log=lambda line: None)
    assert again.finished == 2


def test_resuming_with_other_settings_is_refused(ray_session, workdir):
    search(tiny_settings(), trials=1, study_name="s", storage=storage_url(workdir), log=lambda line: None)
    with pytest.raises(SearchError, match=r"created with other settings.*budget: stored '75%', requested '80%'"):
        search(tiny_settings(budget="80%"), trials=2, study_name="s", storage=storage_url(workdir), log=lambda line: None)


def test_a_study_searched_before_budget_exact_proposals_is_not_resumed(workdir):
    """Its trials' params mean other things; resuming is refused, naming the difference."""
    from autoprune.search.space import SearchSpace
    from autoprune.study_attrs import SETTINGS_ATTR

    record = tiny_settings().to_record(SearchSpace.from_file(tiny_settings().space))
    del record["proposals"]
    study = optuna.create_study(study_name="old", storage=storage_url(workdir), directions=["maximize", "maximize"])
    study.set_user_attr(SETTINGS_ATTR, record)
    with pytest.raises(SearchError, match="refusing to resume: proposals: not stored, requested 'budget-exact'"):
        search(tiny_settings(), trials=1, study_name="old", storage=storage_url(workdir), log=lambda line: None)
    assert not (workdir / "studies" / "baselines").exists()


def test_a_study_left_without_settings_is_adopted_only_while_empty(ray_session, workdir):
    """A search killed between creating its study and recording the settings leaves an empty
    study: the next search takes it over. A foreign study with trials is refused, unchanged."""
    optuna.create_study(study_name="orphan", storage=storage_url(workdir), directions=["maximize", "maximize"])
    result = search(tiny_settings(), trials=1, study_name="orphan", storage=storage_url(workdir), log=lambda line: None)
    assert result.finished == 1
    foreign = optuna.create_study(study_name="foreign", storage=storage_url(workdir))
    foreign.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    with pytest.raises(SearchError, match="exists but was not made by autoprune search"):
        search(tiny_settings(), trials=1, study_name="foreign", storage=storage_url(workdir), log=lambda line: None)
    assert len(optuna.load_study(study_name="foreign", storage=storage_url(workdir)).trials) == 2


def test_same_study_name_in_two_storages_keeps_both_checkpoints(ray_session, workdir):
    paths = []
    for database in ("a.db", "b.db"):
        storage = f"sqlite:///{workdir / database}"
        search(tiny_settings(), trials=1, study_name="same", storage=storage, log=lambda line: None)
        study = optuna.load_study(study_name="same", storage=storage)
        paths += [t.user_attrs["checkpoint_path"] for t in study.trials if t.user_attrs.get(OUTCOME) == "complete"]
    assert len(paths) == 2 and len(set(paths)) == 2 and all(Path(p).is_file() for p in paths)


def test_failing_trials_end_fail_with_their_reason_and_the_study_goes_on(ray_session, workdir):
    space = workdir / "explode.yaml"
    space.write_text("reducers: [tome]\ntome: {r: [0.1, 0.2]}\ntrain: {lr: [1.0e+6, 1.0e+7]}\n")
    result = search(tiny_settings(space=str(space)), trials=2, study_name="nan", storage=storage_url(workdir),
                    log=lambda line: None)
    study = optuna.load_study(study_name="nan", storage=storage_url(workdir))
    failed = [t for t in study.trials if t.user_attrs.get(OUTCOME) == "failed"]
    assert result.finished == 2 and len(failed) == 2
    assert all(t.state == optuna.trial.TrialState.FAIL and "loss became nan" in t.user_attrs[REASON] for t in failed)


def test_failing_trials_under_successive_halving_do_not_stop_the_search(ray_session, workdir):
    """A failure report carries no accuracy; the halving scheduler must not abort the run over it."""
    space = workdir / "explode.yaml"
    space.write_text("reducers: [tome]\ntome: {r: [0.1, 0.2]}\ntrain: {lr: [1.0e+6, 1.0e+7]}\n")
    settings = tiny_settings(space=str(space), recipe=TrainConfig(epochs=2, batch_size=16, workers=0), halving=2)
    result = search(settings, trials=2, study_name="nan-sh", storage=storage_url(workdir), log=lambda line: None)
    study = optuna.load_study(study_name="nan-sh", storage=storage_url(workdir))
    failed = [t for t in study.trials if t.user_attrs.get(OUTCOME) == "failed"]
    assert result.finished == len(failed) == 2
    assert all(t.state == optuna.trial.TrialState.FAIL and "loss became nan" in t.user_attrs[REASON] for t in failed)


def test_an_exception_inside_a_trial_is_recorded(ray_session, workdir):
    """A trial that cannot write its checkpoint (a file where its folder should be) fails with the
    reason, and the search goes on to the requested count."""
    (workdir / "studies" / "broken").mkdir(parents=True)
    (workdir / "studies" / "broken" / "checkpoints").write_text("in the way")
    result = search(tiny_settings(), trials=2, study_name="broken", storage=storage_url(workdir), log=lambda line: None)
    study = optuna.load_study(study_name="broken", storage=storage_url(workdir))
    failed = [t for t in study.trials if t.user_attrs.get(OUTCOME) == "failed"]
    assert result.finished == 2 and len(failed) == 2
    assert all(t.state == optuna.trial.TrialState.FAIL and "NotADirectoryError" in t.user_attrs[REASON] for t in failed)


@pytest.mark.slow
def test_successive_halving_records_rungs_and_counts_full_fidelity_trials_only(ray_session, workdir):
    settings = tiny_settings(recipe=TrainConfig(epochs=2, batch_size=16, workers=0), halving=2)
    lines = []
    result = search(settings, trials=3, study_name="sh", storage=storage_url(workdir), log=lines.append)
    study = optuna.load_study(study_name="sh", storage=storage_url(workdir))
    stopped = [t for t in study.trials if t.user_attrs.get(OUTCOME) == "stopped"]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert all(t.state == optuna.trial.TrialState.PRUNED and t.user_attrs[RUNG] == 1 for t in stopped)
    assert all(t.user_attrs[RUNG_ACCURACY].keys() == {"1"} for t in stopped + complete)
    finished = [t for t in study.trials if t.user_attrs.get(OUTCOME) in ("complete", "failed")]
    assert result.finished == len(finished) == 3  # --trials counts full-fidelity fine-tunes only
    assert any(line.startswith("fine-tuned:   ") for line in "\n".join(lines).splitlines())


class _RayTrial:
    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


def test_a_trial_the_halving_scheduler_stops_ends_pruned_at_its_rung_and_does_not_count(tmp_path):
    from ray.tune.schedulers import TrialScheduler

    from autoprune import PruneConfig
    from autoprune.search.halving import HalvingScheduler, SuccessiveHalving
    from autoprune.search.searcher import Progress, StudySearcher
    from autoprune.search.space import Candidate

    study = optuna.create_study(storage=storage_url(tmp_path), directions=["maximize", "maximize"])
    lines = []
    searcher = StudySearcher(study, lambda trial: Candidate(PruneConfig(reducer="tome", r=trial.suggest_int("r", 1, 4))),
                             budget=1e12, flops_of=lambda candidate: 1e9, throughput_of=lambda candidate: 100.0,
                             train_config=lambda candidate, number: {}, target=2,
                             progress=Progress(total=2, done_before=0, write=lines.append),
                             halving=SuccessiveHalving(study, epochs=2, eta=2))
    scheduler = HalvingScheduler(searcher.halving.rungs, searcher.at_rung)
    first, second = searcher.suggest("a")["trial_number"], searcher.suggest("b")["trial_number"]
    assert scheduler.on_trial_result(None, _RayTrial("a"), {"epoch": 1, "accuracy": 80.0}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, _RayTrial("b"), {"epoch": 1, "accuracy": 60.0}) == TrialScheduler.STOP
    searcher.on_trial_complete("b", {"epoch": 1, "accuracy": 60.0})  # what Ray calls after a scheduler's stop
    stopped = study.trials[second]
    assert stopped.state == optuna.trial.TrialState.PRUNED and stopped.user_attrs[OUTCOME] == "stopped"
    assert stopped.user_attrs[RUNG] == 1 and "successive halving at the epoch-1 rung" in stopped.user_attrs[REASON]
    assert lines[-1].startswith("[0/2] trial 1:")  # reported, not counted
    # failures and final results are no rung decisions
    assert scheduler.on_trial_result(None, _RayTrial("a"), {"autoprune_failed": "boom"}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, _RayTrial("a"), {"epoch": 2, "accuracy": 1.0}) == TrialScheduler.CONTINUE
    searcher.on_trial_complete("a", {"autoprune_final": True, "accuracy": 85.0, "throughput": 100.0, "flops": 1e9,
                                     "speedup": 1.5})
    assert study.trials[first].state == optuna.trial.TrialState.COMPLETE
    assert searcher.suggest("c")["trial_number"] == 2  # one finished of two: the stopped one did not count


DRIVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_search import *
    from autoprune.latency import measure
    measure.ROUNDS_TARGET_SECONDS = 0.0  # the fewest calibration rounds, as conftest's quick_calibration
    search({settings}, trials={trials}, study_name={study!r}, storage={storage!r})
""")


def kill_9_when(workdir: Path, settings: str, trials: int, ready, storage: str | None = None,
                study_name: str = "killed", timeout: float = 600):
    """Run `search(settings, trials)` in a driver subprocess (test_search's `search`: no baseline
    gate), and kill -9 it with its Ray processes (one process group) as soon as `ready(storage)`
    returns something truthy (studies not made yet count as not ready); return that."""
    storage = storage or storage_url(workdir)
    code = DRIVER.format(tests=str(ROOT / "tests"), settings=settings, trials=trials, study=study_name, storage=storage)
    output = workdir / f"driver-{time.time_ns()}.log"
    with output.open("wb") as sink:
        driver = subprocess.Popen([sys.executable, "-c", code], cwd=workdir, start_new_session=True,
                                  stdout=sink, stderr=subprocess.STDOUT)
    opened = open_storage(storage)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            time.sleep(0.2)
            try:
                seen = ready(opened)
            except KeyError:
                continue
            if seen:
                return seen
            if driver.poll() is not None:
                pytest.fail(f"the search ended (exit code {driver.returncode}) before the moment to kill it; "
                            f"its output ends: {output.read_text()[-2000:]}")
        pytest.fail("the moment to kill the search never came")
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone already if it ended by itself
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and its Ray processes, at once
        driver.wait()
        opened.engine.dispose()


def kill_mid_trial(workdir: Path, storage: str, study_name: str = "killed",
                   while_training: Callable[[], None] | None = None) -> list[int]:
    """Run a 3-trial search in another process and SIGKILL it while a trial is in training and
    another has completed; returns the numbers of the completed ones. `while_training` runs once
    at such a moment, before the kill (the search still holds its study)."""
    pending = [while_training] if while_training else []

    def training_after_a_finished_trial(opened):
        study = optuna.load_study(study_name=study_name, storage=opened)
        complete = [t.number for t in study.trials if t.user_attrs.get(OUTCOME) == "complete"]
        # a trial in training (handed to Ray), not a proposal being checked against the budget
        training = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING
                    and "ray_trial_id" in t.user_attrs and OUTCOME not in t.user_attrs]
        if not (complete and training):
            return None
        if pending:
            pending.pop()()
            return None  # then look again: the kill must still find a trial in training
        return complete

    return kill_9_when(workdir, "tiny_settings(recipe=SLOW)", 3, training_after_a_finished_trial, storage, study_name)


def _outcomes(study: optuna.Study) -> str:
    return ", ".join(f"{t.number} {t.state.name} {t.user_attrs.get(OUTCOME)}" for t in study.trials)


def assert_resumed_with_nothing_lost(result, study: optuna.Study, complete_before: list[int]) -> None:
    """The resumed search reached its 3 trials; what completed before the kill is intact; the trial
    the kill interrupted is marked so and ran again with the same parameters."""
    outcomes = [t.user_attrs.get(OUTCOME) for t in study.trials]
    seen = f"complete before the kill: {complete_before}; after resuming: {_outcomes(study)}"
    assert result.finished == 3 and outcomes.count("complete") + outcomes.count("failed") + outcomes.count("stopped") == 3, seen
    assert "interrupted" in outcomes, seen
    assert all(study.trials[n].user_attrs[OUTCOME] == "complete" for n in complete_before), seen
    _each_interrupted_trial_ran_again_once(study)


def _each_interrupted_trial_ran_again_once(study: optuna.Study) -> None:
    retried = [t for t in study.trials if RETRY_OF in t.user_attrs]
    interrupted = [t for t in study.trials if t.user_attrs.get(OUTCOME) == "interrupted"]
    assert [t.user_attrs[RETRY_OF] for t in retried] == [t.number for t in interrupted], _outcomes(study)
    # the re-run keeps every param the interrupted trial had drawn (one killed while being proposed
    # had drawn only some: the re-run draws the rest)
    assert all(study.trials[t.user_attrs[RETRY_OF]].params.items() <= t.params.items() for t in retried)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING], _outcomes(study)


SCREENING = "tiny_settings(screen=120, screen_images=32)"


@pytest.mark.slow
def test_kill_9_while_screening_then_resume_redoes_no_screen(workdir):
    def screening(opened):
        screen = optuna.load_study(study_name="killed:screen", storage=opened)
        # told, not only with its outcome written: the values come with the state
        done = {t.number: t.values for t in screen.trials if t.state == optuna.trial.TrialState.COMPLETE}
        return done if len(done) >= 8 else None

    screened_before = kill_9_when(workdir, SCREENING, 9, screening)
    result = search(eval(SCREENING), trials=9, study_name="killed", storage=storage_url(workdir),
                    log=lambda line: None)
    screen = optuna.load_study(study_name="killed:screen", storage=storage_url(workdir))
    study = optuna.load_study(study_name="killed", storage=storage_url(workdir))
    finished = [t for t in screen.trials if t.user_attrs.get(OUTCOME) in ("complete", "failed")]
    assert len(finished) == 120, _outcomes(screen)  # the target, no screen lost or done twice
    assert all(screen.trials[n].values == values for n, values in screened_before.items())
    _each_interrupted_trial_ran_again_once(screen)
    promoted = [t.user_attrs[SCREEN_TRIAL] for t in study.trials if SCREEN_TRIAL in t.user_attrs]
    assert promoted and len(promoted) == len(set(promoted)) == len(study.user_attrs[PROMOTED_ATTR])
    assert result.finished == 9
    tuned = [t for t in study.trials if t.user_attrs.get(OUTCOME) == "complete"]
    assert all(isinstance(t.user_attrs.get(SCREEN_ACCURACY), float) for t in tuned)
    assert study.user_attrs[SCREEN_TAU_ATTR]["pairs"] == len(tuned)


HALVING = "tiny_settings(recipe=dataclasses.replace(SLOW, epochs=8), halving=2)"  # rungs at epochs 1, 2, 4


@pytest.mark.slow
def test_kill_9_past_a_rung_then_resume(workdir):
    def past_a_rung(opened):
        study = optuna.load_study(study_name="killed", storage=opened)
        return [t.number for t in study.trials if t.state == optuna.trial.TrialState.RUNNING
                and RUNG_ACCURACY in t.user_attrs and OUTCOME not in t.user_attrs]

    killed_in = kill_9_when(workdir, HALVING, 4, past_a_rung)
    result = search(eval(HALVING), trials=4, study_name="killed", storage=storage_url(workdir), log=lambda line: None)
    study = optuna.load_study(study_name="killed", storage=storage_url(workdir))
    assert result.finished == 4 and all(study.trials[n].user_attrs[OUTCOME] == "interrupted" for n in killed_in)
    _each_interrupted_trial_ran_again_once(study)
    for trial in study.trials:
        if trial.user_attrs.get(OUTCOME) == "stopped":
            assert trial.state == optuna.trial.TrialState.PRUNED and trial.user_attrs[RUNG] in (1, 2, 4)


def test_recovery_after_a_kill_at_a_rung_keeps_a_decided_stop_and_reruns_an_undecided_trial(tmp_path):
    """Killed after recording a rung: a trial whose stop was decided (outcome written) ends
    PRUNED at its rung; one that was going on runs again from the start."""
    from autoprune.search.searcher import recover_interrupted
    study = optuna.create_study(storage=storage_url(tmp_path), directions=["maximize", "maximize"])
    decided, going_on = study.ask(), study.ask()
    for trial in (decided, going_on):
        trial.suggest_float("keep_rate", 0.5, 1.0)
        trial.set_user_attr(RUNG_ACCURACY, {"1": 50.0})
    decided.set_user_attr(RUNG, 1)
    decided.set_user_attr(OUTCOME, "stopped")
    assert recover_interrupted(study) == [going_on.number]
    trials = study.get_trials()
    assert trials[decided.number].state == optuna.trial.TrialState.PRUNED
    assert trials[going_on.number].user_attrs[OUTCOME] == "interrupted"
    assert trials[-1].user_attrs[RETRY_OF] == going_on.number and len(trials) == 3


@pytest.mark.slow
def test_screening_promotes_into_the_study_and_the_proxy_is_checked(ray_session, workdir):
    lines = []
    settings = tiny_settings(screen=16, screen_images=32)
    result = search(settings, trials=9, study_name="screened", storage=storage_url(workdir), log=lines.append)
    study = optuna.load_study(study_name="screened", storage=storage_url(workdir))
    screen = optuna.load_study(study_name="screened:screen", storage=storage_url(workdir))
    assert result.finished == 9 and len([t for t in screen.trials if t.user_attrs.get(OUTCOME) == "complete"]) == 16
    warm = {t.user_attrs.get(WARM_START) for t in study.trials} - {None}
    assert {t.user_attrs.get(WARM_START) for t in screen.trials} >= warm
    promoted = [t for t in study.trials if SCREEN_TRIAL in t.user_attrs]
    assert len(promoted) == math.ceil((9 - len(warm)) / 2) >= 1, (len(warm), len(promoted))
    assert all(t.user_attrs[OUTCOME] == "complete" for t in promoted)
    screened = screen.trials[promoted[0].user_attrs[SCREEN_TRIAL]]
    assert promoted[0].user_attrs["prune_config"] == screened.user_attrs["prune_config"]
    # the trainable screens each fine-tune again on the same images: the same score
    assert promoted[0].user_attrs[SCREEN_ACCURACY] == pytest.approx(screened.values[0])
    assert any(line.startswith("[screen 16/16]") for line in lines)
    for start in ("screened:     16 configs", "fine-tuned:   9 at full fidelity", "over budget:", "screen proxy:"):
        assert any(line.startswith(start) for line in "\n".join(lines).splitlines()), start
    again = search(settings, trials=9, study_name="screened", storage=storage_url(workdir), log=lambda line: None)
    assert again.finished == 9 and len(optuna.load_study(study_name="screened:screen",
                                                         storage=storage_url(workdir)).trials) == len(screen.trials)


def test_kill_9_mid_trial_then_resume(workdir):
    storage = storage_url(workdir)
    complete_before = kill_mid_trial(workdir, storage)
    result = search(tiny_settings(recipe=SLOW), trials=3, study_name="killed", storage=storage, log=lambda line: None)
    assert_resumed_with_nothing_lost(result, optuna.load_study(study_name="killed", storage=storage), complete_before)


@pytest.mark.parametrize("argv, message", [
    (["--budget", "60%", "--model", "vit_nonexistent"], "--model: unknown timm model"),
    (["--budget", "60%", "--model-kwargs", "no_such_kwarg=1"], "--model-kwargs"),
    (["--budget", "60%", "--data", "imagefolder:/no/such/folder"], "/no/such/folder"),
    (["--budget", "60%", "--data", "mnist"], "mnist"),
    (["--budget", "60%", "--space", "no_such_space.yaml"], "no_such_space.yaml"),
    (["--budget", "tiny"], "--budget: 'tiny' is not a FLOPs or speed budget"),
    (["--budget", "1%"], "below the cheapest config the search space can express"),
    (["--budget", "60%", "--storage", "nosuchdb://x"], "--storage"),
])
def test_bad_input_exits_2_before_anything_runs(workdir, capsys, argv, message):
    code = main(["search", "--preset", "quickstart", *argv, "--storage", f"sqlite:///{workdir / 'x.db'}"]
                if "--storage" not in argv else ["search", "--preset", "quickstart", *argv])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (workdir / "studies" / "baselines").exists()  # nothing trained


def test_bad_space_and_storage_files_are_left_untouched(workdir, capsys):
    space = workdir / "space.yaml"
    space.write_text("reducers: [evit]\nkeep_rate: [0.9, 0.5]\n")
    assert main(["search", "--preset", "quickstart", "--budget", "60%", "--space", str(space),
                 "--storage", f"sqlite:///{workdir / 'x.db'}"]) == 2
    assert "keep_rate: low 0.9 is above high 0.5" in capsys.readouterr().err
    notes = workdir / "notes.db"
    notes.write_text("not a database")
    assert main(["search", "--preset", "quickstart", "--budget", "60%", "--storage", f"sqlite:///{notes}"]) == 2
    assert "not an autoprune/Optuna study database" in capsys.readouterr().err
    assert notes.read_text() == "not a database"


def test_a_second_search_on_a_held_study_is_refused(workdir, capsys):
    storage = open_storage(storage_url(workdir))
    study = optuna.create_study(storage=storage, study_name="busy", directions=["maximize", "maximize"])
    with StudyLease(storage, study._study_id):
        code = main(["search", "--preset", "quickstart", "--model-kwargs", "img_size=32,patch_size=8,embed_dim=48,depth=4,num_heads=3",
                     "--budget", "75%", "--study", "busy", "--storage", storage_url(workdir)])
    assert code == 2 and "study 'busy' is already driven by pid" in capsys.readouterr().err


def test_unreachable_pretrained_weights_exit_2(workdir, capsys, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code = main(["search", "--budget", "70%", "--model", "deit_tiny_patch16_224", "--pretrained",
                 "--model-kwargs", "img_size=32,patch_size=8,depth=2", "--storage", storage_url(workdir)])
    assert code == 2
    assert "pretrained weights for deit_tiny_patch16_224 could not be loaded" in capsys.readouterr().err


def test_recovery_settles_trials_killed_between_outcome_and_state(tmp_path):
    """A search killed after writing a trial's outcome but before its state: the trial gets the
    state its outcome stands for (a finished trial is never lost); one with no outcome is re-run."""
    from autoprune.search.searcher import recover_interrupted
    study = optuna.create_study(storage=storage_url(tmp_path), directions=["maximize", "maximize"])
    states = optuna.trial.TrialState
    written = {
        # the objective is the predicted throughput, never the measured timing beside it
        "complete": {"accuracy": 91.5, "predicted_throughput": 1200.0, "throughput": 1300.0, OUTCOME: "complete"},
        "failed": {REASON: "loss became nan", OUTCOME: "failed"},
        "stopped": {REASON: "stopped early after epoch 1", OUTCOME: "stopped"},
        "infeasible": {OUTCOME: "infeasible"},
        "training": {},
    }
    numbers = {}
    for name, attrs in written.items():
        trial = study.ask({"keep_rate": optuna.distributions.FloatDistribution(0.5, 1.0)})
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        numbers[name] = trial.number
    assert recover_interrupted(study) == [numbers["training"]]
    trials = study.get_trials()
    by_name = {name: trials[number] for name, number in numbers.items()}
    assert by_name["complete"].state == states.COMPLETE and by_name["complete"].values == [91.5, 1200.0]
    assert by_name["failed"].state == states.FAIL and by_name["failed"].user_attrs[REASON] == "loss became nan"
    assert by_name["stopped"].state == states.PRUNED and by_name["infeasible"].state == states.PRUNED
    assert by_name["training"].state == states.FAIL and by_name["training"].user_attrs[OUTCOME] == "interrupted"
    retry = trials[-1]
    assert retry.state == states.WAITING and retry.user_attrs[RETRY_OF] == numbers["training"]
    assert retry.system_attrs["fixed_params"] == by_name["training"].params  # enqueued, not yet sampled
    # killed again after queuing the re-run but before closing the trial: no second re-run
    half_closed = study.ask()
    study.enqueue_trial({}, user_attrs={RETRY_OF: half_closed.number})
    before = len(study.trials)
    assert recover_interrupted(study) == [half_closed.number] and len(study.trials) == before


def test_a_proposal_that_cannot_be_built_ends_fail_and_the_search_goes_on(tmp_path):
    from autoprune.search.searcher import Progress, StudySearcher

    def propose(trial):
        raise RuntimeError("CUDA out of memory while calibrating")

    study = optuna.create_study(storage=storage_url(tmp_path), directions=["maximize", "maximize"])
    lines = []
    searcher = StudySearcher(study, propose, budget=1e9, flops_of=lambda candidate: 1.0,
                             throughput_of=lambda candidate: 100.0, train_config=lambda candidate, number: {}, target=2,
                             progress=Progress(total=2, done_before=0, write=lines.append))
    assert searcher.suggest("a") is None and searcher.suggest("b") is None
    assert searcher.suggest("c") == searcher.FINISHED  # two finished (failed) trials reach the target
    failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert len(failed) == 2 and all("CUDA out of memory while calibrating" in t.user_attrs[REASON] for t in failed)
    assert "FAILED: the proposal could not be built: RuntimeError" in lines[0]


def test_the_safety_net_screens_out_a_proposal_over_budget_and_counts_it(tmp_path):
    """Budget-exact proposals never trip it; a proposal step that did would be caught, counted
    and recorded infeasible (PRUNED with a positive FLOPs constraint), never trained."""
    from autoprune import PruneConfig
    from autoprune.search.searcher import Progress, StudySearcher
    from autoprune.search.space import Candidate

    study = optuna.create_study(storage=storage_url(tmp_path), directions=["maximize", "maximize"])
    amounts = iter([4, 3, 1])
    searcher = StudySearcher(study, lambda trial: Candidate(PruneConfig(reducer="tome", r=next(amounts))),
                             budget=2.5, flops_of=lambda candidate: candidate.prune.r,
                             throughput_of=lambda candidate: 100.0, target=1,
                             train_config=lambda candidate, number: {},
                             progress=Progress(total=1, done_before=0, write=lambda line: None))
    assert searcher.suggest("a")["prune_config"]["r"] == 1
    assert (searcher.infeasible, searcher.proposed) == (2, 3)
    over = [t for t in study.trials if t.user_attrs.get(OUTCOME) == "infeasible"]
    assert [t.user_attrs["prune_config"]["r"] for t in over] == [4, 3]
    assert all(t.state == optuna.trial.TrialState.PRUNED and t.constraints["flops"] > 0 for t in over)


def test_a_search_that_lost_its_lease_stops_proposing_and_never_crashes_on_a_settled_trial(tmp_path):
    from autoprune import PruneConfig
    from autoprune.search.searcher import Progress, StudySearcher, recover_interrupted
    from autoprune.search.space import Candidate

    study = optuna.create_study(storage=storage_url(tmp_path), directions=["maximize", "maximize"])
    held, lines = [True], []
    searcher = StudySearcher(study, lambda trial: Candidate(PruneConfig(reducer="tome", r=trial.suggest_int("r", 1, 4))),
                             budget=1e9, flops_of=lambda candidate: 1.0, throughput_of=lambda candidate: 100.0,
                             train_config=lambda candidate, number: {}, target=3, progress=Progress(total=3, done_before=0, write=lines.append),
                             leased=lambda: held[0])
    assert searcher.suggest("a")["trial_number"] == 0
    held[0] = False  # another search takes over and settles the running trial
    recover_interrupted(study)
    assert searcher.suggest("b") is None and "another search took over" in searcher.exhausted
    searcher.on_trial_complete("a", {"autoprune_final": True, "accuracy": 90.0, "throughput": 100.0, "flops": 1.0})
    assert "settled by the search that took over" in lines[-1] and not searcher.live
    assert searcher.suggest("c") == searcher.FINISHED
    assert study.trials[0].user_attrs[OUTCOME] == "interrupted"


def test_the_budget_floor_counts_mass_based_sait(tmp_path):
    """A space of mass-based SaiT alone must not be told that nothing below dense fits."""
    from autoprune import PruneConfig, predict_flops
    from autoprune.search.proposals import cheapest_cost
    from autoprune.search.space import SearchSpace
    from autoprune.trial import create_unweighted

    space = tmp_path / "mass.yaml"
    space.write_text("reducers: [sait]\nsait: {mode: mass, mass_threshold: [0.5, 0.9]}\n")
    model = create_unweighted(TINY.name, TINY.kwargs)
    floor = cheapest_cost(SearchSpace.from_file(str(space)), model)
    # the earliest SaiT layer the space allows, keeping a single patch token: below any mass config
    last_layer_few_tokens = PruneConfig(reducer="sait", layers=(len(model.blocks) - 1,), keep_rate=0.1)
    assert floor < predict_flops(model, last_layer_few_tokens) < predict_flops(model)


def test_an_unknown_sampler_is_refused_up_front(workdir):
    with pytest.raises(SearchError, match=r"sampler: 'grid' is invalid; accepted: tpe, random"):
        search(tiny_settings(sampler="grid"), trials=1, storage=storage_url(workdir), log=lambda line: None)
    assert not (workdir / "studies.db").exists()


def test_a_cuda_search_without_gpus_per_trial_is_refused_up_front(workdir):
    with pytest.raises(SearchError, match=r"gpus_per_trial: 0 is invalid for device 'cuda'"):
        search(tiny_settings(device="cuda"), trials=1, storage=storage_url(workdir), gpus_per_trial=0,
               log=lambda line: None)
    assert not (workdir / "studies.db").exists()


# -- teachers ------------------------------------------------------------------------------------

def _teacher_checkpoint(path: Path, num_classes: int, seed: int = 0) -> Path:
    import timm
    import torch

    torch.manual_seed(seed)
    torch.save(timm.create_model(TINY.name, num_classes=num_classes, **{**TINY.kwargs, "depth": 2}).state_dict(), path)
    return path


@pytest.mark.parametrize("argv, message", [
    (["--teacher", "vit_nonexistent", "--teacher-pretrained"], "--teacher: unknown timm model 'vit_nonexistent'"),
    (["--teacher", "vit_tiny_patch16_224"], "give its weights with --teacher-pretrained or --teacher-checkpoint PATH"),
    (["--teacher-pretrained"], "need --teacher NAME"),
    (["--teacher", "vit_tiny_patch16_224", "--teacher-checkpoint", "/no/such.pth"],
     "--teacher-checkpoint: '/no/such.pth' does not exist"),
    (["--teacher", "vit_tiny_patch16_224", "--teacher-pretrained", "--teacher-kwargs", "img_size"],
     "--teacher-kwargs: 'img_size' is not KEY=VALUE"),
])
def test_bad_teacher_input_exits_2_before_anything_runs(workdir, capsys, argv, message):
    assert main(["search", "--preset", "quickstart", "--budget", "60%", *argv,
                 "--storage", storage_url(workdir)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (workdir / "studies").exists() and not (workdir / "studies.db").exists()


def test_a_teacher_of_other_classes_is_refused_for_logits_distillation(workdir, capsys):
    checkpoint = _teacher_checkpoint(workdir / "teacher.pth", num_classes=7)
    argv = ["search", "--preset", "quickstart", "--model-kwargs", "img_size=32,patch_size=8,embed_dim=48,depth=4,num_heads=3",
            "--budget", "75%", "--teacher", TINY.name, "--teacher-checkpoint", str(checkpoint),
            "--teacher-kwargs", "img_size=32,patch_size=8,embed_dim=48,depth=2,num_heads=3", "--storage", storage_url(workdir)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert ("--teacher vit_tiny_patch16_224: logits distillation needs a teacher that predicts the student's 10 "
            "classes; the teacher has 7") in err and err.count("\n") == 1
    assert not (workdir / "studies.db").exists()


def test_an_unreachable_pretrained_teacher_exits_2(workdir, capsys, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code = main(["search", "--preset", "quickstart", "--budget", "70%", "--teacher", "deit_tiny_patch16_224",
                 "--teacher-pretrained", "--storage", storage_url(workdir)])
    assert code == 2
    assert "--teacher-pretrained: the weights of deit_tiny_patch16_224 could not be loaded" in capsys.readouterr().err


def test_the_teacher_is_part_of_the_study_settings(workdir):
    """Resuming with another teacher (weights by content) or none is refused, listing the difference;
    a study without a teacher records none, as studies made before teachers existed."""
    import json

    from autoprune.search.space import SearchSpace
    from autoprune.study_attrs import SETTINGS_ATTR
    from autoprune.teacher import TeacherSpec

    kwargs = {**TINY.kwargs, "depth": 2}
    first = TeacherSpec(TINY.name, str(_teacher_checkpoint(workdir / "a.pth", 4, seed=0)), kwargs)
    other = TeacherSpec(TINY.name, str(_teacher_checkpoint(workdir / "b.pth", 4, seed=1)), kwargs)
    settings = tiny_settings(teacher=first)
    space = SearchSpace.from_file(settings.space)
    assert "teacher" not in tiny_settings().to_record(space)
    study = optuna.create_study(storage=open_storage(storage_url(workdir)), study_name="t",
                                directions=["maximize", "maximize"])
    study.set_user_attr(SETTINGS_ATTR, json.loads(json.dumps(settings.to_record(space), default=str)))
    with pytest.raises(SearchError, match=r"refusing to resume: teacher\.weights: stored 'sha256:"):
        search(tiny_settings(teacher=other), trials=1, study_name="t", storage=storage_url(workdir), log=lambda line: None)
    with pytest.raises(SearchError, match=r"refusing to resume: teacher: stored .*, not requested"):
        search(tiny_settings(), trials=1, study_name="t", storage=storage_url(workdir), log=lambda line: None)
    assert not (workdir / "studies" / "baselines").exists()  # refused before anything was trained


def test_the_spaces_reach_the_papers_distillation_settings():
    from autoprune import PruneConfig, predict_flops
    from autoprune.search.proposals import Proposer
    from autoprune.search.space import Candidate, SearchSpace
    from autoprune.trial import create_unweighted

    for name in ("default", "sait"):
        assert SearchSpace.from_file(name).specs[("distill", "beta")].high >= 4  # SaiT distils with beta 4
    space = SearchSpace.from_dict({"reducers": ["evit"], "keep_rate": [0.5, 0.9],
                                   "distill": {"kind": ["none", "features", "features_cls", "tis"], "beta": [0.5, 4.0]}})
    assert space.distill_kinds() == ("features", "features_cls")  # tis applies to sait only
    model = create_unweighted(TINY.name, TINY.kwargs)
    proposer = Proposer(space, model, predict_flops(model), lambda cfg: predict_flops(model, cfg))
    candidate = Candidate(PruneConfig(reducer="evit", layers=(1,), keep_rate=0.7), distill="features_cls", beta=4.0)
    assert proposer.params_for(candidate, share=1.0) is not None  # the mode is searched


def test_a_failed_front_re_timing_leaves_the_study_and_its_front_as_they_were(tmp_path):
    from autoprune.search.retime import retime_front
    from autoprune.study_attrs import FRONT_TIMING_ATTR

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", directions=["maximize", "maximize"])
    study.add_trial(optuna.trial.create_trial(
        values=[90.0, 100.0], user_attrs={"prune_config": {"reducer": "tome", "r": 2}, "checkpoint_path": "gone.pt"}))
    lines = []

    def broken(models, rounds):
        raise RuntimeError("out of memory")

    assert retime_front(study, broken, 32, lines.append) is None
    assert FRONT_TIMING_ATTR not in study.user_attrs and len(study.trials) == 1
    assert "checkpoint gone" in lines[0] and "re-timing the front failed (RuntimeError: out of memory)" in lines[1]


def test_the_printed_front_warns_when_dense_re_times_far_from_the_table():
    from autoprune.search.summary import format_front

    trial = optuna.trial.create_trial(values=[90.0, 1500.0], user_attrs={
        "prune_config": {"reducer": "evit", "layers": [1], "keep_rate": 0.6}, "flops": 1e8, "throughput": 1400.0})
    dense = {"val": {"top1": 91.0}, "flops": 2e8, "throughput": 950.0, "predicted_throughput": 1000.0, "serve_batch": 1}
    near = FrontTiming(15, 1, 880.0, {0: 1300.0})   # 12 % under the prediction: within what load moves
    assert "note:" not in format_front([trial], dense, near)
    far = FrontTiming(15, 1, 1250.0, {0: 1800.0})   # 25 % over: the table was made under other load
    assert "note: the dense model re-timed at 1250 img/s, +25% from the latency table's 1000" in format_front([trial], dense, far)
