"""`autoprune` command line: a thin layer over the Python API. Bad input exits with code 2 and
one line saying what was wrong and what is accepted."""

from __future__ import annotations

import argparse
import sys

from .. import dashboard
from . import bench, search, studies
from .parsing import UsageError, load_configs, parse_model_kwargs

__all__ = ["UsageError", "build_parser", "load_configs", "main", "parse_model_kwargs"]


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per `register`: a new command is a module with `register(commands)` and one
    line here."""
    parser = argparse.ArgumentParser(prog="autoprune", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (bench, search, studies, dashboard):
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "check", None) is not None:  # checks argparse cannot express; exit 2 like its own
        args.check(parser, args)
    try:
        args.run(args)
    except UsageError as error:
        print(f"autoprune: {error}", file=sys.stderr)
        return 2
    return 0
