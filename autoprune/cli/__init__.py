"""`autoprune` command line: a thin layer over the Python API. Bad input exits with code 2 and
one line saying what was wrong and what is accepted."""

from __future__ import annotations

import argparse
import sys

from .. import dashboard
from . import bench, calibrate, search, studies
from .parsing import UsageError, load_configs, parse_model_kwargs

__all__ = ["UsageError", "build_parser", "load_configs", "main", "parse_model_kwargs"]


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per `register`: a new command is a module with `register(commands)` and one
    line here."""
    parser = argparse.ArgumentParser(prog="autoprune", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (bench, calibrate, search, studies, dashboard):
        module.register(commands)
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
    if getattr(args, "check", None) is not None:  # checks argparse cannot express; exit 2 like its own
        args.check(parser, args)
    try:
        args.run(args)
    except UsageError as error:
        print(f"autoprune: {error}", file=sys.stderr)
        return 2
    return 0
