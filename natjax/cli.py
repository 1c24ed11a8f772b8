"""The `natjax` console script: one entry point, one subcommand per feature module.

Each module listed in `_COMMAND_MODULES` exposes `register(subparsers)`, which adds its
subcommands and sets `func` on them; `func(args) -> int` is the exit status.
"""

from __future__ import annotations

import argparse
import importlib
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as err:
        # User errors (bad paths, formats, configs) get one clear line, not a traceback.
        print(f"natjax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
