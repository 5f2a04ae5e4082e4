"""Regenerate the golden vectors in tests/vectors/ (docs/FORMAT.md, "Test vectors").

Keys come from fixed seeds, so identity files, fingerprints, the manifest and its Ed25519
signature are reproducible byte for byte. HPKE draws a fresh ephemeral key on every seal and
the `cryptography` API takes no randomness, so envelope vectors are decrypt-only: rerunning
this script changes envelopes.json, the .keys.parquet files and hence the manifest hashes.
Run from the repository root:  PYTHONPATH=. python tests/vectors/make_vectors.py
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from anondata import canonical  # noqa: E402
from anondata.envelope import (  # noqa: E402
    PAYLOAD_LABEL,
    WRAP_LABEL,
    _NONCE,
    envelope_table_bytes,
    seal_records,
)
from anondata.identity import KEM_HYBRID, KEM_X25519, Identity  # noqa: E402
from anondata.manifest import build_manifest, write_signed_manifest  # noqa: E402


def seed(label: str, n: int = 32) -> bytes:
    return hashlib.shake_256(b"anondata test vector " + label.encode()).digest(n)


ALICE = Identity(KEM_X25519, seed("alice kem"), seed("alice sign"), "alice")
BOB = Identity(KEM_HYBRID, seed("bob mlkem", 64) + seed("bob x25519"), seed("bob sign"), "bob")
DATASET_ID = seed("dataset", 16).hex()
OTHER_DATASET_ID = seed("other dataset", 16).hex()

RECORDS = [
    ("img-000", seed("key 0"), b"restore record 0: opaque bytes defined by the core"),
    ("img-001", seed("key 1"), b""),
    ("caf\u00e9/\u00e9t\u00e9 42.jpg", seed("key 2"), bytes(range(256)) * 4),
]


def write_identities() -> None:
    for ident in (ALICE, BOB):
        (HERE / f"{ident.name}.key").write_bytes(ident.to_bytes())
        (HERE / f"{ident.name}.pub").write_bytes(ident.recipient.to_bytes())


def envelope_vectors(table: pa.Table) -> list[dict]:
    """One decrypt-only vector per (record, recipient), plus negative cases."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    from anondata.identity import hpke_suite

    out = []
    rows = table.to_pylist()
    for row, (rid, key, rr) in zip(rows, RECORDS):
        for ident in (ALICE, BOB):
            (w,) = [w for w in row["wraps"] if w["recipient"] == ident.fingerprint]
            info = WRAP_LABEL + DATASET_ID.encode() + rid.encode()
            dk = hpke_suite(ident.kem).decrypt(w["sealed"], ident.hpke_private, info=info)
            pk = HKDF(hashes.SHA256(), 32, None, PAYLOAD_LABEL + DATASET_ID.encode() + rid.encode()).derive(dk)
            out.append(
                {
                    "description": f"{ident.kem} recipient {ident.name} opens {rid}",
                    "identity": f"{ident.name}.key",
                    "dataset_id": DATASET_ID,
                    "record_id": rid,
                    "hpke_info": canonical.b64e(info),
                    "sealed": canonical.b64e(w["sealed"]),
                    "payload": canonical.b64e(row["payload"]),
                    "data_key": canonical.b64e(dk),
                    "payload_key": canonical.b64e(pk),
                    "payload_nonce": canonical.b64e(_NONCE),
                    "record_key": canonical.b64e(key),
                    "restore_record": canonical.b64e(rr),
                    "expect": "ok",
                }
            )
    base = out[0]
    out.append(dict(base, description="moved to another record id", record_id="img-001",
                    expect="IntegrityError", data_key=None, payload_key=None))
    out.append(dict(base, description="moved to another dataset", dataset_id=OTHER_DATASET_ID,
                    expect="IntegrityError", data_key=None, payload_key=None))
    sealed = bytearray(canonical.b64d(base["sealed"]))
    sealed[40] ^= 1
    out.append(dict(base, description="one bit of the sealed key flipped", sealed=canonical.b64e(bytes(sealed)),
                    expect="IntegrityError", data_key=None, payload_key=None))
    payload = bytearray(canonical.b64d(base["payload"]))
    payload[-1] ^= 0x80
    out.append(dict(base, description="one bit of the payload tag flipped", payload=canonical.b64e(bytes(payload)),
                    expect="IntegrityError"))
    out.append(dict(out[1], description="sealed to bob, opened with alice's key", identity="alice.key",
                    expect="KeyError_", data_key=None, payload_key=None))
    return out


def write_release(table: pa.Table) -> None:
    rel = HERE / "release"
    shutil.rmtree(rel, ignore_errors=True)
    (rel / "data").mkdir(parents=True)
    (rel / "keys").mkdir()
    shard = pa.table(
        {
            "id": [r[0] for r in RECORDS],
            "image": [b"\x89PNG anonymized " + r[0].encode() for r in RECORDS],
        }
    )
    pq.write_table(shard, rel / "data/train-00000-of-00001.parquet", write_statistics=False)
    (rel / "keys/train-00000-of-00001.keys.parquet").write_bytes(envelope_table_bytes(table))
    records = [{"id": r[0], "split": "train", "status": "anonymized",
                "shard": "data/train-00000-of-00001.parquet"} for r in RECORDS]
    records += [
        {"id": "img-003", "split": "train", "status": "quarantined", "reason": "no face found"},
        {"id": "img-004", "split": "train", "status": "skipped", "reason": "corrupt image: not a JPEG"},
    ]
    m = build_manifest(
        rel,
        dataset_id=DATASET_ID,
        model={"name": "vector-model", "revision": "0", "sha256": seed("weights").hex()},
        settings={"scheme_version": 1, "steps": 10, "inversion_iters": 3, "eta": "0"},
        recipients=[ALICE.recipient, BOB.recipient],
        signer=ALICE.recipient,
        shard_paths=["data/train-00000-of-00001.parquet"],
        envelope_paths=["keys/train-00000-of-00001.keys.parquet"],
        records=records,
    )
    m["tool"]["version"] = "0.1.0"  # pinned so the vector does not move with releases
    write_signed_manifest(rel, m, ALICE)


def main() -> None:
    write_identities()
    table = seal_records([ALICE.recipient, BOB.recipient], DATASET_ID, RECORDS)
    (HERE / "envelopes.keys.parquet").write_bytes(envelope_table_bytes(table))
    vectors = {
        "about": "decrypt-only vectors for docs/FORMAT.md; identities are alice.key (X25519) and bob.key "
                 "(MLKEM768-X25519); all byte strings are unpadded base64url",
        "fingerprints": {"alice": ALICE.fingerprint, "bob": BOB.fingerprint},
        "vectors": envelope_vectors(table),
    }
    (HERE / "envelopes.json").write_text(json.dumps(vectors, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    write_release(table)
    sig = (HERE / "release/manifest.json.sig").read_bytes()
    print("alice", ALICE.fingerprint, "bob", BOB.fingerprint, "dataset", DATASET_ID)
    print("manifest sha256", hashlib.sha256((HERE / "release/manifest.json").read_bytes()).hexdigest())
    print("signature", sig.hex())


if __name__ == "__main__":
    main()
