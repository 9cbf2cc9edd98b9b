"""The `longvu` command line.

Each subcommand lives in its own module, listed by dotted name in `SUBCOMMAND_MODULES`. Such a
module defines

    def add_parser(subparsers: argparse._SubParsersAction) -> None:
        parser = subparsers.add_parser("NAME", help="one line for `longvu --help`")
        ...                                   # its arguments
        parser.set_defaults(func=run)         # run(args: argparse.Namespace) -> int | None

and keeps heavy imports (torch, transformers, deepspeed) inside `run`, so `longvu --help` stays
fast. Modules are imported when the parser is built, not when this module is imported; a module
that fails to import is an error, never silently skipped. To add a subcommand, write its module
and append its name here (planned: data, train, export, generate, quickstart).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib import metadata

DISTRIBUTION = "longvu-train"

SUBCOMMAND_MODULES: list[str] = ["data.cli", "train.launch", "train.quickstart", "train.export", "train.generate",
                                   "train.evaluation.cli"]

# Distributions whose versions `longvu version` reports (read from metadata, nothing imported).
_REPORTED_DEPENDENCIES = ("torch", "transformers", "deepspeed", "peft", "decord", "av", "datasets")


def _installed_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _run_version(args: argparse.Namespace) -> int:
    print(f"{DISTRIBUTION} {_installed_version(DISTRIBUTION)}")
    if args.all:
        print(f"python {sys.version.split()[0]}")
        for name in _REPORTED_DEPENDENCIES:
            print(f"{name} {_installed_version(name)}")
    return 0


def _add_version_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("version", help="print the installed version")
    parser.add_argument("--all", action="store_true", help="also print Python's and the main dependencies' versions")
    parser.set_defaults(func=_run_version)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`--help` shows every option's default: appended as "(default: X)" unless the help text already
    says what happens by default (options whose default is None or off); epilogs keep their layout."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or action.required:
            return text
        return super()._get_help_string(action)


def subcommand_parsers(parser: argparse.ArgumentParser, prefix: str = "longvu") -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser by its command line ("longvu data build", ...), nested ones included."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[f"{prefix} {name}"] = sub
                found.update(subcommand_parsers(sub, f"{prefix} {name}"))
    return found


def build_parser(modules: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The top-level parser with one subparser per module in `modules` (default: the registry); every
    subcommand's `--help` shows the defaults (HelpFormatter)."""
    parser = argparse.ArgumentParser(
        prog="longvu",
        description="LongVU training stack: data preparation, training, export and generation.",
    )
    # the DeepSpeed launcher inserts --local_rank=N before the subcommand; the rank comes from the env
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES if modules is None else modules:
        module = importlib.import_module(name)
        module.add_parser(subparsers)
    _add_version_parser(subparsers)
    for sub in subcommand_parsers(parser).values():
        sub.formatter_class = HelpFormatter
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `longvu` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    result = args.func(args)
    return 0 if result is None else int(result)


if __name__ == "__main__":
    sys.exit(main())
