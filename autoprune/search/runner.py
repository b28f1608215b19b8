"""`search()`: the budget-aware search service, as a Python API (the CLI is a thin layer on it).

Order matters: every input is validated before anything is trained or written; then the dense
baseline is built (or read from its cache), the study is opened or resumed under a lease, the
screening stage screens candidates off the shelf and promotes the best (`screen.py`), and Ray
Tune fine-tunes the trials proposed by `StudySearcher` (with successive halving, `halving.py`)
until the study holds the requested number of finished trials.
"""

from __future__ import annotations

import dataclasses
import math
import json
import re
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna

from ..config import PruneConfig
from ..data import SyntheticOptions, load_datasets, model_data_config
from ..distill import DistillationError, check_teacher
from ..flops import predict_flops
from ..latency import LatencyError, calibrate
from ..presets import get_preset, recipes_for
from ..progress import LiveProgress
from ..lease import StudyLease
from ..storage import StorageError, open_storage, settings_diff, shown_url
from ..study import OBJECTIVES, finished_count, infeasible_count, pareto_front
from ..study_attrs import (DEFAULT_STORAGE, DENSE_ATTR, SCREEN_SUFFIX, SCREEN_TAU_ATTR, SETTINGS_ATTR, UID_ATTR,
                           WARM_START, WARM_STARTED_ATTR)
from ..teacher import TeacherError, TeacherSpec
from ..train import MAX_SEED, TrainConfig
from ..trial import BaselineError, ModelError, ModelSpec, create_unweighted, dense_baseline, time_reduced
from .baseline_gate import baseline_refusal
from .budget import BudgetError, format_flops, parse_budget
from .calibration import Calibration
from .execution import ray_session, run_trials, screen_pool, worker_context, worker_resources
from .halving import HalvingScheduler, rung_epochs
from .proposals import PROPOSALS, ProposalError, Proposer, cheapest_cost
from .retime import retime_front
from .screen import ScreenError, promotion_slots, screen_and_promote, screen_study, screen_tau
from .searcher import fine_tuning_searcher, recover_interrupted
from .speed import Limit, SpeedModel, default_serve_batch
from .space import Candidate, SearchSpace
from .summary import format_front, format_stages
from .warm_start import enqueue_warm_starts

SAMPLERS = ("tpe", "random")


class SearchError(ValueError):
    """Bad input to a search, found before anything runs; the CLI exits 2 with its message."""


@dataclass(frozen=True)
class SearchSettings:
    """Everything that defines a study's results; resuming with different settings is refused.
    Defaults are the papers' DeiT-S setting (a GPU machine); `from_preset("quickstart")` fits a CPU."""

    budget: str
    model: ModelSpec = field(default_factory=lambda: get_preset("deit_small").model)
    data: str = "synthetic"
    synthetic: SyntheticOptions = field(default_factory=SyntheticOptions)
    space: str = "default"  # a YAML file, or the name of one in search_spaces/
    recipe: TrainConfig = field(default_factory=lambda: get_preset("deit_small").trial)
    baseline_recipe: TrainConfig = field(default_factory=lambda: get_preset("deit_small").baseline)
    seed: int = 0
    device: str = "cpu"
    teacher: TeacherSpec | None = None  # distil from this model instead of the dense baseline
    sampler: str = "tpe"  # how proposals are sampled: tpe, or random (a baseline for comparisons)
    screen: int = field(default_factory=lambda: get_preset("deit_small").screen)  # 0: no screening
    screen_images: int = field(default_factory=lambda: get_preset("deit_small").screen_images)
    halving: int = 0  # successive halving's eta (keep the best 1/eta at each rung); 0: off
    serve_batch: int | None = None  # batch the throughput objective and speed budgets are predicted at;
    # None: the device's (speed.default_serve_batch: 1 on a CPU, 64 on CUDA), stored as that number

    @classmethod
    def from_preset(cls, name: str, budget: str, **changes) -> "SearchSettings":
        """The preset's settings with `changes`; recipes not given follow the model and its starting
        point (`presets.recipes_for`): a from-scratch recipe for a model trained from scratch."""
        preset = get_preset(name)
        model = changes.pop("model", preset.model)
        recipes = recipes_for(preset, model)
        return dataclasses.replace(cls(budget=budget, model=model, data=preset.data, synthetic=preset.synthetic,
                                       recipe=recipes.trial, baseline_recipe=recipes.baseline, device=preset.device,
                                       screen=preset.screen, screen_images=preset.screen_images), **changes)

    @property
    def serving_batch(self) -> int:
        """`serve_batch`, or the device's default (1 on a CPU, 64 on CUDA) when none was given."""
        return default_serve_batch(self.device) if self.serve_batch is None else self.serve_batch

    def to_record(self, space: SearchSpace) -> dict[str, Any]:
        """JSON-ready record stored with the study (the space and a teacher checkpoint by content,
        not by file name; no teacher key without one, as studies made before teachers; the
        serving batch as a number, whether given or the device's default)."""
        record = dataclasses.asdict(self)
        record["serve_batch"] = self.serving_batch
        record["space"] = space.data
        del record["teacher"]
        if self.teacher is not None:
            record["teacher"] = self.teacher.identity()
        record["proposals"] = PROPOSALS  # a study searched with other proposals is not resumed with these
        return record


@dataclass
class SearchResult:
    study_name: str
    storage: str
    finished: int
    front: list[optuna.trial.FrozenTrial]
    trials_in_study: int  # every trial: finished, infeasible, interrupted, queued
    infeasible: int


def default_study_name(settings: SearchSettings) -> str:
    budget = re.sub(r"[^0-9A-Za-z.]+", "", settings.budget)
    return f"{settings.model.name}-{budget}"


def search(
    settings: SearchSettings,
    trials: int = 32,
    study_name: str | None = None,
    storage: str = DEFAULT_STORAGE,
    address: str | None = None,
    cpus_per_trial: int | None = None,
    gpus_per_trial: float | None = None,
    concurrency: int = 1,
    retries: int = 2,
    min_baseline_accuracy: float | None = None,
    log: Callable[[str], None] = print,
) -> SearchResult:
    """Run (or resume) a search until the study holds `trials` finished trials. It writes the
    study only: `autoprune.report.write_report` reads it afterwards (the CLI does so at once).
    A dense baseline below `min_baseline_accuracy` (val top-1, %; default chance + 5 points)
    stops it before any trial. With `log` print on a terminal, running trials redraw in place."""
    if trials < 1 or concurrency < 1 or retries < 0:
        raise SearchError(f"trials and concurrency must be positive and retries >= 0 "
                          f"(got {trials}, {concurrency}, {retries})")
    if settings.recipe.epochs <= 0:
        raise SearchError(f"recipe.epochs: {settings.recipe.epochs!r} is invalid for trials; accepted: a positive "
                          "number (only the baseline may take 0 epochs)")
    running = LiveProgress.for_output(log)
    log = running.write
    if gpus_per_trial is None:
        gpus_per_trial = 1 if settings.device.startswith("cuda") else 0
    if gpus_per_trial < 0 or (settings.device.startswith("cuda") and gpus_per_trial == 0):
        raise SearchError(f"gpus_per_trial: {gpus_per_trial!r} is invalid for device {settings.device!r}; accepted: "
                          "a number > 0 on CUDA (fractions share a GPU), 0 on the CPU")
    if settings.sampler not in SAMPLERS:
        raise SearchError(f"sampler: {settings.sampler!r} is invalid; accepted: {', '.join(SAMPLERS)}")
    if not isinstance(settings.seed, int) or not 0 <= settings.seed <= MAX_SEED:
        raise SearchError(f"seed: {settings.seed!r} is invalid; accepted: an integer from 0 to {MAX_SEED}")
    _check_stages(settings)
    study_name = study_name or default_study_name(settings)
    if study_name.endswith(SCREEN_SUFFIX):
        raise SearchError(f"--study: {study_name!r} ends in {SCREEN_SUFFIX!r}, the name of a study's screens; "
                          "accepted: any other name")
    settings = dataclasses.replace(settings, serve_batch=settings.serving_batch)
    if not isinstance(settings.serve_batch, int) or isinstance(settings.serve_batch, bool) or settings.serve_batch < 1:
        raise SearchError(f"serve_batch: {settings.serve_batch!r} is invalid; accepted: a positive integer")
    budget = _parse(parse_budget, settings.budget, BudgetError)
    space = _parse(SearchSpace.from_file, settings.space, ValueError)
    probe = _parse(lambda: create_unweighted(settings.model.name, settings.model.kwargs), None, ModelError)
    datasets = _parse(lambda: load_datasets(settings.data, model_data_config(probe), synthetic=settings.synthetic),
                      None, ValueError)
    probe.reset_classifier(datasets.num_classes)  # the head is part of the FLOPs
    if settings.teacher is not None:  # built, and checked against every distillation the space samples
        try:
            check_teacher(_parse(settings.teacher.load, None, TeacherError), probe, space.distill_kinds())
        except DistillationError as error:
            raise SearchError(f"--teacher {settings.teacher.name}: {error}") from None
    optuna_storage = _parse(open_storage, storage, StorageError)
    record = settings.to_record(space)
    dense_flops = predict_flops(probe)
    # the latency table depends on the architecture, not the weights: calibrated (or read from its
    # cache) before the baseline, so a speed budget out of reach is refused before any training
    table = _parse(lambda: calibrate(probe, settings.serve_batch, settings.device, progress=log), None, LatencyError)
    probe_speed = SpeedModel(probe, table, None)
    limit = Limit.of(budget, dense_flops, lambda prune: predict_flops(probe, prune), probe_speed)
    floor = cheapest_cost(space, probe, limit.cost)
    if limit.limit < floor and budget.speed:
        fastest = 1 / floor
        raise SearchError(f"--budget: {budget} asks for more than the fastest config the search space can express "
                          f"({fastest:.0f} img/s predicted at batch {settings.serve_batch}, "
                          f"{fastest / probe_speed.dense:.2f}x dense); accepted: at most {fastest:.0f}img/s or "
                          f"{math.floor(fastest / probe_speed.dense * 100) / 100:g}x")
    if limit.limit < floor:
        raise SearchError(f"--budget: {budget} is below the cheapest config the search space can express "
                          f"({limit.describe(floor)}); accepted: at least {limit.describe(floor)}")
    dense_cost = limit.cost(PruneConfig())
    log(f"study {study_name!r} in {shown_url(storage)}: {trials} trials, budget {limit.describe(limit.limit)} "
        f"(dense {format_flops(dense_flops)}, predicted {probe_speed.dense:.0f} img/s at batch {settings.serve_batch}), "
        f"space {settings.space}")
    if limit.limit >= dense_cost:
        log(f"the budget is at or above the dense model's {limit.describe(dense_cost)}: searching for speed within it")

    study = optuna.create_study(storage=optuna_storage, study_name=study_name, directions=["maximize", "maximize"],
                                load_if_exists=True)
    lease = StudyLease(optuna_storage, study._study_id, name=study_name)
    _parse(lease.acquire, None, StorageError)
    try:
        # decided under the lease; a study with no settings and no trials is new, or was created by a
        # search that died (or stopped at its baseline) before recording its settings: either way
        # this search defines it, once its baseline is worth reducing
        defined = study.user_attrs.get(SETTINGS_ATTR) is not None or bool(study.trials)
        if defined:
            _check_same_settings(study, study_name, _jsonable(record))
        if UID_ATTR not in study.user_attrs:
            study.set_user_attr(UID_ATTR, uuid.uuid4().hex[:12])
        if settings.screen:
            _parse(lambda: screen_study(study), None, ScreenError)
        try:
            baseline = dense_baseline(settings.model, datasets, settings.data, settings.baseline_recipe,
                                      settings.synthetic, device=settings.device, log=log, live=running)
        except BaselineError as error:
            raise SearchError(str(error)) from None
        refusal = baseline_refusal(baseline.metrics["val"]["top1"], datasets.num_classes, settings.data,
                                   settings.model, settings.baseline_recipe, min_baseline_accuracy, baseline.path)
        if refusal:
            raise SearchError(refusal)
        if not defined:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(list(OBJECTIVES))
            study.set_user_attr(SETTINGS_ATTR, _jsonable(record))
        study.set_user_attr(DENSE_ATTR, {**{key: baseline.metrics[key] for key in ("val", "flops", "throughput")},
                                         "predicted_throughput": probe_speed.dense, "serve_batch": settings.serve_batch})
        log(f"dense baseline: val top-1 {baseline.metrics['val']['top1']:.2f}%, "
            f"{format_flops(baseline.metrics['flops'])}, {baseline.metrics['throughput']:.0f} img/s ({baseline.path})")
        return _drive(settings, study, space, probe, baseline, datasets, budget, table, trials, study_name, storage,
                      address, cpus_per_trial, gpus_per_trial, concurrency, retries, running, lambda: lease.held)
    finally:
        lease.release()


def _drive(settings, study, space, probe, baseline, datasets, budget, table, trials, study_name, storage, address,
           cpus_per_trial, gpus_per_trial, concurrency, retries, running, leased) -> SearchResult:
    """Recover, warm-start, screen and promote, then fine-tune, on an opened, leased study."""
    log = running.write
    recovered = recover_interrupted(study)
    if recovered:
        log(f"resuming: trials {recovered} were interrupted; marked FAIL and queued to run again")
    calibration = Calibration.from_dataset(baseline.model, datasets.val, settings.recipe.batch_size)

    def flops_of(prune: PruneConfig) -> float:
        return calibration.flops(prune) if prune.adaptive else predict_flops(probe, prune)

    speed = SpeedModel(baseline.model, table, calibration)
    limit = Limit.of(budget, predict_flops(probe), flops_of, speed)
    proposer = _parse(lambda: Proposer(space, probe, limit.limit, limit.cost), None, ProposalError)
    if proposer.unreachable:
        log("left out, their cheapest config is over the budget: " + ", ".join(
            f"{' '.join(filter(None, option))} ({limit.describe(cost)})" for option, cost in proposer.unreachable.items()))

    def warm_start(target: optuna.Study) -> list[str]:
        return enqueue_warm_starts(target, proposer)

    def candidate_cost(candidate: Candidate) -> float:
        return limit.cost(candidate.prune)

    def candidate_throughput(candidate: Candidate) -> float:
        return speed.throughput(candidate.prune)

    if not study.user_attrs.get(WARM_STARTED_ATTR):
        enqueued = warm_start(study)
        study.set_user_attr(WARM_STARTED_ATTR, True)
        log(f"warm start (hand-designed configs solved to the budget): {', '.join(enqueued) or 'none in this space'}")
    done = finished_count(study)
    if done >= trials:
        log(f"the study already holds {done} finished trials")
    else:
        with ray_session(address):
            resources = worker_resources(cpus_per_trial, gpus_per_trial, concurrency)
            home = (Path("studies") / study_name).resolve()
            context = worker_context(settings, baseline, home / "checkpoints" / study.user_attrs[UID_ATTR], resources)
            if settings.screen:
                if settings.screen_images > len(datasets.val):
                    log(f"screening on all {len(datasets.val)} val images (fewer than --screen-images {settings.screen_images})")
                warm = {t.user_attrs[WARM_START] for t in study.get_trials(deepcopy=False) if WARM_START in t.user_attrs}
                screening = screen_and_promote(
                    study, settings.screen, promotion_slots(trials, len(warm)), settings.seed, proposer.propose,
                    candidate_cost, limit.limit, limit.name, speed, warm_start,
                    lambda: screen_pool(context, resources, concurrency), log, leased)
                if screening is not None and screening.stopped:
                    raise SearchError(f"screening stopped: {screening.stopped}")
            searcher = fine_tuning_searcher(settings, study, proposer.propose, candidate_cost, limit, candidate_throughput,
                                            trials, done, log, leased, running)
            scheduler = HalvingScheduler(searcher.halving.rungs, searcher.at_rung) if searcher.halving else None
            run_trials(searcher, context, resources, concurrency, retries, scheduler, home)
        log(f"over budget {searcher.infeasible}/{searcher.proposed} proposals (caught by the budget check, never trained)")
        if searcher.exhausted:
            raise SearchError(searcher.exhausted)
    if settings.screen:
        study.set_user_attr(SCREEN_TAU_ATTR, screen_tau(study).to_dict())
    timing = retime_front(study, lambda models, rounds: time_reduced(baseline, datasets, models, settings.serve_batch,
                                                                     rounds), settings.serve_batch, log)
    front = pareto_front(study)
    log(format_front(front, study.user_attrs[DENSE_ATTR], timing))
    log(format_stages(study, settings.recipe.epochs, settings.screen_images))
    log(f"study {study_name!r} lives in {shown_url(storage)}")
    infeasible = infeasible_count(study)
    return SearchResult(study_name, storage, finished_count(study), front, len(study.trials), infeasible)




# -- input checks ----------------------------------------------------------------------------------

def _parse(function, argument, errors):
    try:
        return function(argument) if argument is not None else function()
    except (errors or ValueError) as error:
        raise SearchError(str(error)) from None


def _check_stages(settings: SearchSettings) -> None:
    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not whole(settings.screen) or settings.screen < 0:
        raise SearchError(f"screen: {settings.screen!r} is invalid; accepted: an integer >= 0 (0: no screening)")
    if not whole(settings.screen_images) or settings.screen_images < 1:
        raise SearchError(f"screen_images: {settings.screen_images!r} is invalid; accepted: an integer >= 1")
    if not whole(settings.halving) or settings.halving == 1 or settings.halving < 0:
        raise SearchError(f"halving: {settings.halving!r} is invalid; accepted: 0 (off) or an integer >= 2")
    if settings.halving and not rung_epochs(settings.recipe.epochs, settings.halving):
        raise SearchError(f"halving: {settings.recipe.epochs:g}-epoch trials have no rung below full fidelity at "
                          f"eta {settings.halving}; accepted: 0 (off), or trials of at least 2 epochs")


def _comparable(record: dict[str, Any]) -> dict[str, Any]:
    """A settings record as resuming compares it. Studies made before screening and successive
    halving existed ran neither; the screen's image count means nothing without screening."""
    record = dict(record)
    if record.pop("early_stopping", False):
        record["halving"] = "ASHA early stopping (since replaced by successive halving)"
    record.setdefault("halving", 0)
    record.setdefault("screen", 0)
    if not record["screen"]:
        record.pop("screen_images", None)
    return record


def _check_same_settings(study: optuna.Study, name: str, requested: dict[str, Any]) -> None:
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if stored is None:
        raise SearchError(f"study {name!r} exists but was not made by autoprune search (no settings recorded); "
                          "choose another --study name")
    differences = settings_diff(_comparable(stored), _comparable(requested))
    if differences:
        raise SearchError(f"study {name!r} was created with other settings; refusing to resume: " + "; ".join(differences))


def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(record, default=str))
