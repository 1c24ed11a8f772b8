"""The `natjax` console script: one entry point, one subcommand per feature module.

Each module listed in `_COMMAND_MODULES` exposes `register(subparsers)`, which adds its
subcommands and sets `func` on them; `func(args) -> int` is the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

_COMMAND_MODULES = (
    "natjax.demo",
    "natjax.convert.cli",
    "natjax.predict",
    "natjax.train.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="natjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _flag_names(parser: argparse.ArgumentParser, command: str) -> dict[str, str]:
    """`python_keyword -> --flag` for the long options of subcommand `command`."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[
        command
    ]
    return {
        opt[2:].replace("-", "_"): opt
        for action in sub._actions
        for opt in action.option_strings
        if opt.startswith("--")
    }


def cli_message(message: str, flags: dict[str, str]) -> str:
    """`message` with the library's keyword arguments (`config=`) named as the CLI's flags.

    The library raises errors that name its Python keywords; on the command line the same
    setting is a flag. Dotted config keys (`run.init_from=...`, set with `--set`) stay.
    """

    def flag(match: re.Match) -> str:
        return f"{flags[match.group(1)]} " if match.group(1) in flags else match.group(0)

    return re.sub(r"(?<![\w.\-])([a-z][a-z0-9_]*)=(?!=) ?", flag, message)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as err:
        # User errors (bad paths, formats, configs) get one clear line, not a traceback.
        text = cli_message(str(err), _flag_names(parser, args.command))
        print(f"natjax {args.command}: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C outside `natjax train`'s own handling (imports, predict, convert, ...).
        print(f"natjax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
