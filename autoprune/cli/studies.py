"""Commands that read studies: `studies`, `show`, `export` and `report`."""

from __future__ import annotations

import argparse
import sys

from ..study_attrs import DEFAULT_STORAGE
from .parsing import UsageError


def cmd_studies(args: argparse.Namespace) -> None:
    from ..storage import StorageError, shown_url
    from ..study import study_rows

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
    from ..storage import StorageError
    from ..study import StudyNotFound, load_study

    try:
        return load_study(args.storage, args.study)
    except (StudyNotFound, StorageError) as error:
        raise UsageError(str(error)) from None


def cmd_show(args: argparse.Namespace) -> None:
    from ..search.summary import format_front
    from ..study import pareto_front
    from ..study_attrs import DENSE_ATTR

    study = _study(args)
    front = pareto_front(study)
    if not study.trials:
        raise UsageError(f"study {args.study!r} has no trials yet")
    dense = study.user_attrs.get(DENSE_ATTR)
    if dense is None:
        raise UsageError(f"study {args.study!r} was not made by autoprune search (no dense baseline recorded)")
    print(format_front(front, dense))


def cmd_export(args: argparse.Namespace) -> None:
    from ..export import ExportError, export_trial, pick_trial
    from ..onnx_export import OnnxExportError, export_trial_onnx
    from ..study import pareto_front

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
        if args.format == "onnx":
            print(f"exporting trial {trial.number} to ONNX and checking it in onnxruntime...", file=sys.stderr)
            out = export_trial_onnx(study, trial, args.out, force=args.force)
        else:
            out = export_trial(study, trial, args.out, force=args.force)
    except OnnxExportError as error:
        raise UsageError(f"--format onnx: {error}") from None
    except ExportError as error:
        raise UsageError(str(error)) from None
    run = (f"run {out / 'model.onnx'} with onnxruntime (inputs and preprocessing in {out / 'autoprune.json'})"
           if args.format == "onnx" else f"load it with autoprune.load({str(out)!r})")
    print(f"exported trial {trial.number} ({trial.values[0]:.2f}% top-1, {trial.values[1]:.0f} img/s) to {out}; {run}")


def cmd_report(args: argparse.Namespace) -> None:
    from ..report import write_report

    study = _study(args)
    if not study.get_trials(deepcopy=False):
        raise UsageError(f"study {args.study!r} has no trials yet: nothing to report")
    try:
        path = write_report(args.storage, args.study, out_dir=args.out)
    except OSError as error:
        raise UsageError(f"--out: cannot write the report ({error})") from None
    print(path)


def register(commands) -> None:
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
    export.add_argument("--format", default="pytorch", choices=("pytorch", "onnx"),
                        help="pytorch: weights.pt for autoprune.load; onnx: one model.onnx (dynamic batch), "
                             "checked in onnxruntime (default: %(default)s)")
    export.set_defaults(run=cmd_export)

    report = commands.add_parser("report", help="write a study's report: plots, front, maps (HTML, Markdown, CSV)")
    report.add_argument("--study", required=True)
    report.add_argument("--storage", default=DEFAULT_STORAGE, help=storage_help)
    report.add_argument("--out", help="folder to write report.html, report.md, trials.csv and pareto.csv "
                                      "(default: studies/STUDY/)")
    report.set_defaults(run=cmd_report)
