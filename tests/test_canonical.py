"""Canonical JSON (RFC 8785 subset) and strict base64url: one byte string per value."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anondata.canonical import b64d, b64e, dumps, loads
from anondata.errors import FormatError


def test_rfc8785_key_order_is_utf16():
    # RFC 8785 section 3.2.3 sorting example: keys ordered by UTF-16 code units.
    value = {"\u20ac": "Euro Sign", "\r": "Carriage Return", "\ufb33": "Hebrew Letter Dalet With Dagesh",
             "1": "One", "\U0001f600": "Emoji: Grinning Face", "\u0080": "Control", "\u00f6": "Latin Small Letter O With Diaeresis"}
    keys = list(json.loads(dumps(value)))
    assert keys == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]


def test_escapes_match_jcs():
    assert dumps("\u0000\b\f\n\r\t\"\\/\u001f\u007f\u2028é") == '"\\u0000\\b\\f\\n\\r\\t\\"\\\\/\\u001f\u007f\u2028é"'.encode()
    assert dumps({"b": [1, True, None], "a": -5}) == b'{"a":-5,"b":[1,true,null]}'


@pytest.mark.parametrize(
    "text",
    [
        b'{"a": 1}',  # whitespace
        b'{"b":1,"a":2}',  # order
        b'{"a":1,"a":1}',  # duplicate
        b'{"a":1.0}',  # float
        b'{"a":1e3}',
        b'{"a":NaN}',
        b'{"a":-0}',
        b'"\\u0041"',  # needless escape
        b'"\\/"',
        b'"\\ud800"',  # lone surrogate
        b'{"\\ud800":1}',  # lone surrogate in a key (was a UnicodeEncodeError traceback)
        b'{"a":{"\\udfff":1}}',
        b'9007199254740992',  # outside I-JSON
        b'\xef\xbb\xbf{}',  # BOM
        b'\xff',
        b'',
        b'[' * 100000,
        b'{"a":1}\n',
    ],
)
def test_loads_rejects_non_canonical(text):
    with pytest.raises(FormatError):
        loads(text)


def test_errors_from_the_reencoding_name_the_document():
    # A lone surrogate in a key raised UnicodeEncodeError (a traceback from the CLI); the value
    # checks run while re-encoding and did not say which document they were about.
    for text in (b'{"\\ud800":1}', b'{"a":"\\udc00"}', b'{"a":9007199254740992}'):
        with pytest.raises(FormatError, match=r"^grant\.json: \$"):
            loads(text, "grant.json")


def test_integer_past_pythons_digit_limit_is_a_format_error():
    for text in (b"1" * 5000, b'{"a":-' + b"9" * 5000 + b"}"):
        with pytest.raises(FormatError, match="too many digits"):
            loads(text, "doc")


def test_dumps_rejects_unencodable():
    for bad in (1.5, {"a": float("nan")}, {1: "x"}, "\ud800", {"\ud800": 1}, 2**60, b"bytes", object()):
        with pytest.raises(FormatError):
            dumps(bad)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_roundtrip(value):
    data = dumps(value)
    assert loads(data) == value
    assert dumps(json.loads(data)) == data  # any JSON parser reads the same value


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_loads_fuzz_only_formaterror(data):
    try:
        value = loads(data)
    except FormatError:
        return
    assert dumps(value) == data


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_b64_roundtrip(raw):
    text = b64e(raw)
    assert "=" not in text and b64d(text) == raw


@pytest.mark.parametrize("text", ["QQ==", "QR", "Q", "Q Q", "QQ\n", "+w", "/w", "QQ!", "é", 5, None])
def test_b64d_strict(text):
    with pytest.raises(FormatError):
        b64d(text)


@pytest.mark.parametrize("doc", [
    b'{"a":1.' + b"0" * 100_000 + b"}",  # a float: its text was echoed whole
    b'{"' + b"k" * 100_000 + b'":1,"' + b"k" * 100_000 + b'":1}',  # a duplicate key, likewise
])
def test_errors_quote_a_bounded_part_of_the_input(doc):
    """A rejection is one terminal line: it quotes enough of the offending value to find it,
    not a megabyte of it (the CLI prints the message whole, before any signature is checked)."""
    with pytest.raises(FormatError) as e:
        loads(doc, "manifest.json")
    assert str(e.value).startswith("manifest.json: ") and len(str(e.value)) < 200, str(e.value)[:300]
