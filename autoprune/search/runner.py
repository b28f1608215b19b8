"""`search()`: the budget-aware search service, as a Python API (the CLI is a thin layer on it).

Order matters: every input is validated before anything is trained or written; then the dense
baseline is built (or read from its cache), the study is opened or resumed under a lease, and
Ray Tune runs the trials proposed by `StudySearcher` until the study holds the requested number
of finished trials.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna

from ..config import PruneConfig
from ..data import DataSpec, SyntheticOptions, load_datasets, model_data_config, parse_data_spec
from ..distill import DistillationError, check_teacher
from ..flops import predict_flops
from ..presets import get_preset, recipes_for
from ..progress import LiveProgress
from ..storage import StorageError, StudyLease, open_storage, settings_diff, shown_url
from ..study import OBJECTIVES, finished_count, infeasible_count, pareto_front
from ..study_attrs import DEFAULT_STORAGE, DENSE_ATTR, SETTINGS_ATTR, UID_ATTR, WARM_START, WARM_STARTED_ATTR
from ..teacher import TeacherError, TeacherSpec
from ..train import MAX_SEED, TrainConfig
from ..trial import BaselineError, ModelError, ModelSpec, create_unweighted, dense_baseline
from .baseline_gate import baseline_refusal
from .budget import BudgetError, format_flops, parse_budget
from .calibration import Calibration
from .proposals import PROPOSALS, ProposalError, Proposer, cheapest_flops
from .searcher import Progress, StudySearcher, recover_interrupted
from .space import SearchSpace
from .trainable import run_search_trial
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
    early_stopping: bool = False
    device: str = "cpu"
    teacher: TeacherSpec | None = None  # distil from this model instead of the dense baseline
    sampler: str = "tpe"  # how proposals are sampled: tpe, or random (a baseline for comparisons)

    @classmethod
    def from_preset(cls, name: str, budget: str, **changes) -> "SearchSettings":
        """The preset's settings with `changes`; recipes not given follow the model and its starting
        point (`presets.recipes_for`): a from-scratch recipe for a model trained from scratch."""
        preset = get_preset(name)
        model = changes.pop("model", preset.model)
        recipes = recipes_for(preset, model)
        return dataclasses.replace(cls(budget=budget, model=model, data=preset.data, synthetic=preset.synthetic,
                                       recipe=recipes.trial, baseline_recipe=recipes.baseline, device=preset.device),
                                   **changes)

    def to_record(self, space: SearchSpace) -> dict[str, Any]:
        """JSON-ready record stored with the study (the space and a teacher checkpoint by content,
        not by file name; no teacher key without one, as studies made before teachers)."""
        record = dataclasses.asdict(self)
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
    study_name = study_name or default_study_name(settings)
    budget = _parse(parse_budget, settings.budget, BudgetError)
    if budget.speed:  # parsed and checked; feasibility from the latency predictor is not wired in yet
        raise SearchError(f"--budget: {settings.budget!r} is a speed budget, which the search does not take yet; "
                          "accepted here: a FLOPs budget (e.g. 2.6GFLOPs or 56%)")
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
    budget_flops = budget.resolve(dense_flops)
    floor = cheapest_flops(space, probe)
    if budget_flops < floor:
        raise SearchError(f"--budget: {budget} is below the cheapest config the search space can express "
                          f"({format_flops(floor)}); accepted: at least {format_flops(floor)}")
    log(f"study {study_name!r} in {shown_url(storage)}: {trials} trials, budget {format_flops(budget_flops)} "
        f"({budget_flops / dense_flops:.0%} of dense {format_flops(dense_flops)}), space {settings.space}")
    if budget_flops >= dense_flops:
        log(f"the budget is at or above the dense model's {format_flops(dense_flops)}: searching for speed within it")

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
        study.set_user_attr(DENSE_ATTR, {key: baseline.metrics[key] for key in ("val", "flops", "throughput")})
        log(f"dense baseline: val top-1 {baseline.metrics['val']['top1']:.2f}%, "
            f"{format_flops(baseline.metrics['flops'])}, {baseline.metrics['throughput']:.0f} img/s ({baseline.path})")
        return _drive(settings, study, space, probe, baseline, datasets, budget_flops, trials, study_name, storage,
                      address, cpus_per_trial, gpus_per_trial, concurrency, retries, running, lambda: lease.held)
    finally:
        lease.release()


def _drive(settings, study, space, probe, baseline, datasets, budget_flops, trials, study_name, storage, address,
           cpus_per_trial, gpus_per_trial, concurrency, retries, running, leased) -> SearchResult:
    """Recover, warm-start and run trials on an opened, leased study."""
    log = running.write
    recovered = recover_interrupted(study)
    if recovered:
        log(f"resuming: trials {recovered} were interrupted; marked FAIL and queued to run again")
    calibration = Calibration.from_dataset(baseline.model, datasets.val, settings.recipe.batch_size)

    def flops_of(prune: PruneConfig) -> float:
        return calibration.flops(prune) if prune.adaptive else predict_flops(probe, prune)

    proposer = _parse(lambda: Proposer(space, probe, budget_flops, flops_of), None, ProposalError)
    if proposer.unreachable:
        log("left out, their cheapest config is over the budget: " + ", ".join(
            f"{' '.join(filter(None, option))} ({format_flops(cost)})" for option, cost in proposer.unreachable.items()))
    if not study.user_attrs.get(WARM_STARTED_ATTR):
        enqueued = enqueue_warm_starts(study, proposer)
        study.set_user_attr(WARM_STARTED_ATTR, True)
        log(f"warm start (hand-designed configs solved to the budget): {', '.join(enqueued) or 'none in this space'}")
    done = finished_count(study)
    if done >= trials:
        log(f"the study already holds {done} finished trials")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # seeded by the study's size: a resumed search does not replay its first proposals
            seed = (settings.seed + len(study.trials)) % (MAX_SEED + 1)
            study.sampler = optuna.samplers.RandomSampler(seed=seed) if settings.sampler == "random" else \
                optuna.samplers.TPESampler(multivariate=True, group=True, constant_liar=True, seed=seed,
                                           n_startup_trials=min(10, max(4, trials // 4)))
        searcher = StudySearcher(
            study, proposer.propose, budget_flops, lambda candidate: flops_of(candidate.prune),
            train_config=lambda c, number: dataclasses.replace(
                settings.recipe, **c.train_overrides(), seed=settings.seed + number).to_dict(),
            target=trials, progress=Progress(total=trials, done_before=done, write=log, running=running), leased=leased)
        _run_ray(settings, searcher, baseline, study_name, storage, address, cpus_per_trial, gpus_per_trial,
                 concurrency, retries)
        log(f"over budget {searcher.infeasible}/{searcher.proposed} proposals (screened out, never trained)")
        if searcher.exhausted:
            raise SearchError(searcher.exhausted)
    front = pareto_front(study)
    log(format_front(front, baseline.metrics))
    log(f"study {study_name!r} lives in {shown_url(storage)}")
    infeasible = infeasible_count(study)
    return SearchResult(study_name, storage, finished_count(study), front, len(study.trials), infeasible)


def format_front(front: list[optuna.trial.FrozenTrial], dense: dict[str, Any]) -> str:
    lines = ["Pareto front (accuracy vs throughput, within budget):",
             f"{'trial':>5}  {'config':<44} {'top-1':>7} {'GFLOPs':>7} {'img/s':>8} {'speedup':>7}",
             f"{'dense':>5}  {'':<44} {dense['val']['top1']:>6.2f}% {dense['flops'] / 1e9:>7.3f} "
             f"{dense['throughput']:>8.0f} {'1.00x':>7}"]
    for trial in front:
        attrs = trial.user_attrs
        label = PruneConfig.from_dict(attrs["prune_config"]).describe()
        if attrs.get(WARM_START):
            label += f" [{attrs[WARM_START]}]"
        lines.append(f"{trial.number:>5}  {label[:44]:<44} {trial.values[0]:>6.2f}% {attrs['flops'] / 1e9:>7.3f} "
                     f"{trial.values[1]:>8.0f} {attrs['speedup']:>6.2f}x")
    if not front:
        lines.append("  (no finished trial within budget yet)")
    return "\n".join(lines)


# -- Ray -------------------------------------------------------------------------------------------

def _run_ray(settings: SearchSettings, searcher: StudySearcher, baseline, study_name: str, storage: str,
             address: str | None, cpus_per_trial: int | None, gpus_per_trial: float, concurrency: int,
             retries: int) -> None:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    started_here = not ray.is_initialized()
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic reporter honours verbose=0
    # a failure report has no accuracy; the ASHA scheduler skips it, Ray's strict check would abort the run
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 configure_logging=True)
    try:
        cpus = cpus_per_trial or max(1, int(ray.available_resources().get("CPU", os.cpu_count() or 1)) // concurrency)
        home = (Path("studies") / study_name).resolve()
        data = parse_data_spec(settings.data)
        if data.path is not None:  # Ray Tune runs each trial in its own folder: relative paths break there
            data = DataSpec(data.kind, str(Path(data.path).resolve()))
        context = {
            "model": dataclasses.asdict(settings.model), "data": str(data),
            "synthetic": dataclasses.asdict(settings.synthetic), "baseline": str(baseline.path.resolve()),
            "device": settings.device, "threads": cpus,
            "teacher": None if settings.teacher is None else dataclasses.asdict(settings.teacher),
            "checkpoints": str(home / "checkpoints" / searcher.study.user_attrs[UID_ATTR]),
        }
        trainable = tune.with_resources(tune.with_parameters(run_search_trial, context=context),
                                        {"cpu": cpus, "gpu": gpus_per_trial})
        scheduler = None
        if settings.early_stopping:
            # stop_last_trials=False: a trial that reaches its last epoch must still report its final result
            scheduler = ASHAScheduler(time_attr="epoch", metric="accuracy", mode="max", stop_last_trials=False,
                                      max_t=max(1, int(settings.recipe.epochs)), grace_period=1, reduction_factor=2)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=-1,
                                        max_concurrent_trials=concurrency, reuse_actors=True),
            run_config=tune.RunConfig(name=f"run-{os.getpid()}", storage_path=str(home / "ray"), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=retries)),
        )
        tuner.fit()
    finally:
        if started_here:
            ray.shutdown()


# -- input checks ----------------------------------------------------------------------------------

def _parse(function, argument, errors):
    try:
        return function(argument) if argument is not None else function()
    except (errors or ValueError) as error:
        raise SearchError(str(error)) from None


def _check_same_settings(study: optuna.Study, name: str, requested: dict[str, Any]) -> None:
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if stored is None:
        raise SearchError(f"study {name!r} exists but was not made by autoprune search (no settings recorded); "
                          "choose another --study name")
    differences = settings_diff(stored, requested)
    if differences:
        raise SearchError(f"study {name!r} was created with other settings; refusing to resume: " + "; ".join(differences))


def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(record, default=str))
