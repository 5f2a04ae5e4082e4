"""`anondata` command line. Each subcommand lives in `anondata/commands/<name>.py` and
exposes `register(subparsers)`; the module's `run(args) -> int` does the work.

Errors a user can fix (`AnondataError`, and an `OSError` naming a path, such as an --out folder
under a file) print one line and exit 2; anything else is a bug and keeps its traceback. Ctrl-C
prints one line and exits 130, SIGTERM (kill, a scheduler or `timeout` stopping the command) one
line and 143."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from . import __version__
from .commands._args import ExamplesFormatter
from .errors import AnondataError, shown

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
        epilog="""examples: the workflow (README.md); `anondata COMMAND --help` explains each
  anondata keygen owner; anondata keygen runner
  anondata anonymize faces.parquet --out release --recipient owner.pub --signing-key runner.key
  anondata verify release --signer runner.pub
  anondata restore release --signer runner.pub --identity owner.key --ids rec-17 --out restored
""",
        formatter_class=ExamplesFormatter,
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C. Python's default for SIGTERM ends the
    process on the spot: no cleanup ran, so `restore` and `grant` left their hidden output folder
    (original faces) behind, and `anonymize` printed the C++ stack dump of Ray's signal handler and
    exited 15. As an exception it unwinds like Ctrl-C: half-written output is deleted, the job's
    private Ray instance is shut down."""


def _terminate(signum, frame):
    raise Terminated()


def _left(args) -> str:
    """What an interrupted command left on disk and what to do next (a command's `interrupted`
    default): "interrupted" alone did not say whether to resume, rerun or clean up."""
    hint = getattr(args, "interrupted", None)
    return f"; {hint}" if hint else ""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what was typed (anonymize --resume reads it)
    try:
        return int(args.run(args) or 0)
    except AnondataError as e:
        print(f"anondata {args.command}: error: {shown(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:  # not about a path the user named: a bug, keep the traceback
            raise
        where = f"{e.filename} -> {e.filename2}" if e.filename2 else e.filename
        print(f"anondata {args.command}: error: {shown(where)}: {e.strerror or e}; check the path (its folders must exist "
              "and be writable)", file=sys.stderr)
        return 2
    except Terminated:
        print(f"anondata {args.command}: terminated{_left(args)}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"anondata {args.command}: interrupted{_left(args)}", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
