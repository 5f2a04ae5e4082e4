"""argparse value types shared by the commands: a bad number is a one-line usage error."""

from __future__ import annotations

import argparse


class ExamplesFormatter(argparse.HelpFormatter):
    """Fills the description as usual but prints an epilog that starts with "examples:" as written:
    the default formatter would run the example lines together into one paragraph."""

    def _fill_text(self, text, width, indent):
        if text.startswith("examples:"):
            return text
        return super()._fill_text(text, width, indent)


def _int_at_least(lo: int, text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < lo:
        raise argparse.ArgumentTypeError(f"must be at least {lo}, not {v}")
    return v


def positive(text: str) -> int:
    """1, 2, 3, ..."""
    return _int_at_least(1, text)


def count(text: str) -> int:
    """0, 1, 2, ..."""
    return _int_at_least(0, text)


def number_list(convert, lo, hi, message: str):
    """A type for 'a,b,c': each converted with `convert` and within lo..hi, else `message`."""

    def parse(text: str) -> tuple:
        try:
            v = tuple(convert(x) for x in text.split(","))
        except ValueError:
            v = ()
        if not v or not all(lo <= x <= hi for x in v):
            raise argparse.ArgumentTypeError(message)
        return v

    return parse


def add_signer(p) -> None:
    """--signer / --any-signer for a command that acts on a release's keys or content. One of the
    two is required: envelopes are sealed with HPKE base mode (anyone can seal to a public key),
    so they are only as authentic as the manifest signature, which proves nothing unless the
    signing key is pinned."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--signer", metavar="NAME.pub",
                   help="the key that must have signed the release (e.g. the runner's .pub); required unless --any-signer")
    g.add_argument("--any-signer", action="store_true",
                   help="accept whichever key signed the manifest (proves only that nothing changed since it was "
                        "signed; for a release that never left your hands)")


def signer(args):
    """The pinned signer (a Recipient), or None with --any-signer after saying so on stderr."""
    import sys

    from ..errors import InputError
    from ..identity import load_recipient

    if args.signer:
        return load_recipient(args.signer)
    if not args.any_signer:
        raise InputError("pass --signer NAME.pub (the key that signed the release), or --any-signer to accept "
                         "whichever key signed it")
    print("warning: --any-signer: the release's signer is not checked", file=sys.stderr)
    return None
