"""`autoprune search`: options from flags and --config merged and checked, then the search, then
its report."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from ..study_attrs import DEFAULT_STORAGE
from ..train import MAX_SEED
from .parsing import UsageError, parse_yaml, parse_model_kwargs


SEARCH_KEYS = {  # --config keys: the long flags of `autoprune search`, dashes or underscores
    "budget", "preset", "model", "model_kwargs", "pretrained", "checkpoint", "data", "space", "trials", "epochs",
    "seed", "study", "storage", "address", "gpus_per_trial", "cpus_per_trial", "concurrency", "screen",
    "screen_images", "halving", "early_stopping",
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
        if not valid(converted):
            raise refused
        options[name] = converted

    number("trials", int, lambda v: v >= 1, "a positive integer")
    number("concurrency", int, lambda v: v >= 1, "a positive integer")
    number("cpus_per_trial", int, lambda v: v >= 1, "a positive integer")
    number("gpus_per_trial", float, lambda v: v >= 0, "a number >= 0 (fractions share a GPU)")
    number("epochs", float, lambda v: v > 0, "a positive number (fractions allowed)")
    number("seed", int, lambda v: 0 <= v <= MAX_SEED, f"an integer from 0 to {MAX_SEED}")
    number("screen", int, lambda v: v >= 0, "an integer >= 0 (0: no screening)")
    number("screen_images", int, lambda v: v >= 1, "an integer >= 1")
    number("halving", int, lambda v: v == 0 or v >= 2, "0 (off) or an integer >= 2")
    if options["early_stopping"]:  # `early_stopping: false` in an older config file is harmless
        raise UsageError("--early-stopping: ASHA early stopping was replaced by successive halving with Pareto "
                         "promotion; accepted: --halving ETA (e.g. --halving 3)")
    if options["pretrained"] is not None and not isinstance(options["pretrained"], bool):
        raise UsageError(f"--config: pretrained: {options['pretrained']!r} is invalid; accepted: true or false")
    for name in ("budget", "preset", "model", "checkpoint", "data", "space", "study", "storage", "address"):
        value = options.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
            raise UsageError(f"--config: {name}: {value!r} is invalid; accepted: a single value (text)")
        if value is not None:
            options[name] = str(value)
    kwargs = options.get("model_kwargs")
    if kwargs is not None and not isinstance(kwargs, (str, dict)):
        raise UsageError(f"--config: model_kwargs: {kwargs!r} is invalid; accepted: a mapping or name=value,...")
    return options


def cmd_search(args: argparse.Namespace) -> None:
    import dataclasses

    import torch

    from ..search import SearchError, SearchSettings, search
    from ..trial import ModelSpec

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # autoprune prints its own progress
    options = _search_options(args)
    if options["pretrained"] and options["checkpoint"]:
        raise UsageError("--pretrained and --checkpoint exclude each other")
    gpus = options["gpus_per_trial"]
    if gpus is None:
        gpus = 1 if torch.cuda.is_available() else 0
    try:
        settings = SearchSettings.from_preset(options["preset"], budget=str(options["budget"]))
    except ValueError as error:
        raise UsageError(f"--preset: {error}") from None
    model = settings.model
    if options["model"] is not None and options["model"] != model.name:
        model = ModelSpec(options["model"], {}, "scratch")
    if options["model_kwargs"] is not None:
        kwargs = options["model_kwargs"]
        model = dataclasses.replace(model, kwargs=parse_model_kwargs(kwargs) if isinstance(kwargs, str) else dict(kwargs))
    if options["pretrained"]:
        model = dataclasses.replace(model, init="pretrained")
    if options["checkpoint"]:
        model = dataclasses.replace(model, init=str(options["checkpoint"]))
    recipe = settings.recipe
    if options["epochs"] is not None:
        recipe = dataclasses.replace(recipe, epochs=options["epochs"])
    changes = {key: options[key] for key in ("data", "space", "seed", "screen", "screen_images", "halving")
               if options[key] is not None}
    settings = dataclasses.replace(settings, model=model, recipe=recipe, device="cuda" if gpus > 0 else "cpu", **changes)
    screening = (f"screen {settings.screen} configs on {settings.screen_images} val images" if settings.screen
                 else "no screening")
    print(f"autoprune search: preset {options['preset']}, model {model.name} {model.kwargs or ''} ({model.init}), "
          f"data {settings.data}, space {settings.space}, budget {settings.budget}, trials {options['trials']}, "
          f"{recipe.epochs} epoch(s) per trial, seed {settings.seed}, device {settings.device}, {screening}, "
          f"successive halving {f'eta {settings.halving}' if settings.halving else 'off'}")
    try:
        result = search(settings, trials=options["trials"], study_name=options["study"], storage=options["storage"],
                        address=options["address"], cpus_per_trial=options["cpus_per_trial"], gpus_per_trial=gpus,
                        concurrency=options["concurrency"])
    except SearchError as error:
        raise UsageError(str(error)) from None
    # the report is the command's last step, not the search's: search() writes the study and
    # nothing else, so the service does not load the plotting stack and the report only reads
    from ..report import write_report

    print(f"report: {write_report(result.storage, result.study_name)}")


def register(commands) -> None:
    search = commands.add_parser(
        "search", help="search token-reduction configs within a FLOPs budget (Ray Tune + Optuna)",
        description="Search which reducer, layers and rates fit a FLOPs budget best. Trials run on Ray Tune "
                    "(a local instance, or a cluster with --address); an Optuna study keeps every trial, so "
                    "running the same command again resumes the search.")
    search.add_argument("--budget", help="FLOPs per image: 2.6GFLOPs, 2.6G, 2600MFLOPs, 2.6e9, or 56%% of dense (required)")
    search.add_argument("--config", help="YAML file of these options (flags given here override it), "
                                         "e.g. examples/quickstart.yaml")
    search.add_argument("--preset", help="model, data and recipes to start from: "
                        "deit_small (GPU) or quickstart (CPU) (default: deit_small)")
    search.add_argument("--model", help="timm ViT name (default: the preset's)")
    search.add_argument("--model-kwargs", help="timm create_model kwargs, e.g. img_size=64,patch_size=8")
    weights = search.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", default=None, help="start from timm's pretrained weights")
    weights.add_argument("--checkpoint", help="start from a local weights file")
    search.add_argument("--data", help="synthetic, imagefolder:PATH, cifar10:PATH or cifar100:PATH (default: synthetic)")
    search.add_argument("--space", help="search-space YAML file, or the name of one in search_spaces/ "
                        "(default, evit_tome, sait; default: default)")
    search.add_argument("--trials", type=int, help="fine-tunes to finish at full fidelity (default: 32); failed "
                        "ones count, trials stopped at a lower successive-halving rung and screens do not")
    search.add_argument("--epochs", type=float, help="fine-tuning epochs per trial, fractions allowed (default: the preset's)")
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
                             "only if in the best 1/ETA by Pareto rank (accuracy, FLOPs) of the trials there; "
                             "stopped ones end PRUNED and never reach the front; 0: off (default: 0)")
    search.add_argument("--early-stopping", action="store_true", default=None, help=argparse.SUPPRESS)
    search.set_defaults(run=cmd_search)
