"""Errors a user can act on. The CLI prints `error: <message>` and exits 2 for these;
anything else is a bug and keeps its traceback."""


class AnondataError(Exception):
    """Base class: the message names what failed and, where there is one, the fix."""


class InputError(AnondataError):
    """Bad input from the user: an image, a tensor, an argument, a path."""


class FormatError(AnondataError):
    """A file or encoding that is not exactly what the format spec allows (docs/FORMAT.md)."""


class IntegrityError(AnondataError):
    """A signature, hash or AEAD tag did not verify: the data was changed or is not ours."""


class LosslessMismatch(IntegrityError):
    """Lossless restore did not reproduce the original's hash (core crop or photo): another device
    or library version than the one that anonymized it. Restore's way out is --key-only."""


class KeyError_(AnondataError):
    """A key file that cannot be used: wrong kind, unreadable, wrong recipient."""


class SetupError(InputError):
    """The installation cannot do the job at all (a face detector or model that cannot be loaded):
    stops the job before any record is processed, never quarantines records one by one."""


def shown(text) -> str:
    """`text` fit for a terminal line: control characters (ESC sequences can rewrite the screen or
    the window title) and bidirectional overrides (which reorder what is read) escaped as \\xNN /
    \\uNNNN. Messages carry names taken from the data (file names in an image folder, column
    names), which the person running the command did not choose."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in str(text))
