"""`anondata` command line. Each subcommand lives in `anondata/commands/<name>.py` and
exposes `register(subparsers)`; the module's `run(args) -> int` does the work.

Errors a user can fix (`AnondataError`, and an `OSError` naming a path, such as an --out folder
under a file) print one line and exit 2; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import AnondataError

# Order shown in --help: the owner's workflow first.
COMMANDS = [
    "demo",
    "keygen",
    "anonymize",
    "verify",
    "restore",
    "grant",
    "rewrap",
    "publish",
    "eval",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anondata",
        description=(
            "Reversible face anonymization of datasets. Faces are inverted to diffusion noise, "
            "the face-region noise signs are flipped with a per-record 256-bit key, and a "
            "stranger is generated. Keys are sealed to the owner (HPKE); the release is signed."
        ),
    )
    parser.add_argument("--version", action="version", version=f"anondata {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"anondata.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"anondata.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except AnondataError as e:
        print(f"anondata {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:  # not about a path the user named: a bug, keep the traceback
            raise
        where = f"{e.filename} -> {e.filename2}" if e.filename2 else e.filename
        print(f"anondata {args.command}: error: {where}: {e.strerror or e}; check the path (its folders must exist "
              "and be writable)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"anondata {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
