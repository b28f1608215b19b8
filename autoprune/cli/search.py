"""`autoprune search`: options from flags and --config merged and checked, then the search, then
its report."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

from ..study_attrs import DEFAULT_STORAGE
from ..train import MAX_SEED
from .parsing import UsageError, parse_yaml, parse_model_kwargs


SEARCH_KEYS = {  # --config keys: the long flags of `autoprune search`, dashes or underscores
    "budget", "preset", "model", "model_kwargs", "pretrained", "checkpoint", "data", "space", "trials", "epochs",
    "seed", "study", "storage", "address", "gpus_per_trial", "cpus_per_trial", "concurrency", "screen",
    "screen_images", "halving", "serve_batch", "early_stopping", "teacher", "teacher_kwargs", "teacher_pretrained",
    "teacher_checkpoint", "lr", "train_batch", "baseline_epochs", "baseline_lr", "min_baseline_accuracy",
}


def _search_options(args: argparse.Namespace) -> dict:
    """Options from --config (a YAML file) overridden by the flags given on the command line."""
    options = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"--config: {args.config!r} is not a file (a YAML mapping of search options)")
        data = parse_yaml(path.read_text(), args.config) or {}
        if not isinstance(data, dict):
            raise UsageError(f"--config {args.config}: expected a mapping of options ({', '.join(sorted(SEARCH_KEYS))})")
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name not in SEARCH_KEYS:
                raise UsageError(f"--config {args.config}: unknown option {key!r}; accepted: {', '.join(sorted(SEARCH_KEYS))}")
            options[name] = value
    for name in SEARCH_KEYS:  # every search flag defaults to None: given means given, even if it equals the default
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    options = {**dict.fromkeys(SEARCH_KEYS), **SEARCH_DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    if options["budget"] is None:
        raise UsageError("--budget is required (e.g. --budget 2.6GFLOPs or --budget 60%)")
    return _checked(options)


SEARCH_DEFAULTS = {"preset": "deit_small", "trials": 32, "storage": DEFAULT_STORAGE, "concurrency": 1}


def _checked(options: dict) -> dict:
    """The merged options with their types and ranges checked, whether they came from flags or YAML."""
    def number(name: str, kind: type, valid: Callable[[float], bool], accepted: str) -> None:
        value = options[name]
        if value is None:
            return
        refused = UsageError(f"--{name.replace('_', '-')}: {value!r} is invalid; accepted: {accepted}")
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise refused
        try:
            converted = kind(value)
        except (TypeError, ValueError):
            raise refused from None
        if not valid(converted) or not math.isfinite(converted):
            raise refused
        options[name] = converted

    number("trials", int, lambda v: v >= 1, "a positive integer")
    number("concurrency", int, lambda v: v >= 1, "a positive integer")
    number("cpus_per_trial", int, lambda v: v >= 1, "a positive integer")
    number("gpus_per_trial", float, lambda v: v >= 0, "a number >= 0 (fractions share a GPU)")
    number("epochs", float, lambda v: v > 0, "a positive number (fractions allowed)")
    number("lr", float, lambda v: v > 0, "a positive number, e.g. 2e-4")
    number("train_batch", int, lambda v: v >= 1, "a positive integer")
    number("baseline_epochs", float, lambda v: v >= 0, "a number >= 0 (fractions allowed; 0 takes the weights as they are)")
    number("baseline_lr", float, lambda v: v > 0, "a positive number, e.g. 1e-3")
    number("min_baseline_accuracy", float, lambda v: 0 <= v <= 100, "a percentage from 0 to 100")
    number("seed", int, lambda v: 0 <= v <= MAX_SEED, f"an integer from 0 to {MAX_SEED}")
    number("screen", int, lambda v: v >= 0, "an integer >= 0 (0: no screening)")
    number("screen_images", int, lambda v: v >= 1, "an integer >= 1")
    number("halving", int, lambda v: v == 0 or v >= 2, "0 (off) or an integer >= 2")
    number("serve_batch", int, lambda v: v >= 1, "a positive integer")
    if options["early_stopping"]:  # `early_stopping: false` in an older config file is harmless
        raise UsageError("--early-stopping: ASHA early stopping was replaced by successive halving with Pareto "
                         "promotion; accepted: --halving ETA (e.g. --halving 3)")
    for name in ("pretrained", "teacher_pretrained"):
        if options[name] is not None and not isinstance(options[name], bool):
            raise UsageError(f"--config: {name}: {options[name]!r} is invalid; accepted: true or false")
    for name in ("budget", "preset", "model", "checkpoint", "data", "space", "study", "storage", "address",
                 "teacher", "teacher_checkpoint"):
        value = options.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
            raise UsageError(f"--config: {name}: {value!r} is invalid; accepted: a single value (text)")
        if value is not None:
            options[name] = str(value)
    if options["budget"] is not None:
        from ..search.budget import BudgetError, parse_budget

        try:
            parse_budget(options["budget"])
        except BudgetError as error:
            raise UsageError(str(error)) from None
    for name in ("model_kwargs", "teacher_kwargs"):
        kwargs = options.get(name)
        if kwargs is not None and not isinstance(kwargs, (str, dict)):
            raise UsageError(f"--config: {name}: {kwargs!r} is invalid; accepted: a mapping or name=value,...")
    return options


def _teacher_spec(options: dict):
    """The --teacher options as a TeacherSpec, or None (distil from the dense baseline)."""
    from ..teacher import TeacherSpec

    name, kwargs = options["teacher"], options["teacher_kwargs"]
    pretrained, checkpoint = options["teacher_pretrained"], options["teacher_checkpoint"]
    if name is None:
        if pretrained or checkpoint or kwargs is not None:
            raise UsageError("--teacher-pretrained, --teacher-checkpoint and --teacher-kwargs need --teacher NAME")
        return None
    if pretrained and checkpoint:
        raise UsageError("--teacher-pretrained and --teacher-checkpoint exclude each other")
    if not (pretrained or checkpoint):
        raise UsageError(f"--teacher {name}: give its weights with --teacher-pretrained or --teacher-checkpoint PATH")
    kwargs = parse_model_kwargs(kwargs, "--teacher-kwargs") if isinstance(kwargs, str) else dict(kwargs or {})
    return TeacherSpec(name, "pretrained" if pretrained else checkpoint, kwargs)


def cmd_search(args: argparse.Namespace) -> None:
    import torch

    from ..presets import get_preset
    from ..search import SearchError, SearchSettings, search
    from ..trial import ModelSpec

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # autoprune prints its own progress
    options = _search_options(args)
    if options["pretrained"] and options["checkpoint"]:
        raise UsageError("--pretrained and --checkpoint exclude each other")
    teacher = _teacher_spec(options)
    if options["baseline_epochs"] == 0 and options["baseline_lr"] is not None:
        raise UsageError("--baseline-lr: a baseline of 0 epochs is not trained; drop --baseline-lr or give "
                         "--baseline-epochs above 0")
    gpus = options["gpus_per_trial"]
    if gpus is None:
        gpus = 1 if torch.cuda.is_available() else 0
    try:
        model = get_preset(options["preset"]).model
    except ValueError as error:
        raise UsageError(f"--preset: {error}") from None
    if options["model"] is not None and options["model"] != model.name:
        model = ModelSpec(options["model"], {}, "scratch")
    if options["model_kwargs"] is not None:
        kwargs = options["model_kwargs"]
        model = dataclasses.replace(model, kwargs=parse_model_kwargs(kwargs) if isinstance(kwargs, str) else dict(kwargs))
    if options["pretrained"]:
        model = dataclasses.replace(model, init="pretrained")
    if options["checkpoint"]:
        model = dataclasses.replace(model, init=str(options["checkpoint"]))
    settings = SearchSettings.from_preset(options["preset"], budget=str(options["budget"]), model=model)
    recipe = _override(settings.recipe, epochs=options["epochs"], lr=options["lr"], batch_size=options["train_batch"])
    baseline_recipe = _override(settings.baseline_recipe, epochs=options["baseline_epochs"], lr=options["baseline_lr"],
                                batch_size=options["train_batch"])
    changes = {key: options[key] for key in ("data", "space", "seed", "screen", "screen_images", "halving", "serve_batch")
               if options[key] is not None}
    settings = dataclasses.replace(settings, recipe=recipe, baseline_recipe=baseline_recipe,
                                   device="cuda" if gpus > 0 else "cpu", teacher=teacher, **changes)
    screening = (f"screen {settings.screen} configs on {settings.screen_images} val images" if settings.screen
                 else "no screening")
    print(f"autoprune search: preset {options['preset']}, model {model.name} {model.kwargs or ''} ({model.init}), "
          f"data {settings.data}, space {settings.space}, budget {settings.budget}, trials {options['trials']}, "
          f"seed {settings.seed}, device {settings.device} (serving batch {settings.serving_batch}), {screening}, "
          f"successive halving {f'eta {settings.halving}' if settings.halving else 'off'}, "
          f"teacher {f'{teacher.name} ({teacher.weights})' if teacher else 'the dense baseline'}")
    print(f"recipes: baseline {_describe(baseline_recipe)}; trials {_describe(recipe)}")
    try:
        result = search(settings, trials=options["trials"], study_name=options["study"], storage=options["storage"],
                        address=options["address"], cpus_per_trial=options["cpus_per_trial"], gpus_per_trial=gpus,
                        concurrency=options["concurrency"], min_baseline_accuracy=options["min_baseline_accuracy"])
    except SearchError as error:
        raise UsageError(str(error)) from None
    # the report is the command's last step, not the search's: search() writes the study and
    # nothing else, so the service does not load the plotting stack and the report only reads
    from ..report import write_report

    print(f"report: {write_report(result.storage, result.study_name)}")


def _override(recipe, **values):
    """`recipe` with the values given on the command line or in --config (None: not given)."""
    return dataclasses.replace(recipe, **{key: value for key, value in values.items() if value is not None})


def _describe(recipe) -> str:
    if recipe.epochs == 0:
        return "0 epochs (the starting weights as they are: measured, not trained)"
    return f"{recipe.epochs:g} epoch{'' if recipe.epochs == 1 else 's'} at lr {recipe.lr:g}, batch {recipe.batch_size}"


def register(commands) -> None:
    search = commands.add_parser(
        "search", help="search token-reduction configs within a FLOPs budget (Ray Tune + Optuna)",
        description="Search which reducer, layers and rates fit a FLOPs budget best. Trials run on Ray Tune "
                    "(a local instance, or a cluster with --address); an Optuna study keeps every trial, so "
                    "running the same command again resumes the search.")
    search.add_argument("--budget", help="FLOPs per image: 2.6GFLOPs, 2.6G, 2600MFLOPs, 2.6e9, or 56%% of dense; or speed "
                        "(predicted at --serve-batch on this device): 2x the dense model's throughput, or 1500img/s "
                        "(required)")
    search.add_argument("--config", help="YAML file of these options (flags given here override it), "
                                         "e.g. examples/quickstart.yaml")
    search.add_argument("--preset", help="model, data and recipes to start from: "
                        "deit_small (GPU) or quickstart (CPU) (default: deit_small)")
    search.add_argument("--model", help="timm ViT name (default: the preset's)")
    search.add_argument("--model-kwargs", help="timm create_model kwargs, e.g. img_size=64,patch_size=8")
    weights = search.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", default=None, help="start from timm's pretrained weights")
    weights.add_argument("--checkpoint", help="start from a local weights file")
    search.add_argument("--teacher", help="distil from this timm model instead of the dense baseline, e.g. "
                        "vit_small_patch16_224.dino (SaiT's teacher); needs --teacher-pretrained or --teacher-checkpoint")
    search.add_argument("--teacher-kwargs", help="the teacher's timm create_model kwargs, e.g. img_size=64")
    teacher_weights = search.add_mutually_exclusive_group()
    teacher_weights.add_argument("--teacher-pretrained", action="store_true", default=None,
                                 help="the teacher's timm pretrained weights")
    teacher_weights.add_argument("--teacher-checkpoint", help="the teacher's local weights file")
    search.add_argument("--data", help="synthetic, imagefolder:PATH, cifar10:PATH or cifar100:PATH (default: synthetic)")
    search.add_argument("--space", help="search-space YAML file, or the name of one in search_spaces/ "
                        "(default, evit_tome, sait; default: default)")
    search.add_argument("--trials", type=int, help="fine-tunes to finish at full fidelity (default: 32); failed "
                        "ones count, trials stopped at a lower successive-halving rung and screens do not")
    # recipe defaults follow the starting point (from scratch, or from trained weights); the
    # recipes in force are printed at start
    search.add_argument("--epochs", type=float, help="fine-tuning epochs per trial, fractions allowed")
    search.add_argument("--lr", help="peak learning rate of each trial")
    search.add_argument("--train-batch", metavar="N", help="batch size of every fine-tune: the baseline's and the trials'")
    search.add_argument("--baseline-epochs", metavar="E", help="epochs of the dense baseline, fractions allowed; "
                        "0 takes the starting weights as they are (a checkpoint already trained on this data)")
    search.add_argument("--baseline-lr", metavar="LR", help="peak learning rate of the dense baseline")
    search.add_argument("--min-baseline-accuracy", metavar="PCT", help="val top-1 (%%) the dense baseline must reach, or the "
                        "search stops before any trial (default: chance + 5 points)")
    search.add_argument("--seed", type=int, help="seed of the sampler and of training (default: 0)")
    search.add_argument("--study", help="study name (default: MODEL-BUDGET)")
    search.add_argument("--storage", help=f"Optuna storage, any SQLAlchemy URL (default: {DEFAULT_STORAGE})")
    search.add_argument("--address", help="join this Ray cluster (default: start a local Ray)")
    search.add_argument("--gpus-per-trial", type=float, help="default: 1 when CUDA is available, else 0")
    search.add_argument("--cpus-per-trial", type=int, help="default: all CPUs / concurrency")
    search.add_argument("--concurrency", type=int, help="trials (and screening workers) at once (default: 1; "
                        "throughput is only meaningful when a trial has its device to itself)")
    search.add_argument("--screen", type=int, metavar="N",
                        help="before any fine-tuning, evaluate N configs off the shelf (the dense baseline's weights, "
                             "no training) and fine-tune the best of them; 0: no screening (default: the preset's: "
                             "64 for quickstart, about a minute on 2 cores; 256 for deit_small)")
    search.add_argument("--screen-images", type=int, metavar="K",
                        help="validation images each screen evaluates: a fixed sample, seeded by --seed "
                             "(default: the preset's: 256 for quickstart, 2048 for deit_small)")
    search.add_argument("--halving", type=int, metavar="ETA",
                        help="successive halving on fine-tuning epochs: at rungs of E/ETA^k epochs a trial goes on "
                             "only if in the best 1/ETA by Pareto rank (accuracy, predicted throughput) of the trials "
                             "there; "
                             "stopped ones end PRUNED and never reach the front; 0: off (default: 0)")
    search.add_argument("--serve-batch", type=int, metavar="B",
                        help="batch size the throughput objective and speed budgets are predicted at, from the latency "
                             "table calibrated for the model on this device (cached under studies/latency; default: 1 on a "
                             "CPU, 64 on CUDA)")
    search.add_argument("--early-stopping", action="store_true", default=None, help=argparse.SUPPRESS)
    search.set_defaults(run=cmd_search)
