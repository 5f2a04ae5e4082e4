"""Envelopes: seal/open, binding to dataset and record, tamper detection, strict table parsing."""

from __future__ import annotations

import io
import json
import os
import random
import re
import secrets
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anondata import canonical
from anondata.envelope import (
    check_dataset_id,
    check_record_id,
    decode_payload,
    encode_payload,
    envelope_table_bytes,
    grant_records,
    open_records,
    read_envelope_table,
    rewrap_table,
    seal_records,
    write_envelope_table,
)
from anondata.errors import AnondataError, FormatError, IntegrityError, KeyError_
from anondata.identity import Identity, generate_identity, load_recipient

VECTORS = Path(__file__).parent / "vectors"
DID = "00112233445566778899aabbccddeeff"
DID2 = "ffeeddccbbaa99887766554433221100"


@pytest.fixture(scope="module")
def people():
    return {"a": generate_identity(name="a"), "b": generate_identity(pq=True, name="b"), "c": generate_identity(name="c")}


def items(n, big=False):
    return [(f"rec-{i}", secrets.token_bytes(32), os.urandom(5000 if big else 40 + i)) for i in range(n)]


def vector_identity(name) -> Identity:
    return Identity.from_bytes((VECTORS / f"{name}.key").read_bytes())


def test_roundtrip_two_recipients(people):
    its = items(5, big=True)
    t = seal_records([people["a"].recipient, people["b"].recipient], DID, its)
    assert t.num_rows == 5
    expect = {rid: (k, rr) for rid, k, rr in its}
    assert open_records([t], people["a"], DID) == expect
    assert open_records([t], people["b"], DID, ids=["rec-3"]) == {"rec-3": expect["rec-3"]}
    # the payload is stored once, not once per recipient
    assert all(len(p) == 1 + 32 + len(expect[r][1]) + 16 for r, p in zip(t["record_id"].to_pylist(), t["payload"].to_pylist()))


def test_file_roundtrip_atomic(tmp_path, people):
    t = seal_records([people["a"].recipient], DID, items(3))
    write_envelope_table(tmp_path / "k" / "x.keys.parquet", t)
    assert os.listdir(tmp_path / "k") == ["x.keys.parquet"]
    assert oct(os.stat(tmp_path / "k" / "x.keys.parquet").st_mode & 0o777) == "0o600"
    t2 = read_envelope_table(tmp_path / "k" / "x.keys.parquet")
    assert open_records([t2], people["a"], DID) == open_records([t], people["a"], DID)


def test_wrong_recipient(people):
    t = seal_records([people["a"].recipient], DID, items(2))
    with pytest.raises(KeyError_, match="no envelopes"):
        open_records([t], people["c"], DID)
    with pytest.raises(KeyError_, match="rec-1"):
        open_records([t], people["c"], DID, ids=["rec-1"])
    with pytest.raises(KeyError_, match="'nope'"):
        open_records([t], people["a"], DID, ids=["rec-0", "nope"])


def test_wrong_dataset(people):
    t = seal_records([people["a"].recipient], DID, items(2))
    with pytest.raises(IntegrityError, match="dataset"):
        open_records([t], people["a"], DID2)
    # relabelled table metadata: the HPKE info still binds the real dataset id
    t2 = t.replace_schema_metadata({b"anondata": canonical.dumps({"dataset_id": DID2, "format": "anondata-envelopes", "version": 1})})
    with pytest.raises(IntegrityError, match="rec-0"):
        open_records([t2], people["a"], DID2)


def _swap(t, column, i, j):
    col = t[column].to_pylist()
    col[i], col[j] = col[j], col[i]
    return t.set_column(t.schema.get_field_index(column), t.schema.field(column), pa.array(col, t.schema.field(column).type))


@pytest.mark.parametrize("column", ["wraps", "payload", "record_id"])
def test_envelope_swapped_between_records(people, column):
    t = seal_records([people["a"].recipient], DID, items(3))
    bad = _swap(t, column, 0, 2)
    with pytest.raises(IntegrityError, match="rec-(0|2)"):
        open_records([bad], people["a"], DID)


def test_swap_between_tables_of_two_datasets(people):
    t1 = seal_records([people["a"].recipient], DID, items(2))
    t2 = seal_records([people["a"].recipient], DID2, items(2))
    mixed = t1.set_column(2, t1.schema.field("wraps"), t2["wraps"])
    with pytest.raises(IntegrityError):
        open_records([mixed], people["a"], DID)


def _cells(t):
    """(row, "payload"|"sealed", wrap index) for every ciphertext in a table."""
    rows = t.to_pylist()
    for i, row in enumerate(rows):
        yield i, "payload", None
        for j, _ in enumerate(row["wraps"]):
            yield i, "sealed", j


def test_every_byte_of_every_ciphertext_is_authenticated(people):
    """Flip each byte of each payload and sealed key (a sample of >= 200 positions per kind)."""
    t = seal_records([people["a"].recipient, people["b"].recipient], DID, items(3))
    rows = t.to_pylist()
    rng = random.Random(1)
    tried = {"payload": 0, "sealed": 0}
    for i, kind, j in _cells(t):
        target = rows[i]["payload"] if kind == "payload" else rows[i]["wraps"][j]["sealed"]
        positions = range(len(target)) if len(target) <= 200 else rng.sample(range(len(target)), 200)
        for pos in positions:
            mutated = [dict(r, wraps=[dict(w) for w in r["wraps"]]) for r in rows]
            b = bytearray(target)
            b[pos] ^= rng.randrange(1, 256)
            if kind == "payload":
                mutated[i]["payload"] = bytes(b)
            else:
                mutated[i]["wraps"][j]["sealed"] = bytes(b)
            bad = pa.Table.from_pylist(mutated, schema=t.schema)
            who = people["a"] if (kind == "payload" or j == 0) else people["b"]
            with pytest.raises(IntegrityError, match=rows[i]["record_id"]):
                open_records([bad], who, DID)
            tried[kind] += 1
    assert tried["payload"] >= 200 and tried["sealed"] >= 200


def test_file_byte_changes_never_yield_wrong_data(people):
    """Any single-byte change of an envelope file: a clear AnondataError or the exact original
    plaintexts (e.g. a flipped bit in unused Parquet metadata). Never other data, never a traceback.
    (`verify` catches every such change by the file's SHA-256: see test_manifest.py.)"""
    t = seal_records([people["a"].recipient], DID, items(3))
    data = envelope_table_bytes(t)
    expect = open_records([t], people["a"], DID)
    rng = random.Random(2)
    positions = rng.sample(range(len(data)), min(len(data), 300))
    errors = 0
    for pos in positions:
        b = bytearray(data)
        b[pos] ^= rng.randrange(1, 256)
        try:
            got = open_records([read_envelope_table(bytes(b))], people["a"], DID)
        except AnondataError:
            errors += 1
            continue
        assert got == expect
    assert len(positions) >= 200 and errors > len(positions) // 2


@pytest.mark.parametrize(
    "data",
    [b"", b"PAR1", b"garbage" * 100, None],
)
def test_garbage_and_truncated(tmp_path, people, data):
    if data is None:
        full = envelope_table_bytes(seal_records([people["a"].recipient], DID, items(2)))
        data = full[: len(full) // 2]
    with pytest.raises(FormatError, match="not a readable Parquet"):
        read_envelope_table(data)
    p = tmp_path / "bad.keys.parquet"
    p.write_bytes(data)
    with pytest.raises(FormatError, match=str(p)):
        read_envelope_table(p)


def test_wrong_schema_and_metadata(people):
    t = seal_records([people["a"].recipient], DID, items(2))
    meta = t.schema.metadata
    cases = {
        "no metadata": t.replace_schema_metadata(None),
        "extra metadata": t.replace_schema_metadata({**meta, b"x": b"y"}),
        "non-canonical metadata": t.replace_schema_metadata({b"anondata": meta[b"anondata"].replace(b":", b": ")}),
        "version 2": t.replace_schema_metadata({b"anondata": canonical.dumps({"dataset_id": DID, "format": "anondata-envelopes", "version": 2})}),
        "extra column": t.append_column("x", pa.array([1, 2])),
        "dropped column": t.drop_columns(["payload"]),
        "nullable": pa.Table.from_arrays(t.columns, schema=pa.schema([f.with_nullable(True) for f in t.schema], metadata=meta)),
        "duplicate ids": pa.Table.from_pylist([t.to_pylist()[0]] * 2, schema=t.schema),
        "no wraps": pa.Table.from_pylist([dict(t.to_pylist()[0], wraps=[])], schema=t.schema),
        "dup wrap": pa.Table.from_pylist([dict(r, wraps=r["wraps"] * 2) for r in t.to_pylist()], schema=t.schema),
        "bad fingerprint": pa.Table.from_pylist([dict(r, wraps=[dict(w, recipient="X" * 32) for w in r["wraps"]]) for r in t.to_pylist()], schema=t.schema),
        "short payload": pa.Table.from_pylist([dict(r, payload=b"x") for r in t.to_pylist()], schema=t.schema),
        "control char id": pa.Table.from_pylist([dict(r, record_id="a\nb") for r in t.to_pylist()[:1]], schema=t.schema),
        "uppercase dataset id": t.replace_schema_metadata({b"anondata": canonical.dumps({"dataset_id": DID.upper(), "format": "anondata-envelopes", "version": 1})}),
        "dataset id not a string": t.replace_schema_metadata({b"anondata": canonical.dumps({"dataset_id": 5, "format": "anondata-envelopes", "version": 1})}),
    }
    for what, bad in cases.items():  # every error names the table it is about (docs/FORMAT.md)
        with pytest.raises(FormatError, match=r"^envelope table: "):
            read_envelope_table(_parquet(bad))
            pytest.fail(what)
        with pytest.raises(FormatError, match=r"^envelope table #0: "):
            open_records([bad], people["a"], DID)


def test_parquet_footer_metadata_must_agree_with_the_arrow_schema(people):
    """pyarrow takes the table's metadata from the footer's ARROW:schema; a reader without Arrow
    takes the footer's own key-value pairs. A file whose two copies of `anondata` differ (or with
    other footer keys) would name one dataset to pyarrow and another to that reader: refused."""
    t = seal_records([people["a"].recipient], DID, items(2))
    other = canonical.dumps({"dataset_id": DID2, "format": "anondata-envelopes", "version": 1})

    def written(table, footer):
        buf = io.BytesIO()
        with pq.ParquetWriter(buf, table.schema, write_statistics=False) as w:
            w.write_table(table)
            w.add_key_value_metadata(footer)
        return buf.getvalue()

    read_envelope_table(written(t, {}))  # what writers write: both copies the same
    for what, data in {
        "footer names another dataset": written(t, {"anondata": other}),
        "footer only": written(t.replace_schema_metadata(None), {"anondata": t.schema.metadata[b"anondata"]}),
        "extra footer key": written(t, {"note": "hello"}),
    }.items():
        with pytest.raises(FormatError, match="metadata"):
            read_envelope_table(data)
            pytest.fail(what)


def test_schema_check_is_exact_at_every_level(people):
    from anondata.envelope import WRAP_TYPE

    t = seal_records([people["a"].recipient], DID, items(2))
    fields = list(t.schema)
    item_list = pa.list_(pa.field("item", WRAP_TYPE, nullable=False))
    noted_wrap = pa.struct([WRAP_TYPE.field(0), WRAP_TYPE.field(1).with_metadata({b"k": b"v"})])
    cases = {
        "list element named item": fields[:2] + [pa.field("wraps", item_list, nullable=False)],
        "field metadata on record_id": [fields[0].with_metadata({b"note": b"hello"})] + fields[1:],
        "field metadata inside wraps": fields[:2] + [pa.field("wraps", pa.list_(pa.field("element", noted_wrap, nullable=False)), nullable=False)],
    }
    for what, bad_fields in cases.items():
        bad = pa.Table.from_pylist(t.to_pylist(), schema=pa.schema(bad_fields, metadata=t.schema.metadata))
        with pytest.raises(FormatError, match="not the envelope schema"):
            open_records([bad], people["a"], DID)
            pytest.fail(what)
        buf = io.BytesIO()
        pq.write_table(bad, buf, use_compliant_nested_type=False)  # a writer that keeps Arrow's list naming
        with pytest.raises(FormatError, match="not the envelope schema"):
            read_envelope_table(buf.getvalue())
            pytest.fail(what)


def _parquet(t) -> bytes:
    buf = io.BytesIO()
    pq.write_table(t, buf)
    return buf.getvalue()


def test_grant_only_chosen_records(people):
    a, b, c = people["a"], people["b"], people["c"]
    t = seal_records([a.recipient], DID, items(5))
    g = grant_records([t], a, [c.recipient], DID, ["rec-1", "rec-3"])
    assert g["record_id"].to_pylist() == ["rec-1", "rec-3"]
    full = open_records([t], a, DID)
    assert open_records([g], c, DID) == {k: full[k] for k in ("rec-1", "rec-3")}
    assert g["payload"].to_pylist() == [t["payload"][1].as_py(), t["payload"][3].as_py()]  # copied, not re-encrypted
    with pytest.raises(KeyError_, match="rec-2"):
        open_records([g], c, DID, ids=["rec-2"])
    with pytest.raises(KeyError_):
        open_records([g], a, DID)  # the owner is not a recipient of the grant
    with pytest.raises(KeyError_, match="no envelope"):
        grant_records([t], c, [b.recipient], DID, ["rec-1"])  # c cannot grant what it cannot open
    with pytest.raises(KeyError_, match="'zzz'"):
        grant_records([t], a, [c.recipient], DID, ["zzz"])


def test_grant_of_ids_given_as_an_iterator_holds_them(people):
    """The emptiness check read the ids with list(ids), so an iterator (a generator over a file of
    ids) was used up before the records were chosen: the grant held none of them, without a word."""
    a, c = people["a"], people["c"]
    t = seal_records([a.recipient], DID, items(5))
    g = grant_records([t], a, [c.recipient], DID, (f"rec-{i}" for i in (1, 3)))
    assert g["record_id"].to_pylist() == ["rec-1", "rec-3"]
    with pytest.raises(KeyError_, match="grant needs the record ids"):
        grant_records([t], a, [c.recipient], DID, iter([]))


def test_rewrap_replaces_recipients(people):
    a, b, c = people["a"], people["b"], people["c"]
    t = seal_records([a.recipient, c.recipient], DID, items(3, big=True))
    full = open_records([t], a, DID)
    r = rewrap_table(t, a, [b.recipient], DID)
    assert open_records([r], b, DID) == full
    assert r["payload"].to_pylist() == t["payload"].to_pylist()
    for old in (a, c):
        with pytest.raises(KeyError_):
            open_records([r], old, DID)


def test_records_in_two_tables_rejected(people):
    t = seal_records([people["a"].recipient], DID, items(2))
    with pytest.raises(FormatError, match="two tables"):
        open_records([t, t], people["a"], DID)


def test_seal_input_checks(people):
    a = people["a"].recipient
    for bad_items, match in [
        ([("r", b"short", b"")], "32 bytes"),
        ([("r", bytes(32), b""), ("r", bytes(32), b"")], "twice"),
        ([("", bytes(32), b"")], "record id"),
        ([("r", bytes(32), "str")], "bytes"),
    ]:
        with pytest.raises(FormatError, match=match):
            seal_records([a], DID, bad_items)
    with pytest.raises(FormatError, match="dataset id"):
        seal_records([a], "ABC", [("r", bytes(32), b"")])
    with pytest.raises(KeyError_):
        seal_records([], DID, [("r", bytes(32), b"")])
    with pytest.raises(KeyError_, match="twice"):
        seal_records([a, a], DID, [("r", bytes(32), b"")])


def test_malformed_seal_item_error_shows_no_key_bytes(people):
    key = bytes.fromhex("deadbeef" * 8)
    for item, n in [(("r1", key), 2), (("r1", key, b"rr", "extra"), 4), (["r1", key], 2)]:
        with pytest.raises(FormatError, match=f"got a {type(item).__name__} of length {n}") as e:
            seal_records([people["a"].recipient], DID, [item])
        msg = str(e.value)
        assert not any(s in msg for s in (repr(key)[2:18], key.hex()[:8], canonical.b64e(key)[:8])), msg


def test_golden_vectors():
    doc = json.loads((VECTORS / "envelopes.json").read_text(encoding="utf-8"))
    checked = {"ok": 0, "IntegrityError": 0, "KeyError_": 0}
    from anondata.envelope import _build_table

    for v in doc["vectors"]:
        ident = vector_identity(v["identity"][:-4])
        row = (v["record_id"], canonical.b64d(v["payload"]), [{"recipient": load_recipient(VECTORS / ("bob.pub" if v["identity"] == "alice.key" and v["expect"] == "KeyError_" else v["identity"][:-4] + ".pub")).fingerprint, "sealed": canonical.b64d(v["sealed"])}])
        t = _build_table([row], v["dataset_id"])
        if v["expect"] == "ok":
            got = open_records([t], ident, v["dataset_id"])
            assert got == {v["record_id"]: (canonical.b64d(v["record_key"]), canonical.b64d(v["restore_record"]))}
        else:
            exc = {"IntegrityError": IntegrityError, "KeyError_": KeyError_}[v["expect"]]
            with pytest.raises(exc):
                open_records([t], ident, v["dataset_id"])
        checked[v["expect"]] += 1
    assert checked["ok"] == 6 and checked["IntegrityError"] == 4 and checked["KeyError_"] == 1
    # and the committed Parquet file opens for both recipients
    t = read_envelope_table(VECTORS / "envelopes.keys.parquet")
    did = json.loads(t.schema.metadata[b"anondata"])["dataset_id"]
    assert open_records([t], vector_identity("alice"), did) == open_records([t], vector_identity("bob"), did)


def test_vector_intermediates_match_spec():
    """Every vector's intermediates (hpke_info, data_key, payload_key, payload_nonce), X25519 and
    hybrid, recomputed from FORMAT.md with `cryptography` alone, not anondata's helpers."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes, hpke
    from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    def private(key_file):  # "Identity files": an X25519 scalar, or ML-KEM-768 seed (64) || X25519 scalar
        key = json.loads((VECTORS / key_file).read_text(encoding="utf-8"))
        raw = canonical.b64d(key["kem_secret"])
        if key["kem"] == "X25519":
            return hpke.KEM.X25519, x25519.X25519PrivateKey.from_private_bytes(raw)
        ml, xk = mlkem.MLKEM768PrivateKey.from_seed_bytes(raw[:64]), x25519.X25519PrivateKey.from_private_bytes(raw[64:])
        return hpke.KEM.MLKEM768_X25519, hpke.MLKEM768X25519PrivateKey(ml, xk)

    opened = set()
    for v in json.loads((VECTORS / "envelopes.json").read_text(encoding="utf-8"))["vectors"]:
        what = v["description"]
        kem, sk = private(v["identity"])
        binding = v["dataset_id"].encode() + v["record_id"].encode()
        info = b"anondata/wrap/v1\x00" + binding  # what the opener binds
        sealed_info = canonical.b64d(v["hpke_info"])  # what the envelope was sealed with
        assert re.fullmatch(rb"anondata/wrap/v1\x00[0-9a-f]{32}.+", sealed_info, re.S), what
        nonce = canonical.b64d(v["payload_nonce"])
        assert nonce == bytes(12), what
        suite = hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
        if v["data_key"] is None:  # the negative vectors that fail at the HPKE layer
            assert v["payload_key"] is None and v["expect"] != "ok", what
            with pytest.raises((InvalidTag, ValueError)):
                suite.decrypt(canonical.b64d(v["sealed"]), sk, info=info)
            if sealed_info != info:  # moved to another record or dataset: intact, only the binding differs
                suite.decrypt(canonical.b64d(v["sealed"]), sk, info=sealed_info)
            continue
        assert sealed_info == info, what
        dk = suite.decrypt(canonical.b64d(v["sealed"]), sk, info=info)
        assert dk == canonical.b64d(v["data_key"]), what
        pk = HKDF(hashes.SHA256(), 32, None, b"anondata/payload/v1\x00" + binding).derive(dk)
        assert pk == canonical.b64d(v["payload_key"]), what
        payload = canonical.b64d(v["payload"])
        if v["expect"] != "ok":  # the flipped tag
            with pytest.raises(InvalidTag):
                ChaCha20Poly1305(pk).decrypt(nonce, payload, None)
            continue
        plain = ChaCha20Poly1305(pk).decrypt(nonce, payload, None)
        assert plain == b"\x01" + canonical.b64d(v["record_key"]) + canonical.b64d(v["restore_record"]), what
        opened.add((kem, v["record_id"]))
    assert len(opened) == 6 and {k for k, _ in opened} == {hpke.KEM.X25519, hpke.KEM.MLKEM768_X25519}


def test_vector_hpke_by_hand_pins_the_kems():
    """The HPKE layer of every opening vector, written out from RFC 9180 (base mode key schedule,
    DHKEM(X25519) 0x0020) and X-Wing (0x647A, its SHA3-256 combiner), as FORMAT.md names them: the
    test above uses `cryptography`'s HPKE, so alone it would follow that library if its
    `MLKEM768_X25519` ever meant another combiner or KEM id."""
    import hashlib
    import hmac

    from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    def extract(salt, ikm):
        return hmac.new(salt, ikm, hashlib.sha256).digest()

    def expand(prk, info, n):
        out, t, i = b"", b"", 1
        while len(out) < n:
            t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
            out, i = out + t, i + 1
        return out[:n]

    def lextract(suite, salt, label, ikm):
        return extract(salt, b"HPKE-v1" + suite + label + ikm)

    def lexpand(suite, prk, label, info, n):
        return expand(prk, n.to_bytes(2, "big") + b"HPKE-v1" + suite + label + info, n)

    def decap(kem, sk, enc):
        if kem == "X25519":
            k = x25519.X25519PrivateKey.from_private_bytes(sk)
            dh = k.exchange(x25519.X25519PublicKey.from_public_bytes(enc))
            suite = b"KEM\x00\x20"
            prk = lextract(suite, b"", b"eae_prk", dh)
            return 0x0020, lexpand(suite, prk, b"shared_secret", enc + k.public_key().public_bytes_raw(), 32)
        ss_m = mlkem.MLKEM768PrivateKey.from_seed_bytes(sk[:64]).decapsulate(enc[:1088])
        kx = x25519.X25519PrivateKey.from_private_bytes(sk[64:])
        ss_x = kx.exchange(x25519.X25519PublicKey.from_public_bytes(enc[1088:]))
        pk_x = kx.public_key().public_bytes_raw()
        return 0x647A, hashlib.sha3_256(ss_m + ss_x + enc[1088:] + pk_x + b"\\.//^\\").digest()

    kems = set()
    for v in json.loads((VECTORS / "envelopes.json").read_text(encoding="utf-8"))["vectors"]:
        if v["data_key"] is None:
            continue
        key = json.loads((VECTORS / v["identity"]).read_text(encoding="utf-8"))
        n_enc = {"X25519": 32, "MLKEM768-X25519": 1120}[key["kem"]]
        sealed = canonical.b64d(v["sealed"])
        kem_id, ss = decap(key["kem"], canonical.b64d(key["kem_secret"]), sealed[:n_enc])
        suite = b"HPKE" + kem_id.to_bytes(2, "big") + b"\x00\x01\x00\x03"
        ctx = b"\x00" + lextract(suite, b"", b"psk_id_hash", b"") + lextract(suite, b"", b"info_hash", canonical.b64d(v["hpke_info"]))
        secret = lextract(suite, ss, b"secret", b"")
        aead = ChaCha20Poly1305(lexpand(suite, secret, b"key", ctx, 32))
        dk = aead.decrypt(lexpand(suite, secret, b"base_nonce", ctx, 12), sealed[n_enc:], b"")
        assert dk == canonical.b64d(v["data_key"]), v["description"]
        kems.add(kem_id)
    assert kems == {0x0020, 0x647A}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_payload_parser(data):
    try:
        key, rr = decode_payload(data)
    except FormatError:
        return
    assert encode_payload(key, rr) == data


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_fuzz_table_reader_random_bytes(data):
    try:
        read_envelope_table(b"PAR1" + data + b"PAR1")
    except FormatError:
        pass


_FUZZ_BASE = None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_table_reader_mutations(data):
    global _FUZZ_BASE
    if _FUZZ_BASE is None:
        ident = generate_identity()
        _FUZZ_BASE = (ident, envelope_table_bytes(seal_records([ident.recipient], DID, items(2))))
    ident, base = _FUZZ_BASE
    b = bytearray(base)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(b) - 1))
        b[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        b = b[: data.draw(st.integers(0, len(b)))]
    try:
        t = read_envelope_table(bytes(b))
        open_records([t], ident, DID)
    except AnondataError:
        pass


def test_field_name_that_is_not_utf8_is_a_format_error():
    """Found by the fuzz test above: pyarrow decodes field names on access, so a name of invalid
    UTF-8 raised UnicodeDecodeError out of the schema check."""
    ident = generate_identity()
    b = envelope_table_bytes(seal_records([ident.recipient], DID, items(1))).replace(b"payload", b"\x80ayload")
    with pytest.raises(FormatError, match="not UTF-8"):
        read_envelope_table(b)


def test_arrow_schema_doc_matches_code():
    from anondata.envelope import envelope_schema

    doc = (Path(__file__).parents[1] / "schemas" / "envelope.arrow.md").read_text()
    assert str(envelope_schema(DID).remove_metadata()) in doc


def test_check_sealed_to_names_the_first_row_that_differs_in_any_chunk(people):
    """check_sealed_to works on whole Arrow columns: a table read back in several chunks must be
    checked row by row across all of them, and the message must name the row that differs."""
    from anondata.envelope import check_sealed_to

    a, b, c = people["a"], people["b"], people["c"]
    ref = lambda p: {"fingerprint": p.fingerprint, "kem": p.kem, "name": p.recipient.name}
    good = seal_records([a.recipient, b.recipient], DID, items(3))
    check_sealed_to(good, [ref(b), ref(a)], "t")  # order does not matter
    odd = seal_records([a.recipient, c.recipient], DID, [("late", secrets.token_bytes(32), b"")])
    mixed = pa.concat_tables([good, good.slice(0, 0), odd])
    assert mixed.column("wraps").num_chunks == 3
    with pytest.raises(IntegrityError, match=rf"t: record 'late' has no envelope for recipient {b.fingerprint}"):
        check_sealed_to(mixed, [ref(a), ref(b)], "t")
    with pytest.raises(IntegrityError, match=rf"t: record 'rec-0' has no envelope for recipient {c.fingerprint}"):
        check_sealed_to(mixed, [ref(a), ref(c)], "t")
    with pytest.raises(IntegrityError, match=rf"t: record 'rec-0' is also sealed to {b.fingerprint}, who is not"):
        check_sealed_to(good, [ref(a)], "t")
    with pytest.raises(IntegrityError, match=rf"key sealed to recipient {b.fingerprint} \(b\) has 1168 bytes, not the 80"):
        check_sealed_to(good, [ref(a), dict(ref(b), kem="X25519")], "t")


def test_errors_quote_a_bounded_part_of_a_bad_value(people):
    """Record ids, dataset ids and table metadata come from files anyone can write: a rejection
    quotes enough of the value to find it, never all of it (one terminal line)."""
    t = seal_records([people["a"].recipient], DID, items(1))
    meta = lambda **kw: t.replace_schema_metadata({b"anondata": canonical.dumps(
        {**{"dataset_id": DID, "format": "anondata-envelopes", "version": 1}, **kw})})
    calls = [
        lambda: check_record_id("x" * 100_000),
        lambda: check_dataset_id("f" * 100_000),
        lambda: read_envelope_table(_parquet(meta(format="x" * 100_000))),
        lambda: read_envelope_table(_parquet(meta(version="1" * 100_000))),
        lambda: read_envelope_table(_parquet(meta(dataset_id="f" * 100_000))),
        lambda: read_envelope_table(_parquet(pa.Table.from_pylist(
            [dict(r, wraps=[dict(w, recipient="x" * 100_000) for w in r["wraps"]]) for r in t.to_pylist()], schema=t.schema))),
    ]
    for call in calls:
        with pytest.raises(FormatError) as e:
            call()
        assert len(str(e.value)) < 300, str(e.value)[:400]


def test_envelope_tables_are_read_without_the_dataset_scanner(people, tmp_path, monkeypatch):
    """pq.read_table frees its fragment on an Arrow thread after it returns; when the fragment holds
    a Python buffer (a table read from checked bytes) and the interpreter is exiting, that thread's
    GIL request aborts the process: `anondata verify` printed "ok" and exited 134 in 5 of 150 runs
    on a loaded machine (the bare read: 19 of 200). The abort depends on timing, so what is tested
    is its cause: no reader here may go through the dataset layer."""
    import pyarrow.dataset

    def scanner(*a, **k):
        raise AssertionError("envelope tables must be read with pq.ParquetFile, not the dataset scanner")

    t = seal_records([people["a"].recipient], DID, items(2))
    data = envelope_table_bytes(t)
    (tmp_path / "e.keys.parquet").write_bytes(data)
    monkeypatch.setattr(pq, "read_table", scanner)
    monkeypatch.setattr(pyarrow.dataset, "dataset", scanner)
    assert read_envelope_table(data).equals(t)
    assert read_envelope_table(tmp_path / "e.keys.parquet").equals(t)
