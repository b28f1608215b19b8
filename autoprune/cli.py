"""`autoprune` command line: a thin layer over the Python API. Bad input exits with code 2 and
one line saying what was wrong and what is accepted."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from .cli_calibrate import register as register_calibrate
from .config import ConfigError, PruneConfig
from .study_attrs import DEFAULT_STORAGE
from .train import MAX_SEED

DEFAULT_BENCH_CONFIGS = {  # the papers' DeiT-S settings, one per reducer
    "evit 0.7": PruneConfig(reducer="evit", layers=(3, 6, 9), keep_rate=0.7),
    "tome r13": PruneConfig(reducer="tome", r=13),
    "ppt r50": PruneConfig(reducer="ppt", layers=(3, 6, 9), r=50),
    "tps 0.7": PruneConfig(reducer="tps", layers=(3, 6, 9), keep_rate=0.7),
    "bat 0.7": PruneConfig(reducer="bat", layers=(3, 6, 9), keep_rate=0.7, clusters=8, knn=5, pairs=8),
    "sait M0.7": PruneConfig(reducer="sait", layers=(3,), mass_threshold=0.7),
}


class UsageError(Exception):
    """Bad input on the command line: reported in one line, exit code 2."""


def parse_model_kwargs(text: str | None) -> dict:
    """'img_size=64,patch_size=8,qk_norm=true' -> {'img_size': 64, 'patch_size': 8, 'qk_norm': True}."""
    kwargs = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--model-kwargs: {item!r} is not KEY=VALUE (e.g. img_size=64,patch_size=8)")
        kwargs[key.strip()] = yaml.safe_load(value)
    return kwargs


def load_configs(specs: list[str]) -> dict[str, PruneConfig]:
    """Named configs from inline JSON objects or YAML/JSON files (one config, or name -> config)."""
    configs: dict[str, PruneConfig] = {}
    for spec in specs:
        if spec.lstrip().startswith("{"):
            data, origin = _parse(spec, "inline --config"), None
        else:
            path = Path(spec)
            if not path.is_file():
                raise UsageError(f"--config: {spec!r} is neither a file nor an inline JSON object")
            data, origin = _parse(path.read_text(), spec), spec
        entries = {None: data} if isinstance(data, dict) and "reducer" in data else data
        if not isinstance(entries, dict):
            raise UsageError(f"--config {origin or spec!r}: expected a config or a mapping name -> config")
        for name, entry in entries.items():
            try:
                cfg = PruneConfig.from_dict(entry)
            except ConfigError as error:
                where = f"{origin}: {name}: " if origin and name else f"{origin}: " if origin else ""
                raise UsageError(f"--config {where}{error}") from None
            configs[str(name) if name is not None else cfg.describe()] = cfg
    return configs


def _parse(text: str, origin: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UsageError(f"--config {origin}: not valid YAML/JSON ({str(error).splitlines()[0]})") from None


def _create_model(name: str, kwargs: dict):
    from .trial import ModelError, create_unweighted

    try:
        return create_unweighted(name, kwargs)
    except ModelError as error:
        raise UsageError(str(error)) from None


def cmd_bench(args: argparse.Namespace) -> None:
    import torch

    from .bench import benchmark, format_table

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device: {args.device!r} but no CUDA device is available (use cpu)")
    configs = load_configs(args.config) if args.config else DEFAULT_BENCH_CONFIGS
    model = _create_model(args.model, parse_model_kwargs(args.model_kwargs))
    try:
        rows = benchmark(model, configs, batch_size=args.batch_size, rounds=args.rounds,
                         warmup=args.warmup, device=args.device, floor=not args.no_floor)
    except ConfigError as error:
        raise UsageError(str(error)) from None
    header = (f"model {' '.join(filter(None, (args.model, args.model_kwargs)))} | device {args.device} "
              f"({'bf16 autocast' if args.device.startswith('cuda') else 'fp32'}, "
              f"{torch.get_num_threads()} threads) | batch {args.batch_size} | fused attention | "
              f"no torch.compile | median of {args.rounds} interleaved rounds")
    table = format_table(rows)
    print(header, table, sep="\n\n")
    if args.out:
        Path(args.out).write_text(header + "\n\n" + table + "\n")
    if args.json:
        print(json.dumps([{**row.__dict__, "config": row.config.to_dict() if row.config else None}
                          for row in rows]))


SEARCH_KEYS = {  # --config keys: the long flags of `autoprune search`, dashes or underscores
    "budget", "preset", "model", "model_kwargs", "pretrained", "checkpoint", "data", "space", "trials", "epochs",
    "seed", "study", "storage", "address", "gpus_per_trial", "cpus_per_trial", "concurrency", "early_stopping",
}


def _search_options(args: argparse.Namespace) -> dict:
    """Options from --config (a YAML file) overridden by the flags given on the command line."""
    options = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"--config: {args.config!r} is not a file (a YAML mapping of search options)")
        data = _parse(path.read_text(), args.config) or {}
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
    for name in ("pretrained", "early_stopping"):
        if options[name] is not None and not isinstance(options[name], bool):
            raise UsageError(f"--config: {name}: {options[name]!r} is invalid; accepted: true or false")
    for name in ("budget", "preset", "model", "checkpoint", "data", "space", "study", "storage", "address"):
        value = options.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
            raise UsageError(f"--config: {name}: {value!r} is invalid; accepted: a single value (text)")
        if value is not None:
            options[name] = str(value)
    if options["budget"] is not None:
        from .search.budget import BudgetError, parse_budget

        try:
            parse_budget(options["budget"])
        except BudgetError as error:
            raise UsageError(str(error)) from None
    kwargs = options.get("model_kwargs")
    if kwargs is not None and not isinstance(kwargs, (str, dict)):
        raise UsageError(f"--config: model_kwargs: {kwargs!r} is invalid; accepted: a mapping or name=value,...")
    return options


def cmd_search(args: argparse.Namespace) -> None:
    import dataclasses

    import torch

    from .search import SearchError, SearchSettings, search
    from .trial import ModelSpec

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
    changes = {key: options[key] for key in ("data", "space", "seed") if options[key] is not None}
    settings = dataclasses.replace(settings, model=model, recipe=recipe, device="cuda" if gpus > 0 else "cpu",
                                   early_stopping=bool(options["early_stopping"]), **changes)
    print(f"autoprune search: preset {options['preset']}, model {model.name} {model.kwargs or ''} ({model.init}), "
          f"data {settings.data}, space {settings.space}, budget {settings.budget}, trials {options['trials']}, "
          f"{recipe.epochs} epoch(s) per trial, seed {settings.seed}, device {settings.device}, "
          f"early stopping {'on' if settings.early_stopping else 'off'}")
    try:
        search(settings, trials=options["trials"], study_name=options["study"], storage=options["storage"],
               address=options["address"], cpus_per_trial=options["cpus_per_trial"], gpus_per_trial=gpus,
               concurrency=options["concurrency"])
    except SearchError as error:
        raise UsageError(str(error)) from None


def cmd_studies(args: argparse.Namespace) -> None:
    from .search.results import study_rows
    from .search.storage import StorageError, shown_url

    try:
        rows = study_rows(args.storage)
    except StorageError as error:
        raise UsageError(str(error)) from None
    if not rows:
        print(f"no studies in {shown_url(args.storage)}")
        return
    print(f"{'study':<28} {'model':<24} {'budget':>9} {'data':<14} {'finished':>8} {'trials':>6}  best within budget")
    for row in rows:
        print(f"{row['study']:<28} {row['model']:<24} {row['budget']:>9} {row['data'][:14]:<14} "
              f"{row['finished']:>8} {row['trials']:>6}  {row['best']}")


def _study(args: argparse.Namespace):
    from .search.results import StudyNotFound, load_study
    from .search.storage import StorageError

    try:
        return load_study(args.storage, args.study)
    except (StudyNotFound, StorageError) as error:
        raise UsageError(str(error)) from None


def cmd_show(args: argparse.Namespace) -> None:
    from .study_attrs import DENSE_ATTR
    from .search.runner import format_front, pareto_front

    study = _study(args)
    front = pareto_front(study)
    if not study.trials:
        raise UsageError(f"study {args.study!r} has no trials yet")
    dense = study.user_attrs.get(DENSE_ATTR)
    if dense is None:
        raise UsageError(f"study {args.study!r} was not made by autoprune search (no dense baseline recorded)")
    print(format_front(front, dense))


def cmd_export(args: argparse.Namespace) -> None:
    from .export import ExportError, export_trial, pick_trial
    from .search.runner import pareto_front

    study = _study(args)
    try:
        if args.trial is not None:
            if not 0 <= args.trial < len(study.trials):
                known = f"trials 0..{len(study.trials) - 1}" if study.trials else "no trials yet"
                raise UsageError(f"--trial: {args.trial} is not a trial of {args.study!r} ({known})")
            trial = study.trials[args.trial]
        else:
            front = pareto_front(study)
            if not front:
                state = "has no trials" if not study.trials else "has no complete trial within budget"
                raise UsageError(f"study {args.study!r} {state}: nothing to export")
            trial = pick_trial(front, args.pick)
        out = export_trial(study, trial, args.out, force=args.force)
    except ExportError as error:
        raise UsageError(str(error)) from None
    print(f"exported trial {trial.number} ({trial.values[0]:.2f}% top-1, {trial.values[1]:.0f} img/s) to {out}; "
          f"load it with autoprune.load({str(out)!r})")



def cmd_report(args: argparse.Namespace) -> None:
    from .report import write_report

    study = _study(args)
    if not study.get_trials(deepcopy=False):
        raise UsageError(f"study {args.study!r} has no trials yet: nothing to report")
    try:
        path = write_report(args.storage, args.study, out_dir=args.out)
    except OSError as error:
        raise UsageError(f"--out: cannot write the report ({error})") from None
    print(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoprune", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser(
        "bench", help="time dense vs token-reduced models, interleaved in one process",
        description="Time a timm ViT dense and reduced by each config (random weights and images), "
                    "interleaved, and print img/s, speedup and the ideal speedup (FLOPs ratio).")
    bench.add_argument("--model", default="deit_small_patch16_224", help="timm model name (default: %(default)s)")
    bench.add_argument("--model-kwargs", help="timm create_model kwargs, e.g. img_size=64,patch_size=8")
    bench.add_argument("--config", action="append",
                       help="inline JSON config, or a YAML/JSON file with one config or name -> config; "
                            "repeatable (default: the papers' DeiT-S setting of each reducer)")
    bench.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    bench.add_argument("--rounds", type=int, default=7, help="timed rounds, median reported (default: %(default)s)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed passes per model (default: %(default)s)")
    bench.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    bench.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    bench.add_argument("--out", help="also write the table (Markdown) to this file")
    bench.add_argument("--json", action="store_true", help="also print the rows as JSON")
    bench.add_argument("--no-floor", action="store_true",
                       help="leave out each config's slicing floor (its token schedule by plain slicing)")
    bench.set_defaults(run=cmd_bench)
    register_calibrate(commands)

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
    search.add_argument("--trials", type=int, help="finished trials to reach (default: 32)")
    search.add_argument("--epochs", type=float, help="fine-tuning epochs per trial, fractions allowed (default: the preset's)")
    search.add_argument("--seed", type=int, help="seed of the sampler and of training (default: 0)")
    search.add_argument("--study", help="study name (default: MODEL-BUDGET)")
    search.add_argument("--storage", help=f"Optuna storage, any SQLAlchemy URL (default: {DEFAULT_STORAGE})")
    search.add_argument("--address", help="join this Ray cluster (default: start a local Ray)")
    search.add_argument("--gpus-per-trial", type=float, help="default: 1 when CUDA is available, else 0")
    search.add_argument("--cpus-per-trial", type=int, help="default: all CPUs / concurrency")
    search.add_argument("--concurrency", type=int, help="trials at once (default: 1; "
                        "throughput is only meaningful when a trial has its device to itself)")
    search.add_argument("--early-stopping", action="store_true", default=None,
                        help="stop poor trials early (ASHA on accuracy); they end PRUNED")
    search.set_defaults(run=cmd_search)

    storage_help = "Optuna storage URL (default: %(default)s)"
    studies = commands.add_parser("studies", help="list the studies in a storage")
    studies.add_argument("--storage", default=DEFAULT_STORAGE, help=storage_help)
    studies.set_defaults(run=cmd_studies)

    show = commands.add_parser("show", help="print a study's Pareto front")
    show.add_argument("--study", required=True)
    show.add_argument("--storage", default=DEFAULT_STORAGE, help=storage_help)
    show.set_defaults(run=cmd_show)

    export = commands.add_parser("export", help="save a trial's fine-tuned reduced model for autoprune.load")
    export.add_argument("--study", required=True)
    export.add_argument("--storage", default=DEFAULT_STORAGE, help=storage_help)
    chosen = export.add_mutually_exclusive_group()
    chosen.add_argument("--trial", type=int, help="trial number")
    chosen.add_argument("--pick", default="balanced", choices=("accuracy", "speed", "balanced"),
                        help="choose on the front: most accurate, fastest within 1 point of it, or the knee "
                             "(default: %(default)s)")
    export.add_argument("--out", required=True, help="folder to write (refused if it exists, unless --force)")
    export.add_argument("--force", action="store_true", help="overwrite --out")
    export.set_defaults(run=cmd_export)

    report = commands.add_parser("report", help="write a study's report: plots, front, maps (HTML, Markdown, CSV)")
    report.add_argument("--study", required=True)
    report.add_argument("--storage", default=DEFAULT_STORAGE, help=storage_help)
    report.add_argument("--out", help="folder to write report.html, report.md, trials.csv and pareto.csv "
                                      "(default: studies/STUDY/)")
    report.set_defaults(run=cmd_report)
    return parser


DASH_VALUE_FLAGS = ("--budget",)  # values that may begin with '-' (a negative budget is refused by its parser)


def _attach_dash_values(argv: list[str]) -> list[str]:
    """`--budget -1G` -> `--budget=-1G`: argparse would take -1G for an option and print its usage;
    attached, the value reaches the budget parser, whose one line names what is wrong."""
    out: list[str] = []
    for item in argv:
        if out and out[-1] in DASH_VALUE_FLAGS and item.startswith("-") and not item.startswith("--"):
            out[-1] = f"{out[-1]}={item}"
        else:
            out.append(item)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_attach_dash_values(sys.argv[1:] if argv is None else list(argv)))
    for name in ("batch_size", "rounds", "warmup", "threads"):  # bench's; search checks its own after merging --config
        value = getattr(args, name, None)
        if value is not None and value < (0 if name == "warmup" else 1):
            accepted = "an integer >= 0" if name == "warmup" else "a positive integer"
            parser.exit(2, f"autoprune: --{name.replace('_', '-')}: {value} is invalid; accepted: {accepted}\n")
    try:
        args.run(args)
    except UsageError as error:
        print(f"autoprune: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
