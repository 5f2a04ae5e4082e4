"""Identity (NAME.key) and recipient (NAME.pub) files: generation, strict parsing, file modes."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anondata import canonical
from anondata.errors import FormatError, IntegrityError, KeyError_
from anondata.identity import (
    KEM_HYBRID,
    KEM_X25519,
    Identity,
    Recipient,
    generate_identity,
    load_identity,
    load_recipient,
)

VECTORS = Path(__file__).parent / "vectors"


def vector_identity(tmp_path, name):
    dst = tmp_path / f"{name}.key"
    shutil.copy(VECTORS / f"{name}.key", dst)
    os.chmod(dst, 0o600)
    return load_identity(dst)


@pytest.mark.parametrize("pq", [False, True])
def test_generate_save_load(tmp_path, pq):
    ident = generate_identity(pq=pq, name="alice")
    ident.save(tmp_path / "alice.key", tmp_path / "alice.pub")
    assert stat.S_IMODE(os.stat(tmp_path / "alice.key").st_mode) == 0o600
    again = load_identity(tmp_path / "alice.key")
    pub = load_recipient(tmp_path / "alice.pub")
    assert again.fingerprint == ident.fingerprint == pub.fingerprint
    assert pub == ident.recipient and pub.kem == (KEM_HYBRID if pq else KEM_X25519)
    sig = again.sign(b"msg")
    pub.verify(sig, b"msg", "test")
    with pytest.raises(IntegrityError):
        pub.verify(sig, b"msh", "test")
    assert len(pub.kem_public) == (1216 if pq else 32)
    # secrets never leak through repr
    assert canonical.b64e(ident._kem_secret) not in repr(ident)


def test_refuses_overwrite(tmp_path):
    generate_identity().save(tmp_path / "a.key", tmp_path / "a.pub")
    before = (tmp_path / "a.key").read_bytes()
    with pytest.raises(KeyError_, match="exists"):
        generate_identity().save(tmp_path / "a.key", tmp_path / "b.pub")
    with pytest.raises(KeyError_, match="exists"):
        generate_identity().save(tmp_path / "c.key", tmp_path / "a.pub")
    assert (tmp_path / "a.key").read_bytes() == before
    assert not (tmp_path / "c.key").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.key", "a.pub"]  # no temp files left


def _record_fsyncs(tmp_path, monkeypatch) -> list:
    """Record (path, names in tmp_path when it is tmp_path) for every fsync from now on."""
    real, synced = os.fsync, []

    def fsync(fd):
        where = Path(os.readlink(f"/proc/self/fd/{fd}"))
        synced.append((where, sorted(p.name for p in tmp_path.iterdir()) if where == tmp_path else None))
        return real(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the fsynced file")
    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_save_makes_the_new_key_files_durable(tmp_path, monkeypatch):
    """keygen says 'wrote NAME.key' once the files are linked into their folder: without an fsync
    of the folder a power cut soon after could lose the key, while NAME.pub was already given out
    and releases sealed to it."""
    synced = _record_fsyncs(tmp_path, monkeypatch)
    generate_identity().save(tmp_path / "a.key", tmp_path / "a.pub")
    folder = [names for where, names in synced if where == tmp_path]
    assert folder and "a.key" in folder[0] and "a.pub" in folder[-1], synced


def test_save_into_a_new_folder_makes_the_folder_durable(tmp_path, monkeypatch):
    """keygen keys/alice makes keys/: its entry lives in tmp_path, which must be fsynced after it
    was made, else a power cut could lose the folder with the key fsynced inside it."""
    synced = _record_fsyncs(tmp_path, monkeypatch)
    generate_identity().save(tmp_path / "keys" / "a.key", tmp_path / "keys" / "a.pub")
    assert any(where == tmp_path and "keys" in names for where, names in synced), synced


def test_refuses_readable_key(tmp_path):
    generate_identity().save(tmp_path / "a.key", tmp_path / "a.pub")
    os.chmod(tmp_path / "a.key", 0o640)
    with pytest.raises(KeyError_, match="chmod 600"):
        load_identity(tmp_path / "a.key")


def test_vectors_fingerprints(tmp_path):
    fps = json.loads((VECTORS / "envelopes.json").read_text())["fingerprints"]
    alice, bob = vector_identity(tmp_path, "alice"), vector_identity(tmp_path, "bob")
    assert alice.kem == KEM_X25519 and bob.kem == KEM_HYBRID
    assert alice.fingerprint == fps["alice"] == load_recipient(VECTORS / "alice.pub").fingerprint
    assert bob.fingerprint == fps["bob"] == load_recipient(VECTORS / "bob.pub").fingerprint
    # files are exactly what the library writes (canonical)
    assert (VECTORS / "alice.key").read_bytes() == alice.to_bytes()
    assert (VECTORS / "bob.pub").read_bytes() == bob.recipient.to_bytes()


def _mutations(obj):
    yield "extra field", dict(obj, extra=1)
    yield "missing field", {k: v for k, v in obj.items() if k != "name"}
    yield "version 2", dict(obj, version=2)
    yield "version string", dict(obj, version="1")
    yield "unknown kem", dict(obj, kem="P256")
    yield "wrong kem for key", dict(obj, kem=KEM_HYBRID)
    yield "control char in name", dict(obj, name="a\nb")
    for field in ("kem_public", "sign_public", "kem_secret", "sign_secret"):
        if field in obj:
            raw = canonical.b64d(obj[field])
            yield f"{field} short", dict(obj, **{field: canonical.b64e(raw[:-1])})
            yield f"{field} padded", dict(obj, **{field: obj[field] + "="})


@pytest.mark.parametrize("kind", ["key", "pub"])
def test_strict_parsing(tmp_path, kind):
    src = json.loads((VECTORS / f"alice.{kind}").read_text())
    loader = load_identity if kind == "key" else load_recipient
    for what, obj in _mutations(src):
        path = tmp_path / f"m.{kind}"
        path.write_bytes(canonical.dumps(obj) + b"\n")
        os.chmod(path, 0o600)
        with pytest.raises(KeyError_) as e:
            loader(path)
            pytest.fail(what)
        assert str(path) in str(e.value), f"{what}: the error does not name the file: {e.value}"
    good = (VECTORS / f"alice.{kind}").read_bytes()
    for bad in (good[:-1], good + b"\n", good[:-1] + b" \n", b" " + good, good[: len(good) // 2],
                b"", b"\x00" * 64, json.dumps(src, indent=1).encode() + b"\n", os.urandom(300)):
        path = tmp_path / f"b.{kind}"
        path.write_bytes(bad)
        os.chmod(path, 0o600)
        with pytest.raises(KeyError_, match=re.escape(str(path))):
            loader(path)


def test_wrong_file_kind_hints(tmp_path):
    shutil.copy(VECTORS / "alice.pub", tmp_path / "a.pub")
    os.chmod(tmp_path / "a.pub", 0o600)
    with pytest.raises(KeyError_, match="public key"):
        load_identity(tmp_path / "a.pub")
    with pytest.raises(KeyError_, match="private .key"):
        load_recipient(VECTORS / "alice.key")
    with pytest.raises(KeyError_, match="no such"):
        load_recipient(tmp_path / "missing.pub")


def _verifies(key, signature: bytes, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(signature, message)
        return True
    except InvalidSignature:
        return False


def test_degenerate_public_keys_are_refused_at_load(tmp_path):
    import re

    from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

    from anondata.identity import _LOW_ORDER_U, _SMALL_ORDER_Y

    p = 2**255 - 19

    def le(n: int) -> bytes:
        return n.to_bytes(32, "little")

    # The blocklists hold what they claim, checked with the primitives: X25519 refuses the all-zero
    # secret a low-order key gives; a small-order Ed25519 key accepts the signature (R = neutral, S = 0).
    for u in _LOW_ORDER_U:
        with pytest.raises(ValueError):
            x25519.X25519PrivateKey.generate().exchange(x25519.X25519PublicKey.from_public_bytes(le(u)))
    for y in _SMALL_ORDER_Y:
        key = ed25519.Ed25519PublicKey.from_public_bytes(le(y))
        assert any(_verifies(key, le(1) + bytes(32), bytes([m])) for m in range(64)), y
    alice, bob = (json.loads((VECTORS / f"{n}.pub").read_text()) for n in ("alice", "bob"))
    a_kem, b_kem = canonical.b64d(alice["kem_public"]), canonical.b64d(bob["kem_public"])
    cases = [(alice, "sign_public", le(y | s << 255)) for y in _SMALL_ORDER_Y | {p, p + 1, p + 7, 2**255 - 1} for s in (0, 1)]
    cases += [(alice, "kem_public", le(u)) for u in _LOW_ORDER_U | {p, p + 1, 2**255 - 1}]
    cases += [(alice, "kem_public", a_kem[:31] + bytes([a_kem[31] | 0x80])),  # bit 255 set
              (bob, "kem_public", b_kem[:-32] + le(p - 1))]  # the hybrid's X25519 part
    path = tmp_path / "degenerate.pub"
    for obj, field, raw in cases:
        path.write_bytes(canonical.dumps(dict(obj, **{field: canonical.b64e(raw)})) + b"\n")
        with pytest.raises(KeyError_, match=re.escape(str(path)) + f".*{field} is not a valid public key"):
            load_recipient(path)
            pytest.fail(f"{field} {raw.hex()}")
    with pytest.raises(FormatError, match="kem_public is not a valid public key"):
        Recipient(KEM_X25519, bytes(32), canonical.b64d(alice["sign_public"]), "zero")
    assert load_recipient(VECTORS / "alice.pub").name == "alice" and load_recipient(VECTORS / "bob.pub").name == "bob"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400))
def test_fuzz_recipient_parser(data):
    try:
        Recipient.from_bytes(data)
    except FormatError:
        pass
    try:
        Identity.from_bytes(data)
    except FormatError:
        pass


def test_every_bit_flip_of_key_file_is_rejected_or_different():
    """Every bit of the file, not a sample of its first 192 bytes (about a second)."""
    good = (VECTORS / "alice.key").read_bytes()
    accepted = 0
    for bit in range(len(good) * 8):
        bad = bytearray(good)
        bad[bit // 8] ^= 1 << (bit % 8)
        try:
            ident = Identity.from_bytes(bytes(bad))
        except FormatError:
            continue
        # the only accepted flips are inside base64 payloads and yield a different key or name
        assert ident.to_bytes() == bytes(bad) and bytes(bad) != good, bit
        accepted += 1
    assert 0 < accepted < len(good) * 8 // 2  # most flips break the canonical form or the checks


@pytest.mark.parametrize("kind", ["key", "pub"])
def test_a_bad_version_is_quoted_bounded(tmp_path, kind):
    """The version of a key file is echoed in its error, but not 60 kB of it."""
    obj = dict(json.loads((VECTORS / f"alice.{kind}").read_text()), version="1" * 60_000)
    path = tmp_path / f"v.{kind}"
    path.write_bytes(canonical.dumps(obj) + b"\n")
    os.chmod(path, 0o600)
    with pytest.raises(KeyError_, match="unsupported version") as e:
        (load_identity if kind == "key" else load_recipient)(path)
    assert len(str(e.value)) < 300 + len(str(path)), str(e.value)[:400]
