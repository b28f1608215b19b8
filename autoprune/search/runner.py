"""`search()`: the budget-aware search service, as a Python API (the CLI is a thin layer on it).

Order matters: every input is validated before anything is trained or written; then the dense
baseline is built (or read from its cache), the study is opened or resumed under a lease, the
screening stage screens candidates off the shelf and promotes the best (`screen.py`), and Ray
Tune fine-tunes the trials proposed by `StudySearcher` (with successive halving, `halving.py`)
until the study holds the requested number of finished trials.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import torch

from ..config import PruneConfig
from ..data import SyntheticOptions, load_datasets, model_data_config
from ..flops import count_flops, predict_flops
from ..patch import apply
from ..presets import get_preset
from ..storage import StorageError, StudyLease, open_storage, settings_diff, shown_url
from ..study import OBJECTIVES, finished_count, infeasible_count, pareto_front
from ..study_attrs import (DEFAULT_STORAGE, DENSE_ATTR, SCREEN_SUFFIX, SCREEN_TAU_ATTR, SETTINGS_ATTR, UID_ATTR,
                           WARM_START, WARM_STARTED_ATTR)
from ..train import MAX_SEED, TrainConfig
from ..trial import BaselineError, ModelError, ModelSpec, create_unweighted, dense_baseline
from .budget import BudgetError, format_flops, parse_budget
from .execution import ray_session, run_trials, screen_pool, worker_context, worker_resources
from .halving import HalvingScheduler, rung_epochs
from .screen import ScreenError, promotion_slots, screen_and_promote, screen_study, screen_tau
from .searcher import fine_tuning_searcher, recover_interrupted
from .space import Candidate, SearchSpace
from .summary import format_front, format_stages


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
    screen: int = field(default_factory=lambda: get_preset("deit_small").screen)  # 0: no screening
    screen_images: int = field(default_factory=lambda: get_preset("deit_small").screen_images)
    halving: int = 0  # successive halving's eta (keep the best 1/eta at each rung); 0: off

    @classmethod
    def from_preset(cls, name: str, budget: str, **changes) -> "SearchSettings":
        preset = get_preset(name)
        return dataclasses.replace(cls(budget=budget, model=preset.model, data=preset.data, synthetic=preset.synthetic,
                                       recipe=preset.trial, baseline_recipe=preset.baseline, device=preset.device,
                                       screen=preset.screen, screen_images=preset.screen_images), **changes)

    def to_record(self, space: SearchSpace) -> dict[str, Any]:
        """JSON-ready record stored with the study (the space by content, not by file name)."""
        record = dataclasses.asdict(self)
        record["space"] = space.data
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
    log: Callable[[str], None] = print,
) -> SearchResult:
    """Run (or resume) a search until the study holds `trials` finished trials. It writes the
    study only: `autoprune.report.write_report` reads it afterwards (the CLI does so at once)."""
    if trials < 1 or concurrency < 1 or retries < 0:
        raise SearchError(f"trials and concurrency must be positive and retries >= 0 "
                          f"(got {trials}, {concurrency}, {retries})")
    if gpus_per_trial is None:
        gpus_per_trial = 1 if settings.device.startswith("cuda") else 0
    if gpus_per_trial < 0 or (settings.device.startswith("cuda") and gpus_per_trial == 0):
        raise SearchError(f"gpus_per_trial: {gpus_per_trial!r} is invalid for device {settings.device!r}; accepted: "
                          "a number > 0 on CUDA (fractions share a GPU), 0 on the CPU")
    if not isinstance(settings.seed, int) or not 0 <= settings.seed <= MAX_SEED:
        raise SearchError(f"seed: {settings.seed!r} is invalid; accepted: an integer from 0 to {MAX_SEED}")
    _check_stages(settings)
    study_name = study_name or default_study_name(settings)
    if study_name.endswith(SCREEN_SUFFIX):
        raise SearchError(f"--study: {study_name!r} ends in {SCREEN_SUFFIX!r}, the name of a study's screens; "
                          "accepted: any other name")
    budget = _parse(parse_budget, settings.budget, BudgetError)
    space = _parse(SearchSpace.from_file, settings.space, ValueError)
    probe = _parse(lambda: create_unweighted(settings.model.name, settings.model.kwargs), None, ModelError)
    datasets = _parse(lambda: load_datasets(settings.data, model_data_config(probe), synthetic=settings.synthetic),
                      None, ValueError)
    probe.reset_classifier(datasets.num_classes)  # the head is part of the FLOPs
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
        # search that died before recording its settings: either way this search defines it
        if study.user_attrs.get(SETTINGS_ATTR) is not None or study.trials:
            _check_same_settings(study, study_name, _jsonable(record))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(list(OBJECTIVES))
            study.set_user_attr(SETTINGS_ATTR, _jsonable(record))
        if UID_ATTR not in study.user_attrs:
            study.set_user_attr(UID_ATTR, uuid.uuid4().hex[:12])
        if settings.screen:
            _parse(lambda: screen_study(study), None, ScreenError)
        try:
            baseline = dense_baseline(settings.model, datasets, settings.data, settings.baseline_recipe,
                                      settings.synthetic, device=settings.device, log=log)
        except BaselineError as error:
            raise SearchError(str(error)) from None
        study.set_user_attr(DENSE_ATTR, {key: baseline.metrics[key] for key in ("val", "flops", "throughput")})
        log(f"dense baseline: val top-1 {baseline.metrics['val']['top1']:.2f}%, "
            f"{format_flops(baseline.metrics['flops'])}, {baseline.metrics['throughput']:.0f} img/s ({baseline.path})")
        return _drive(settings, study, space, probe, baseline, datasets, budget_flops, trials, study_name, storage,
                      address, cpus_per_trial, gpus_per_trial, concurrency, retries, log, lambda: lease.held)
    finally:
        lease.release()


def _drive(settings, study, space, probe, baseline, datasets, budget_flops, trials, study_name, storage, address,
           cpus_per_trial, gpus_per_trial, concurrency, retries, log, leased) -> SearchResult:
    """Recover, warm-start, screen and promote, then fine-tune, on an opened, leased study."""
    depth, patches = len(probe.blocks), probe.patch_embed.num_patches
    recovered = recover_interrupted(study)
    if recovered:
        log(f"resuming: trials {recovered} were interrupted; marked FAIL and queued to run again")
    calibration = _Calibration(baseline.model, datasets.val, settings.recipe.batch_size)

    def flops_of(candidate: Candidate) -> float:
        return calibration.flops(candidate.prune) if candidate.prune.adaptive else predict_flops(probe, candidate.prune)

    def propose(trial) -> Candidate:
        """The proposal step, one callable shared by screening and fine-tuning."""
        return space.sample(trial, depth, patches)

    def warm_start(target: optuna.Study) -> list[str]:
        return enqueue_warm_starts(target, space, probe, budget_flops, flops_of)

    if not study.user_attrs.get(WARM_STARTED_ATTR):
        enqueued = warm_start(study)
        study.set_user_attr(WARM_STARTED_ATTR, True)
        log(f"warm start: {', '.join(enqueued) or 'no hand-designed config fits the budget'}")
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
                    study, settings.screen, promotion_slots(trials, len(warm)), settings.seed, propose, flops_of,
                    budget_flops, baseline.metrics, warm_start, lambda: screen_pool(context, resources, concurrency),
                    log, leased)
                if screening is not None and screening.stopped:
                    raise SearchError(f"screening stopped: {screening.stopped}")
            searcher = fine_tuning_searcher(settings, study, propose, flops_of, budget_flops, trials, done, log, leased)
            scheduler = HalvingScheduler(searcher.halving.rungs, searcher.at_rung) if searcher.halving else None
            run_trials(searcher, context, resources, concurrency, retries, scheduler, home)
        if searcher.exhausted:
            raise SearchError(searcher.exhausted)
    if settings.screen:
        study.set_user_attr(SCREEN_TAU_ATTR, screen_tau(study).to_dict())
    front = pareto_front(study)
    log(format_front(front, baseline.metrics))
    log(format_stages(study, settings.recipe.epochs, settings.screen_images))
    log(f"study {study_name!r} lives in {shown_url(storage)}")
    infeasible = infeasible_count(study)
    return SearchResult(study_name, storage, finished_count(study), front, len(study.trials), infeasible)


# -- budget geometry ----------------------------------------------------------------------------------

def cheapest_flops(space: SearchSpace, model: torch.nn.Module) -> float:
    """A lower bound on what the space can reach: each reducer at its most aggressive settings."""
    depth, patches = len(model.blocks), model.patch_embed.num_patches
    floor = predict_flops(model)
    for prune in _extremes(space, depth, patches):
        floor = min(floor, predict_flops(model, prune))
    return floor


def _extremes(space: SearchSpace, depth: int, patches: int):
    """Configs at the low end of every range (earliest layers, lowest keep rates, most r). A
    mass-based SaiT config's cost depends on the images: it is bounded by keeping one patch token."""
    for reducer in space.reducer_choices:
        trial = _ExtremeTrial(reducer)
        try:
            prune = space.sample(trial, depth, patches).prune
        except ValueError:
            continue
        if prune.adaptive:
            prune = PruneConfig(reducer="sait", layers=prune.layers, keep_rate=1 / patches)
        yield prune


class _ExtremeTrial:
    """Answers suggestions with the cheapest end of each range."""

    CHEAP_HIGH = ("layers", "tome.r", "bat.pairs")  # more of these is cheaper

    def __init__(self, reducer: str) -> None:
        self.reducer = reducer

    def suggest_float(self, name, low, high, log=False):
        if name.startswith("ppt.r_") or name in self.CHEAP_HIGH:
            return high
        return low

    def suggest_int(self, name, low, high):
        return high if name in self.CHEAP_HIGH else low

    def suggest_categorical(self, name, choices):
        if name == "reducer":
            return self.reducer
        if name == "sait.mode":
            return "value" if "value" in choices else choices[0]
        if name == "evit.fuse":
            return False if False in choices else choices[0]
        return choices[0]


def warm_start_candidates(model: torch.nn.Module, budget: float, flops_of: Callable[[Candidate], float]) -> dict[str, Candidate]:
    """The hand-designed configs of the papers, scaled to the model, that fit the budget."""
    depth, patches = len(model.blocks), model.patch_embed.num_patches
    # EViT's blocks 4/7/10 of 12 (indices 3, 6, 9) scaled to the depth
    layers = tuple(sorted({min(depth - 1, round(depth * 0.25 * k)) for k in (1, 2, 3)}))
    sait_layer = (min(depth - 1, round(depth * 0.25)),)
    found: dict[str, Candidate] = {}

    def first_fitting(name: str, options):
        for label, cfg in options:
            candidate = Candidate(cfg)
            if flops_of(candidate) <= budget:
                found[f"{name} {label}"] = candidate
                return

    rates = (0.9, 0.8, 0.7, 0.6, 0.5)
    first_fitting("evit", [(f"{rate}", PruneConfig(reducer="evit", layers=layers, keep_rate=rate)) for rate in rates])
    first_fitting("tome", [(f"r{r}", PruneConfig(reducer="tome", r=r)) for r in range(1, patches // 2 + 1)])
    ppt_r = max(1, round(50 / 196 * patches))  # the paper's r = 50 of 196 patches
    first_fitting("ppt", [(f"r{r}", PruneConfig(reducer="ppt", layers=layers, r=r, tau=7e-5 * 196 ** 2, tau_mode="cv2"))
                          for r in range(ppt_r, patches // 2 + 1)])
    first_fitting("tps", [(f"{rate}", PruneConfig(reducer="tps", layers=layers, keep_rate=rate)) for rate in rates])
    first_fitting("sait", [(f"M{mass}", PruneConfig(reducer="sait", layers=sait_layer, mass_threshold=mass))
                           for mass in (0.9, 0.8, 0.7, 0.6, 0.5)])
    return found


def enqueue_warm_starts(study: optuna.Study, space: SearchSpace, model: torch.nn.Module, budget: float,
                        flops_of: Callable[[Candidate], float]) -> list[str]:
    depth, patches = len(model.blocks), model.patch_embed.num_patches
    enqueued = []
    for name, candidate in warm_start_candidates(model, budget, flops_of).items():
        params = space.params_for(candidate, depth, patches)
        if params is not None:
            study.enqueue_trial(params, user_attrs={WARM_START: name}, skip_if_exists=True)
            enqueued.append(name)
    return enqueued


class _Calibration:
    """FLOPs of adaptive configs, measured on a batch of val images with the trained baseline."""

    def __init__(self, model: torch.nn.Module, dataset, count: int) -> None:
        self.model = copy.deepcopy(model).eval()
        loader = torch.utils.data.DataLoader(dataset, batch_size=min(count, len(dataset)))
        self.images = next(iter(loader))[0].to(next(model.parameters()).device)
        self.cache: dict[str, float] = {}

    def flops(self, cfg: PruneConfig) -> float:
        key = cfg.to_json()
        if key not in self.cache:
            self.cache[key] = count_flops(apply(self.model, cfg), self.images)
        return self.cache[key]


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
