"""argparse value types shared by the commands: a bad number is a one-line usage error."""

from __future__ import annotations

import argparse


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
