"""The signed manifest and `verify_release`: every byte of a release is covered."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anondata import canonical
from anondata.envelope import seal_records, write_envelope_table
from anondata.errors import FormatError, IntegrityError, KeyError_
from anondata.identity import Identity, generate_identity, load_recipient
from anondata.manifest import (
    build_manifest,
    parse_manifest,
    read_manifest,
    validate_grant,
    validate_manifest,
    verify_release,
    write_signed_manifest,
)

VECTORS = Path(__file__).parent / "vectors"
SCHEMA = Path(__file__).parents[1] / "schemas" / "manifest.schema.json"
MODEL = {"name": "tiny", "sha256": "ab" * 32, "revision": None}
SETTINGS = {"scheme_version": 1, "steps": 4, "eta": "0"}


@pytest.fixture(scope="module")
def owner():
    return generate_identity(name="owner")


def make_release(root: Path, owner: Identity, n=(3, 2), quarantined=1, sign=True) -> dict:
    """A small release: one shard + one envelope file per split."""
    did = secrets.token_hex(16)
    (root / "data").mkdir(parents=True)
    records, shards, envs = [], [], []
    for split, count in zip(("train", "test"), n):
        name = f"{split}-00000-of-00001"
        ids = [f"{split}/{i:04d}.png" for i in range(count)]
        pq.write_table(pa.table({"id": ids, "image": [os.urandom(100) for _ in ids]}), root / f"data/{name}.parquet")
        table = seal_records([owner.recipient], did, [(i, secrets.token_bytes(32), os.urandom(30)) for i in ids])
        write_envelope_table(root / f"keys/{name}.keys.parquet", table)
        shards.append(f"data/{name}.parquet")
        envs.append(f"keys/{name}.keys.parquet")
        records += [{"id": i, "split": split, "status": "anonymized", "shard": f"data/{name}.parquet"} for i in ids]
    records += [{"id": f"q{i}", "split": "train", "status": "quarantined", "reason": "no face found"} for i in range(quarantined)]
    records.append({"id": "broken.jpg", "split": "train", "status": "skipped", "reason": "not an image"})
    m = build_manifest(root, dataset_id=did, model=MODEL, settings=SETTINGS, recipients=[owner.recipient],
                       signer=owner.recipient, shard_paths=shards, envelope_paths=envs, records=records)
    if sign:
        write_signed_manifest(root, m, owner)
    return m


def test_roundtrip(tmp_path, owner):
    m = make_release(tmp_path, owner)
    s = verify_release(tmp_path, owner.recipient)
    assert s["shards"] == 2 and s["envelope_files"] == 2 and s["records"] == 7
    assert s["counts"] == {"anonymized": 5, "quarantined": 1, "skipped": 1, "total": 7}
    assert s["signer"] == owner.fingerprint and s["envelopes_checked"]
    assert read_manifest(tmp_path) == m
    assert (tmp_path / "manifest.json").read_bytes() == canonical.dumps(m) + b"\n"
    assert sorted(os.listdir(tmp_path)) == ["data", "keys", "manifest.json", "manifest.json.sig"]


def test_public_copy_without_keys_verifies(tmp_path, owner):
    make_release(tmp_path, owner)
    shutil.rmtree(tmp_path / "keys")
    s = verify_release(tmp_path)
    assert not s["envelopes_checked"]


def test_wrong_signer(tmp_path, owner):
    make_release(tmp_path, owner)
    other = generate_identity(name="mallory")
    with pytest.raises(IntegrityError, match="not by the expected signer"):
        verify_release(tmp_path, other.recipient)
    # a manifest re-signed by someone else still fails when the owner is pinned
    m = read_manifest(tmp_path)
    m["signer"] = other.recipient.to_json()
    write_signed_manifest(tmp_path, m, other)
    verify_release(tmp_path)  # intact, but signed by mallory
    with pytest.raises(IntegrityError, match="mallory"):
        verify_release(tmp_path, owner.recipient)


def test_write_refuses_wrong_signing_key(tmp_path, owner):
    m = make_release(tmp_path, owner, sign=False)
    with pytest.raises(KeyError_):
        write_signed_manifest(tmp_path, m, generate_identity())


def _flip_positions(path: Path, minimum=200):
    size = path.stat().st_size
    rng = random.Random(path.name)
    if size >= minimum:
        return [(p, rng.randrange(1, 256)) for p in rng.sample(range(size), minimum)]
    # short files (the 64-byte signature): every position, several values each
    per = -(-minimum // size)
    return [(p, v) for p in range(size) for v in rng.sample(range(1, 256), per)]


@pytest.mark.parametrize(
    "target", ["manifest.json", "manifest.json.sig", "data/train-00000-of-00001.parquet", "keys/train-00000-of-00001.keys.parquet"]
)
def test_every_single_byte_change_is_detected(tmp_path, owner, target):
    make_release(tmp_path, owner, n=(20, 2))
    path = tmp_path / target
    good = path.read_bytes()
    positions = _flip_positions(path)
    assert len(positions) >= 200
    for pos, x in positions:
        bad = bytearray(good)
        bad[pos] ^= x
        path.write_bytes(bad)
        with pytest.raises((IntegrityError, FormatError)):
            verify_release(tmp_path, owner.recipient)
    path.write_bytes(good)
    verify_release(tmp_path, owner.recipient)


@pytest.mark.parametrize("cut", ["manifest.json", "manifest.json.sig", "data/test-00000-of-00001.parquet", "keys/test-00000-of-00001.keys.parquet"])
def test_truncated_missing_and_garbage_files(tmp_path, owner, cut):
    make_release(tmp_path, owner)
    path = tmp_path / cut
    good = path.read_bytes()
    for bad in (good[: len(good) // 2], good[:-1], b"", os.urandom(len(good)), good + b"\0"):
        path.write_bytes(bad)
        with pytest.raises((IntegrityError, FormatError)):
            verify_release(tmp_path)
    path.unlink()
    with pytest.raises((IntegrityError, FormatError), match="missing"):
        verify_release(tmp_path)


def test_non_canonical_manifest_signed_anyway(tmp_path, owner):
    """A correctly signed manifest that is not canonical is still rejected."""
    m = make_release(tmp_path, owner)
    for data in (json.dumps(m, indent=1).encode() + b"\n", json.dumps(m, sort_keys=False).encode() + b"\n",
                 canonical.dumps(m), canonical.dumps(m) + b"\r\n"):
        (tmp_path / "manifest.json").write_bytes(data)
        (tmp_path / "manifest.json.sig").write_bytes(owner.sign(data))
        with pytest.raises(FormatError):
            verify_release(tmp_path, owner.recipient)


def _resign(root, m, ident):
    data = canonical.dumps(m) + b"\n"
    (root / "manifest.json").write_bytes(data)
    (root / "manifest.json.sig").write_bytes(ident.sign(data))


def test_signed_but_inconsistent(tmp_path, owner):
    """Even the signer cannot publish a manifest that loses records or miscounts."""
    m = make_release(tmp_path, owner)
    cases = []
    c = json.loads(json.dumps(m)); c["records"].pop(); cases.append(("record dropped, counts stale", c))
    c = json.loads(json.dumps(m)); c["records"].append(dict(c["records"][0])); cases.append(("duplicate id", c))
    c = json.loads(json.dumps(m)); c["shards"][0]["rows"] += 1; cases.append(("shard rows", c))
    c = json.loads(json.dumps(m)); c["records"][0]["shard"] = 9; cases.append(("shard index", c))
    c = json.loads(json.dumps(m)); c["records"][-1]["reason"] = ""; cases.append(("empty reason", c))
    c = json.loads(json.dumps(m)); c["records"][0]["reason"] = "x"; cases.append(("reason on anonymized", c))
    c = json.loads(json.dumps(m)); c["version"] = 2; cases.append(("version", c))
    c = json.loads(json.dumps(m)); c["shards"][0]["path"] = "data/../x.parquet"; cases.append(("dotdot", c))
    c = json.loads(json.dumps(m)); c["dataset_id"] = c["dataset_id"].upper(); cases.append(("dataset id case", c))
    c = json.loads(json.dumps(m)); c["envelopes"].pop(); cases.append(("envelope file dropped", c))
    for what, bad in cases:
        _resign(tmp_path, bad, owner)
        with pytest.raises((FormatError, IntegrityError)):
            verify_release(tmp_path, owner.recipient)
            pytest.fail(what)


def test_unlisted_files_are_flagged(tmp_path, owner):
    make_release(tmp_path, owner)
    (tmp_path / "data" / ".train.parquet.tmp").write_bytes(b"half")
    with pytest.raises(IntegrityError, match="not listed"):
        verify_release(tmp_path)
    (tmp_path / "data" / ".train.parquet.tmp").unlink()
    verify_release(tmp_path)
    os.mkfifo(tmp_path / "keys" / "pipe")  # neither a regular file nor a link: it passed
    with pytest.raises(IntegrityError, match="keys/pipe: file is not listed"):
        verify_release(tmp_path)


def test_envelope_moved_between_releases(tmp_path, owner):
    a, b = tmp_path / "a", tmp_path / "b"
    make_release(a, owner)
    make_release(b, owner)
    shutil.copy(b / "keys/train-00000-of-00001.keys.parquet", a / "keys/train-00000-of-00001.keys.parquet")
    with pytest.raises(IntegrityError):
        verify_release(a)


def test_build_rejects_bad_records(tmp_path, owner):
    m = make_release(tmp_path, owner, sign=False)
    base = dict(dataset_id=m["dataset_id"], model=MODEL, settings=SETTINGS, recipients=[owner.recipient],
                signer=owner.recipient, shard_paths=[s["path"] for s in m["shards"]],
                envelope_paths=[e["path"] for e in m["envelopes"]])
    recs = [dict(r, shard=m["shards"][r["shard"]]["path"]) if r["status"] == "anonymized" else r for r in m["records"]]
    build_manifest(tmp_path, **base, records=recs)
    for bad, match in [
        (recs[:-1] + [dict(recs[-1], status="lost")], "status"),
        (recs[1:], "rows"),
        ([dict(recs[0], shard="data/nope.parquet")] + recs[1:], "not one of the listed"),
        (recs + [recs[0]], "twice"),
    ]:
        with pytest.raises(FormatError, match=match):
            build_manifest(tmp_path, **base, records=bad)
    with pytest.raises(FormatError, match="floats"):
        build_manifest(tmp_path, **dict(base, settings={"eta": 0.0}), records=recs)
    with pytest.raises(FormatError, match="must look like"):
        build_manifest(tmp_path, **dict(base, shard_paths=["/etc/passwd"]), records=recs)


def test_golden_release_vector(tmp_path):
    alice_pub = load_recipient(VECTORS / "alice.pub")
    s = verify_release(VECTORS / "release", alice_pub)
    assert s["counts"] == {"anonymized": 3, "quarantined": 1, "skipped": 1, "total": 5}
    data = (VECTORS / "release/manifest.json").read_bytes()
    alice = Identity.from_bytes((VECTORS / "alice.key").read_bytes())
    assert alice.sign(data) == (VECTORS / "release/manifest.json.sig").read_bytes()  # Ed25519 is deterministic
    with pytest.raises(IntegrityError):
        verify_release(VECTORS / "release", load_recipient(VECTORS / "bob.pub"))


def test_cli_verify_of_the_vector_release_prints_ok():
    """FORMAT.md, "Test vectors": the spec's command, as written there, run from the repository root."""
    repo = Path(__file__).parents[1]
    r = subprocess.run([sys.executable, "-m", "anondata", "verify", "tests/vectors/release", "--signer", "tests/vectors/alice.pub"],
                       cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo)), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # "On success it prints `ok: N shards, M envelope files, K records (...), signed by NAME (FP)`
    # and, on a second line, `dataset DATASET_ID, manifest.json sha256 HEX`"
    manifest_hash = hashlib.sha256((repo / "tests/vectors/release/manifest.json").read_bytes()).hexdigest()
    assert re.fullmatch(r"ok: 1 shards, 1 envelope files, 5 records \(3 anonymized, 1 quarantined, 1 skipped\), "
                        r"signed by alice \(2da0fcf8cc8bf1e3afa01c14a9be9734\)\n"
                        rf"dataset f03dc616d188f83464b57270433c159c, manifest.json sha256 {manifest_hash}\n", r.stdout), r.stdout


def test_json_schema_accepts_what_we_write(tmp_path, owner):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    v = jsonschema.Draft202012Validator(schema)
    v.validate(json.loads((VECTORS / "release/manifest.json").read_text()))
    v.validate(make_release(tmp_path, owner))


_BASE = (VECTORS / "release/manifest.json").read_bytes()


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_fuzz_manifest_parser(data):
    """Random edits of the vector manifest: parse_manifest raises FormatError or accepts a
    document that the JSON Schema accepts too (the Python validator is never laxer)."""
    b = bytearray(_BASE)
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["set", "del", "ins"]))
        pos = data.draw(st.integers(0, len(b) - 1))
        if op == "set":
            b[pos] = data.draw(st.integers(0, 255))
        elif op == "del":
            del b[pos]
        else:
            b.insert(pos, data.draw(st.sampled_from(b'{}[]",:0123456789abcdefnulltrue\\ \n\x00\xff')))
    try:
        m = parse_manifest(bytes(b))
    except FormatError:
        return
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(m, json.loads(SCHEMA.read_text()))


json_leaf = st.none() | st.booleans() | st.integers(-5, 2**40) | st.text(max_size=12)
json_any = st.recursive(json_leaf, lambda k: st.lists(k, max_size=3) | st.dictionaries(st.text(max_size=8), k, max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["counts", "dataset_id", "envelopes", "model", "recipients", "records", "settings", "shards", "signer", "tool", "version", "format"]), json_any)
def test_fuzz_manifest_fields(field, value):
    m = json.loads(_BASE)
    m[field] = value
    try:
        validate_manifest(m)
    except FormatError:
        return
    # accepted only if it is a legal manifest by the schema as well
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(m, json.loads(SCHEMA.read_text()))


def _parse_edited(edit) -> dict:
    m = json.loads(_BASE)
    edit(m)
    return parse_manifest(canonical.dumps(m) + b"\n")


def test_counts_must_be_integers_not_booleans():
    _parse_edited(lambda m: None)
    with pytest.raises(FormatError, match=r"\$\.counts\.quarantined: expected an integer"):
        _parse_edited(lambda m: m["counts"].update(quarantined=True, skipped=True))


def test_settings_schedule_is_16_hex_digits_when_present():
    """docs/FORMAT.md: settings.schedule is 16 hex digits or absent (older releases); the schema
    and the validator agree."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    ok = _parse_edited(lambda m: m["settings"].update(schedule="9a8c88e50d46dfc5"))
    jsonschema.validate(ok, schema)
    for bad in ("9A8C88E50D46DFC5", "9a8c88e50d46dfc", "9a8c88e50d46dfc5\n", 7, None):
        with pytest.raises(FormatError, match=r"\$\.settings\.schedule"):
            _parse_edited(lambda m: m["settings"].update(schedule=bad))
        if bad != "9a8c88e50d46dfc5\n":  # Python's re reads the schema's ECMA-262 `$` as "before a final newline"
            m = json.loads(_BASE)
            m["settings"]["schedule"] = bad
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(m, schema)


def test_recipient_names_follow_the_pub_file_rule():
    for name in ("a\nb", "\x00", "x\x7f", "x" * 129):
        with pytest.raises(FormatError, match=r"\$\.recipients\[0\]: name must be .* without control characters"):
            _parse_edited(lambda m: m["recipients"][0].update(name=name))


def test_grant_to_is_checked_like_the_manifest_recipients():
    ok = {"fingerprint": "2da0fcf8cc8bf1e3afa01c14a9be9734", "kem": "X25519", "name": "alice"}
    grant = {"dataset_id": "f03dc616d188f83464b57270433c159c", "format": "anondata-grant",
             "envelopes": [{"bytes": 1, "path": "grant.keys.parquet", "rows": 1, "sha256": "0" * 64}],
             "granted_by": json.loads((VECTORS / "alice.pub").read_text()), "manifest_sha256": "0" * 64,
             "records": ["img-000"], "to": [ok], "version": 1}
    validate_grant(grant)
    for to, match in [
        ([dict(ok, kem="NOPE")], r"grant\.to\[0\]\.kem: unknown kem 'NOPE'"),
        ([dict(ok, kem=["X25519"])], r"grant\.to\[0\]\.kem: unknown kem"),
        ([dict(ok, name=123)], r"grant\.to\[0\]: name must be"),
        ([dict(ok, name="a\x1bb")], r"grant\.to\[0\]: name must be .* without control characters"),
        ([ok, dict(ok, name="again")], r"grant\.to\[1\]\.fingerprint: listed twice"),
    ]:
        with pytest.raises(FormatError, match=match):
            validate_grant(dict(grant, to=to))


def _reseal_file(root: Path, m: dict, index: int, table) -> None:
    """Replace envelope file `index` with `table` and fix its manifest entry (size, hash, rows)."""
    from anondata.manifest import file_entry

    path = m["envelopes"][index]["path"]
    write_envelope_table(root / path, table)
    m["envelopes"][index] = file_entry(root, path, "envelopes")


def test_manifest_recipients_must_be_who_the_envelopes_are_sealed_to(tmp_path, owner):
    """`recipients` says who can restore; the wraps say who really can. Every writer seals each
    record to exactly the list it signs, so verify refuses any difference, even one the signer
    signed (a botched rewrap, keys/ from another run), naming the file, record and fingerprint."""
    other, pq_key = generate_identity(name="other"), generate_identity(pq=True, name="pqkey")
    m = make_release(tmp_path, owner)
    did, ref = m["dataset_id"], lambda ident: {"fingerprint": ident.fingerprint, "kem": ident.kem, "name": ident.recipient.name}
    train_ids = [r["id"] for r in m["records"] if r["status"] == "anonymized" and r["shard"] == 0]
    table = pq.read_table(tmp_path / m["envelopes"][0]["path"])
    cases = []
    c = json.loads(json.dumps(m)); c["recipients"] = [ref(other)]
    cases.append(("someone else listed", c, rf"record 'train/0000.png' has no envelope for recipient {other.fingerprint} \(other\)"))
    c = json.loads(json.dumps(m)); c["recipients"].append(ref(other))
    cases.append(("an extra recipient listed", c, rf"record 'train/0000.png' has no envelope for recipient {other.fingerprint}"))
    c = json.loads(json.dumps(m)); c["recipients"][0]["kem"] = "MLKEM768-X25519"
    cases.append(("wrong kem listed", c, rf"record 'train/0000.png': the key sealed to recipient {owner.fingerprint} \(owner\) has 80 bytes, not the 1168"))
    for what, bad, match in cases:
        _resign(tmp_path, bad, owner)
        with pytest.raises(IntegrityError, match=r"envelope file keys/train-00000-of-00001\.keys\.parquet: " + match):
            verify_release(tmp_path, owner.recipient)
            pytest.fail(what)
    # envelopes sealed to one more key than the manifest lists
    c = json.loads(json.dumps(m))
    _reseal_file(tmp_path, c, 0, seal_records([owner.recipient, pq_key.recipient], did,
                                              [(i, secrets.token_bytes(32), b"") for i in train_ids]))
    _resign(tmp_path, c, owner)
    with pytest.raises(IntegrityError, match=rf"record 'train/0000.png' is also sealed to {pq_key.fingerprint}, who is not a recipient"):
        verify_release(tmp_path, owner.recipient)
    # a rewrap that stopped half-way through a file: only the last record is sealed to someone else
    mixed = pa.concat_tables([table.slice(0, len(train_ids) - 1),
                              seal_records([other.recipient], did, [(train_ids[-1], secrets.token_bytes(32), b"")])])
    c = json.loads(json.dumps(m))
    _reseal_file(tmp_path, c, 0, mixed)
    _resign(tmp_path, c, owner)
    with pytest.raises(IntegrityError, match=rf"record '{re.escape(train_ids[-1])}' has no envelope for recipient {owner.fingerprint}"):
        verify_release(tmp_path, owner.recipient)
    # the same file, restored, verifies again: the refusals above were about the recipients alone
    c = json.loads(json.dumps(m))
    _reseal_file(tmp_path, c, 0, table)
    _resign(tmp_path, c, owner)
    assert verify_release(tmp_path, owner.recipient)["envelopes_checked"]


def test_build_refuses_recipients_the_envelopes_are_not_sealed_to(tmp_path, owner):
    """The writer checks what verify checks: it never signs a release verify would refuse."""
    m = make_release(tmp_path, owner, sign=False)
    shard_of = {i: s["path"] for i, s in enumerate(m["shards"])}
    records = [dict(r, shard=shard_of[r["shard"]]) if "shard" in r else r for r in m["records"]]
    other = generate_identity(name="other")
    with pytest.raises(IntegrityError, match=rf"no envelope for recipient {other.fingerprint} \(other\), whom the recipients given"):
        build_manifest(tmp_path, dataset_id=m["dataset_id"], model=MODEL, settings=SETTINGS, recipients=[owner.recipient, other.recipient],
                       signer=owner.recipient, shard_paths=[s["path"] for s in m["shards"]],
                       envelope_paths=[e["path"] for e in m["envelopes"]], records=records)


def test_grant_to_must_be_who_its_table_is_sealed_to(tmp_path, owner, monkeypatch):
    """A grant's `to` promises who can restore the granted records; read_grant refuses a table
    sealed to anyone else, even in a grant the granter signed."""
    from anondata import manifest
    from anondata.envelope import grant_records
    from anondata.manifest import open_release, read_grant, write_grant

    other, third = generate_identity(name="other"), generate_identity(name="third")
    m = make_release(tmp_path / "rel", owner)
    rel = open_release(tmp_path / "rel", owner.recipient)
    table = grant_records(rel.envelopes, owner, [other.recipient], m["dataset_id"], ["train/0001.png"])
    write_grant(tmp_path / "ok", table, owner, [other.recipient], m["dataset_id"], rel.summary["manifest_sha256"])
    assert read_grant(tmp_path / "ok", rel)[0]["records"] == ["train/0001.png"]
    # write_grant itself refuses to sign such a grant, naming the record and the recipient
    with pytest.raises(IntegrityError, match=rf"record 'train/0001.png' has no envelope for recipient {third.fingerprint}"):
        write_grant(tmp_path / "bad", table, owner, [third.recipient], m["dataset_id"], rel.summary["manifest_sha256"])
    assert not (tmp_path / "bad").exists()
    with monkeypatch.context() as mp:  # a writer without that check: its readers refuse the grant
        mp.setattr(manifest, "check_sealed_to", lambda *a, **k: None)
        write_grant(tmp_path / "bad", table, owner, [third.recipient], m["dataset_id"], rel.summary["manifest_sha256"])
    with pytest.raises(IntegrityError, match=rf"grant\.keys\.parquet: record 'train/0001.png' has no envelope for recipient "
                                             rf"{third.fingerprint} \(third\), whom .*grant\.json lists"):
        read_grant(tmp_path / "bad", rel)


def test_a_signed_grant_that_breaks_the_grant_rules_is_refused_naming_the_grant_file(tmp_path, owner):
    """A grantee may hold several grant folders: each rejection names the grant.json it is about
    (docs/FORMAT.md: errors name the file), and never calls it a manifest."""
    from anondata.envelope import grant_records
    from anondata.manifest import open_release, read_grant, write_grant

    other = generate_identity(name="other")
    m = make_release(tmp_path / "rel", owner)
    rel = open_release(tmp_path / "rel", owner.recipient)
    table = grant_records(rel.envelopes, owner, [other.recipient], m["dataset_id"], ["train/0001.png"])
    good = write_grant(tmp_path / "g", table, owner, [other.recipient], m["dataset_id"], rel.summary["manifest_sha256"])
    name = re.escape(str(tmp_path / "g" / "grant.json"))
    for edit, field in [
        (lambda g: g.update(version=2), r"grant\.version"),
        (lambda g: g.update(extra=1), r"unknown field\(s\) extra"),
        (lambda g: g.update(manifest_sha256="A" * 64), r"grant\.manifest_sha256"),
        (lambda g: g.update(records=["a\x01b"]), r"grant\.records\[0\]: record id"),
        (lambda g: g.update(to=[]), r"grant\.to: expected a non-empty list"),
        (lambda g: g["to"][0].update(name="a\x1bb"), r"grant\.to\[0\]: name must be"),
    ]:
        g = json.loads(json.dumps(good))
        edit(g)
        data = canonical.dumps(g) + b"\n"
        (tmp_path / "g" / "grant.json").write_bytes(data)
        (tmp_path / "g" / "grant.json.sig").write_bytes(owner.sign(data))
        with pytest.raises(FormatError, match=rf"^{name}: .*{field}") as e:
            read_grant(tmp_path / "g", rel)
        assert "manifest grant" not in str(e.value), e.value


def test_verify_says_whether_the_release_folder_is_missing_or_a_file(tmp_path):
    """Both were 'not a release folder', which for a typo in the path hid that nothing is there."""
    with pytest.raises(FormatError, match="nosuch: no such folder"):
        verify_release(tmp_path / "nosuch")
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(FormatError, match="not a release folder \\(a file\\)"):
        verify_release(tmp_path / "f")


def test_bounded_reads_name_the_kind_of_file_in_english(tmp_path):
    from anondata.files import read_bounded

    (tmp_path / "k").write_bytes(b"x" * 10)
    with pytest.raises(FormatError, match="too large for an identity file"):
        read_bounded(tmp_path / "k", "identity", 5)
    with pytest.raises(FormatError, match="too large for a manifest file"):
        read_bounded(tmp_path / "k", "manifest", 5)
