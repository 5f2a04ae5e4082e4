"""Canonical JSON: RFC 8785 (JCS) restricted to a float-free subset.

Why: signatures and strict parsing need one byte string per value. Floats are the
hard part of JCS and nothing in our formats needs them, so they are rejected outright.
Bytes travel as unpadded base64url strings (see `b64e`/`b64d`).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from .errors import FormatError


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"{path}: string is not valid Unicode (lone surrogate)") from None


def _check(value: Any, path: str = "$") -> None:
    if value is None or isinstance(value, (bool, str)):
        if isinstance(value, str):
            _check_text(value, path)
        return
    if isinstance(value, int):
        if not -(2**53) + 1 <= value <= 2**53 - 1:
            raise FormatError(f"{path}: integer {value} is outside the I-JSON range")
        return
    if isinstance(value, float):
        raise FormatError(f"{path}: floats are not allowed in canonical JSON")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise FormatError(f"{path}: object key {k!r} is not a string")
            _check_text(k, f"{path} (a key)")  # keys too: sorting encodes them as UTF-16
            _check(v, f"{path}.{k}")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check(v, f"{path}[{i}]")
        return
    raise FormatError(f"{path}: {type(value).__name__} cannot be encoded as JSON")


def _sorted(value: Any) -> Any:
    # JCS sorts object keys by their UTF-16 code units, not by code points.
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value, key=lambda s: s.encode("utf-16-be"))}
    if isinstance(value, (list, tuple)):
        return [_sorted(v) for v in value]
    return value


def dumps(value: Any) -> bytes:
    """The canonical UTF-8 bytes of `value`."""
    _check(value)
    return json.dumps(
        _sorted(value), ensure_ascii=False, separators=(",", ":"), allow_nan=False
    ).encode("utf-8")


def _reject_duplicates(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise FormatError(f"duplicate object key {k!r:.60}")
        obj[k] = v
    return obj


def _reject_float(text: str):
    raise FormatError(f"number {text:.40} is not an integer: floats are not allowed")


def loads(data: bytes, what: str = "document") -> Any:
    """Parse `data` and require that it is already canonical: re-encoding must give the
    same bytes. Anything else (whitespace, key order, escapes, duplicates) is rejected."""
    if not isinstance(data, (bytes, bytearray)):
        raise FormatError(f"{what}: expected bytes")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{what}: not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        value = json.loads(
            text,
            object_pairs_hook=_reject_duplicates,
            parse_float=_reject_float,
            parse_constant=_reject_float,
        )
    except json.JSONDecodeError as e:
        raise FormatError(f"{what}: not JSON ({e.msg} at char {e.pos})") from None
    except FormatError as e:  # from the hooks (a duplicate key, a float): name the document
        raise FormatError(f"{what}: {e}") from None
    except ValueError:  # int() refuses more than sys.get_int_max_str_digits() digits
        raise FormatError(f"{what}: an integer has too many digits (outside the I-JSON range)") from None
    except RecursionError:
        raise FormatError(f"{what}: nested too deeply") from None
    try:
        again = dumps(value)
    except RecursionError:
        raise FormatError(f"{what}: nested too deeply") from None
    except FormatError as e:  # a lone surrogate, an integer out of range: name the document
        raise FormatError(f"{what}: {e}") from None
    if again != bytes(data):
        raise FormatError(f"{what}: not canonical JSON (RFC 8785), the one form anondata writes: the file was edited "
                          "or written by another tool (spaces, key order, line endings); use the file as anondata "
                          "wrote it, or re-encode it with anondata.canonical.dumps")
    return value


def b64e(data: bytes) -> str:
    """Unpadded base64url."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: str, what: str = "field") -> bytes:
    """Strict inverse of `b64e`: no padding, no whitespace, canonical trailing bits."""
    if not isinstance(text, str):
        raise FormatError(f"{what}: expected a base64url string")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise FormatError(f"{what}: not base64url") from None
    if b64e(raw) != text:
        raise FormatError(f"{what}: not canonical unpadded base64url")
    return raw
