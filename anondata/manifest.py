"""The signed manifest (DIR/manifest.json + .sig), grant folders, and `verify`.

The manifest is the one document a downloader has to trust: it names the model, the settings,
every shard and envelope file by SHA-256, and every input record's fate. It is canonical JSON
signed with Ed25519 over its exact bytes, so a verifier needs no parser leniency and a single
changed byte anywhere in the release is caught. Layout: docs/FORMAT.md, "Manifest".
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__, canonical
from .envelope import (
    DATASET_ID_RE,
    MAX_ENVELOPE_FILE,
    FINGERPRINT_RE,
    check_dataset_id,
    check_record_id,
    check_sealed_to,
    read_envelope_table,
    table_dataset_id,
)
from .errors import FormatError, IntegrityError, KeyError_
from .files import atomic_write, check_new_folder, new_folder, read_bounded
from .identity import KEM_SIZES, Identity, Recipient, _check_name

MANIFEST_FORMAT = "anondata-manifest"
GRANT_FORMAT = "anondata-grant"
VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.sig"
REWRAP_STAGE = ".rewrap"  # DIR/.rewrap/: an unfinished key rotation (commands/rewrap.py)
GRANT = "grant.json"
GRANT_SIG = "grant.json.sig"
GRANT_TABLE = "grant.keys.parquet"
STATUSES = ("anonymized", "quarantined", "skipped")
MAX_MANIFEST = 1 << 31

_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9_.=-]{0,199}"
PATH_RE = {
    "shards": re.compile(rf"^data/(?:{_SEGMENT}/)*{_SEGMENT}\.parquet\Z"),
    "envelopes": re.compile(rf"^keys/(?:{_SEGMENT}/)*{_SEGMENT}\.keys\.parquet\Z"),
}
SPLIT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z")
SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")
SCHEDULE_RE = re.compile(r"^[0-9a-f]{16}\Z")  # settings.schedule: backends._alphas_cumprod's id
MAX_REASON = 1000
_SCALAR = (str, int, bool, type(None))


# ---- files -------------------------------------------------------------------------


def sha256_file(path: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _parquet_rows(path: Path, what: str) -> int:
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as e:  # any pyarrow failure on a corrupt file
        raise FormatError(f"{what}: not a readable Parquet file ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None


def file_entry(release_dir, rel: str, kind: str, staged: str | None = None) -> dict:
    """{path, rows, bytes, sha256} of a listed file, computed from the file itself (or from the
    file `staged`, a relative name that will be renamed to `rel`)."""
    if not isinstance(rel, str) or not PATH_RE[kind].match(rel) or ".." in rel.split("/"):
        want = "data/NAME.parquet" if kind == "shards" else "keys/NAME.keys.parquet"
        raise FormatError(f"{kind} path {rel!r} must look like {want} (relative, no '..')")
    path = Path(release_dir) / (staged or rel)
    if not path.is_file():
        raise FormatError(f"{staged or rel}: listed file is missing")
    rows = _parquet_rows(path, rel)
    digest, size = sha256_file(path)
    return {"bytes": size, "path": rel, "rows": rows, "sha256": digest}


def _recipient_ref(r: Recipient) -> dict:
    return {"fingerprint": r.fingerprint, "kem": r.kem, "name": r.name}


# ---- building and signing ----------------------------------------------------------------


def build_manifest(
    release_dir,
    *,
    dataset_id: str,
    model: dict,
    settings: dict,
    recipients: list[Recipient],
    signer: Recipient,
    shard_paths: list[str],
    envelope_paths: list[str],
    records: list[dict],
    extra: dict | None = None,
) -> dict:
    """The manifest dict for a finished release folder (hashes and row counts computed here)."""
    check_dataset_id(dataset_id)
    shards = [file_entry(release_dir, p, "shards") for p in shard_paths]
    envelopes = [file_entry(release_dir, p, "envelopes") for p in envelope_paths]
    if not all(isinstance(r, Recipient) for r in recipients):
        raise KeyError_("recipients must be Recipients (load them with load_recipient)")
    refs = [_recipient_ref(r) for r in recipients]
    _recipient_refs(refs, "$.recipients")
    for e in envelopes:
        table = read_envelope_table(Path(release_dir) / e["path"])
        if table_dataset_id(table, e["path"]) != dataset_id:
            raise FormatError(f"{e['path']}: envelope table belongs to another dataset")
        # What verify checks: never sign a release it would refuse.
        check_sealed_to(table, refs, e["path"], "the recipients given")
    shard_index = {s["path"]: i for i, s in enumerate(shards)}
    out_records = []
    for rec in records:
        if not isinstance(rec, dict):
            raise FormatError(f"record entry {rec!r:.80} is not a dict")
        r = {"id": rec.get("id"), "split": rec.get("split"), "status": rec.get("status")}
        if r["status"] == "anonymized":
            if rec.get("shard") not in shard_index:
                raise FormatError(f"record {r['id']!r}: shard {rec.get('shard')!r} is not one of the listed shards")
            r["shard"] = shard_index[rec["shard"]]
        else:
            r["reason"] = rec.get("reason")
        unknown = set(rec) - {"id", "split", "status", "shard", "reason"}
        if unknown or (r["status"] == "anonymized" and "reason" in rec):
            raise FormatError(f"record {r['id']!r}: unexpected field(s) {sorted(unknown) or ['reason']}")
        out_records.append(r)
    counts = {s: sum(1 for r in out_records if r["status"] == s) for s in STATUSES}
    counts["total"] = len(out_records)
    if not isinstance(signer, Recipient):
        raise KeyError_("signer must be a Recipient (the signing identity's .recipient)")
    m = {
        "counts": counts,
        "dataset_id": dataset_id,
        "envelopes": envelopes,
        "extra": {} if extra is None else extra,
        "format": MANIFEST_FORMAT,
        "model": model,
        "recipients": refs,
        "records": out_records,
        "settings": settings,
        "shards": shards,
        "signer": signer.to_json(),
        "tool": {"name": "anondata", "version": __version__},
        "version": VERSION,
    }
    validate_manifest(m)
    return m


def manifest_bytes(m: dict) -> bytes:
    return canonical.dumps(m) + b"\n"


def write_signed_manifest(release_dir, m: dict, identity: Identity) -> None:
    """Sign with `identity` (must be the manifest's signer) and write manifest.json + .sig."""
    validate_manifest(m)
    if Recipient.from_json(m["signer"], "manifest.signer") != identity.recipient:
        raise KeyError_(
            f"the manifest names signer {m['signer']['name']!r} but the signing key is "
            f"{identity.recipient.label}: build the manifest with signer=identity.recipient"
        )
    data = manifest_bytes(m)
    sig = identity.sign(data)
    # Two renames cannot be one atomic step; in between, verify fails loudly (never passes wrongly).
    atomic_write(Path(release_dir) / MANIFEST, data)
    atomic_write(Path(release_dir) / SIGNATURE, sig)


# ---- parsing and validation -----------------------------------------------------------------


def _fail(path: str, msg: str):
    raise FormatError(f"{_doc(path)}{path}: {msg}")


def _doc(path: str) -> str:
    """The document a message is about: grant paths ("grant.to[0]") already say so, and
    read_grant prefixes the grant file's name."""
    return "" if path.startswith("grant") else "manifest "


def _obj(v, path, keys: set, optional: set = frozenset()):
    if not isinstance(v, dict):
        _fail(path, "expected an object")
    missing = keys - v.keys()
    extra = v.keys() - keys - optional
    if missing:
        _fail(path, f"missing field(s) {', '.join(sorted(missing))}")
    if extra:
        _fail(path, f"unknown field(s) {', '.join(sorted(extra))}")
    return v


def _int(v, path, lo=0):
    if type(v) is not int or v < lo:
        _fail(path, f"expected an integer >= {lo}")
    return v


def _str(v, path, regex=None, maxlen=None):
    if not isinstance(v, str) or (regex and not regex.match(v)) or (maxlen and len(v) > maxlen):
        _fail(path, f"invalid string {v!r:.80}")
    return v


def _scalars(v, path):
    _obj(v, path, set(), optional=set(v) if isinstance(v, dict) else set())
    for k, x in v.items():
        if not isinstance(x, _SCALAR):
            _fail(f"{path}.{k}", "values must be strings, integers, booleans or null (write floats as strings)")


def _files(v, path, kind):
    if not isinstance(v, list):
        _fail(path, "expected a list")
    seen = set()
    for i, e in enumerate(v):
        p = f"{path}[{i}]"
        _obj(e, p, {"bytes", "path", "rows", "sha256"})
        _str(e["path"], f"{p}.path", PATH_RE[kind])
        if ".." in e["path"].split("/"):
            _fail(f"{p}.path", "'..' is not allowed")
        if e["path"] in seen:
            _fail(f"{p}.path", f"{e['path']} is listed twice")
        seen.add(e["path"])
        _int(e["bytes"], f"{p}.bytes")
        _int(e["rows"], f"{p}.rows")
        _str(e["sha256"], f"{p}.sha256", SHA256_RE)


def _recipient_refs(v, path):
    """A non-empty list of {fingerprint, kem, name}, each fingerprint once: the manifest's
    `recipients` (a release nobody can restore is a writer's bug), a grant's `to`."""
    if not isinstance(v, list) or not v:
        _fail(path, "expected a non-empty list")
    fps = set()
    for i, r in enumerate(v):
        p = f"{path}[{i}]"
        _obj(r, p, {"fingerprint", "kem", "name"})
        _str(r["fingerprint"], f"{p}.fingerprint", FINGERPRINT_RE)
        if not isinstance(r["kem"], str) or r["kem"] not in KEM_SIZES:
            _fail(f"{p}.kem", f"unknown kem {r['kem']!r:.40}")
        _check_name(r["name"], f"{_doc(p)}{p}")  # the rule of .pub files and the JSON schema
        if r["fingerprint"] in fps:
            _fail(f"{p}.fingerprint", "listed twice")
        fps.add(r["fingerprint"])


def validate_manifest(m) -> None:
    """Every rule of the manifest schema (schemas/manifest.schema.json) plus cross-field checks."""
    _obj(
        m,
        "$",
        {"counts", "dataset_id", "envelopes", "extra", "format", "model", "recipients", "records",
         "settings", "shards", "signer", "tool", "version"},
    )
    if m["format"] != MANIFEST_FORMAT:
        _fail("$.format", f"is {m['format']!r:.40}, expected {MANIFEST_FORMAT!r}")
    if type(m["version"]) is not int or m["version"] != VERSION:
        _fail("$.version", f"unsupported version {m['version']!r:.20} (this anondata reads {VERSION})")
    _str(m["dataset_id"], "$.dataset_id", DATASET_ID_RE)
    _obj(m["tool"], "$.tool", {"name", "version"})
    _str(m["tool"]["name"], "$.tool.name", maxlen=100)
    _str(m["tool"]["version"], "$.tool.version", maxlen=100)
    _scalars(m["model"], "$.model")
    _obj(m["model"], "$.model", {"name", "sha256"}, optional=set(m["model"]))
    _str(m["model"]["name"], "$.model.name")
    _str(m["model"]["sha256"], "$.model.sha256", SHA256_RE)
    _scalars(m["settings"], "$.settings")
    if "schedule" in m["settings"]:  # restore compares it: a value no writer makes is a broken manifest
        _str(m["settings"]["schedule"], "$.settings.schedule", SCHEDULE_RE)
    if not isinstance(m["extra"], dict):
        _fail("$.extra", "expected an object")
    try:
        Recipient.from_json(m["signer"], "manifest $.signer")
    except FormatError as e:
        raise FormatError(str(e)) from None
    _recipient_refs(m["recipients"], "$.recipients")
    _files(m["shards"], "$.shards", "shards")
    _files(m["envelopes"], "$.envelopes", "envelopes")
    if not isinstance(m["records"], list):
        _fail("$.records", "expected a list")
    ids = set()
    per_shard = [0] * len(m["shards"])
    counts = dict.fromkeys(STATUSES, 0)
    for i, r in enumerate(m["records"]):
        p = f"$.records[{i}]"
        if not isinstance(r, dict) or r.get("status") not in STATUSES:
            _fail(f"{p}.status", f"must be one of {', '.join(STATUSES)}")
        if r["status"] == "anonymized":
            _obj(r, p, {"id", "split", "status", "shard"})
            _int(r["shard"], f"{p}.shard")
            if r["shard"] >= len(per_shard):
                _fail(f"{p}.shard", f"index {r['shard']} but only {len(per_shard)} shards")
            per_shard[r["shard"]] += 1
        else:
            _obj(r, p, {"id", "split", "status", "reason"})
            _str(r["reason"], f"{p}.reason", maxlen=MAX_REASON)
            if not r["reason"]:
                _fail(f"{p}.reason", "a quarantined or skipped record needs a reason")
        try:
            check_record_id(r["id"])
        except FormatError as e:
            _fail(f"{p}.id", str(e))
        _str(r["split"], f"{p}.split", SPLIT_RE)
        if r["id"] in ids:
            _fail(f"{p}.id", f"record {r['id']!r} is listed twice")
        ids.add(r["id"])
        counts[r["status"]] += 1
    counts["total"] = len(m["records"])
    _obj(m["counts"], "$.counts", set(counts))
    for k in counts:  # before comparing: true == 1 in Python
        _int(m["counts"][k], f"$.counts.{k}")
    if m["counts"] != counts:
        _fail("$.counts", f"{m['counts']} does not match the records ({counts})")
    for i, (s, n) in enumerate(zip(m["shards"], per_shard)):
        if s["rows"] != n:
            _fail(f"$.shards[{i}].rows", f"{s['path']} has {s['rows']} rows but {n} anonymized records name it")
    if sum(e["rows"] for e in m["envelopes"]) != counts["anonymized"]:
        _fail("$.envelopes", f"envelope rows ({sum(e['rows'] for e in m['envelopes'])}) != anonymized records ({counts['anonymized']})")


def parse_manifest(data: bytes, what: str = MANIFEST) -> dict:
    """Strict: canonical JSON + one newline, then the full schema."""
    if not isinstance(data, (bytes, bytearray)) or not data.endswith(b"\n") or data.endswith(b"\n\n"):
        raise FormatError(f"{what}: expected canonical JSON followed by exactly one newline")
    m = canonical.loads(bytes(data[:-1]), what)
    validate_manifest(m)
    return m


def read_manifest(release_dir) -> dict:
    """Parse DIR/manifest.json strictly (the signature is checked by verify_release)."""
    return parse_manifest(read_bounded(Path(release_dir) / MANIFEST, "manifest", MAX_MANIFEST))


def _check_signature(data: bytes, sig: bytes, embedded: dict, signer: Recipient | None, what: str) -> Recipient:
    """Check `sig` with the key the document names; with `signer`, that key must also be `signer`."""
    try:
        named = Recipient.from_json(embedded, f"{what} signer")
    except FormatError as e:
        raise FormatError(str(e)) from None
    if signer is not None and named != signer:
        raise IntegrityError(f"{what} is signed by {named.label}, not by the expected signer {signer.label}")
    named.verify(sig, data, what)
    return named


# ---- verify ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifiedRelease:
    """A release checked by `open_release`: the manifest and envelope tables are the parsed
    forms of the very bytes whose signature and hashes were checked, so a file swapped on disk
    after the check is never used."""

    root: Path
    manifest: dict
    summary: dict
    envelopes: list | None  # envelope tables; None for a public copy (no keys/) or when not asked for


def verify_release(release_dir, signer: Recipient | None = None) -> dict:
    """Signature, hashes, row counts, schemas. Raises naming the first failure; returns a summary.
    Without `signer` it proves integrity only (whoever can write the folder can re-sign it)."""
    return open_release(release_dir, signer, keep_envelopes=False).summary


def open_release(release_dir, signer: Recipient | None, *, keep_envelopes: bool = True) -> VerifiedRelease:
    """Verify a release (docs/FORMAT.md, "Verifying a release") and return what was checked.

    `signer` is required, not defaulted: HPKE base mode lets anyone seal to a public key, so
    envelopes are only as authentic as the manifest signature, and that only proves who signed
    when the key is pinned. Pass None only on purpose (the CLI's `--any-signer`)."""
    root = Path(release_dir)
    if not root.is_dir():
        raise FormatError(f"{root}: {'not a release folder (a file)' if root.exists() else 'no such folder'}")
    from .job.journal import Journal

    if Journal(root).exists():  # else "no such manifest signature file", or a manifest the job will rewrite
        raise FormatError(f"{root}: an unfinished anonymize job (interrupted?); finish it with the same "
                          "`anondata anonymize` command and --resume")
    if (root / GRANT).is_file() and not (root / MANIFEST).exists():  # else "no such manifest file"
        raise FormatError(f"{root}: a grant folder, not a release: give the release folder, and this one "
                          "as --keys (restore, eval)")
    try:
        return _open_release(root, signer, keep_envelopes)
    except (IntegrityError, FormatError) as e:
        if (root / REWRAP_STAGE).is_dir():  # killed between its renames: some files are new, some old
            raise type(e)(f"{e}; an interrupted rewrap is staged in {REWRAP_STAGE}/: run the same `anondata "
                          "rewrap` command again to finish it") from None
        raise


def _open_release(root: Path, signer: Recipient | None, keep_envelopes: bool) -> VerifiedRelease:
    data = read_bounded(root / MANIFEST, "manifest", MAX_MANIFEST)
    sig = read_bounded(root / SIGNATURE, "manifest signature", 1024)
    if not data.endswith(b"\n") or data.endswith(b"\n\n"):
        raise FormatError(f"{MANIFEST}: expected canonical JSON followed by exactly one newline")
    raw = canonical.loads(data[:-1], MANIFEST)
    if not isinstance(raw, dict) or "signer" not in raw:
        raise FormatError(f"{MANIFEST}: no signer field")
    # Signature first: nothing below runs on bytes that the signer did not sign.
    named = _check_signature(data, sig, raw["signer"], signer, MANIFEST)
    m = parse_manifest(data)
    dataset_id = m["dataset_id"]

    for s in m["shards"]:
        _check_file(root, s, f"shard {s['path']}")
    envelopes_checked = (root / "keys").is_dir()
    tables = _envelope_tables(root, m, str(root)) if envelopes_checked else None
    listed = {s["path"] for s in m["shards"]} | {e["path"] for e in m["envelopes"]}
    for sub in ("data", "keys"):
        d = root / sub
        if d.is_dir():
            for f in sorted(d.rglob("*")):
                rel = f.relative_to(root).as_posix()
                # anything but a folder: a FIFO, socket or device there is a file the spec does not allow
                if (f.is_symlink() or not f.is_dir()) and rel not in listed:
                    raise IntegrityError(f"{rel}: file is not listed in the manifest (leftover or added?)")
    summary = {
        "dataset_id": dataset_id,
        "shards": len(m["shards"]),
        "envelope_files": len(m["envelopes"]),
        "envelopes_checked": envelopes_checked,
        "records": m["counts"]["total"],
        "counts": m["counts"],
        "signer": named.fingerprint,
        "signer_name": named.name,
        "signer_pinned": signer is not None,
        "manifest_sha256": hashlib.sha256(data).hexdigest(),
    }
    return VerifiedRelease(root, m, summary, tables if keep_envelopes else None)


def _envelope_tables(base: Path, m: dict, where: str) -> list:
    """The manifest's envelope files under `base` (a release folder, or the folder above a copy
    of its keys/), each read once: size, SHA-256 and rows checked on the bytes that are then
    parsed; the strict table checks; the dataset id; every row sealed to exactly the manifest's
    recipients; each anonymized record in exactly one file."""
    anonymized = {r["id"] for r in m["records"] if r["status"] == "anonymized"}
    seen: set[str] = set()
    tables = []
    for e in m["envelopes"]:
        what = f"envelope file {e['path']}"
        table = read_envelope_table(_read_checked(base, e, what, where))
        if table_dataset_id(table, what) != m["dataset_id"]:
            raise IntegrityError(f"{what}: belongs to another dataset")
        check_sealed_to(table, m["recipients"], what)
        for rid in table.column("record_id").to_pylist():
            if rid not in anonymized:
                raise IntegrityError(f"{what}: record {rid!r} is not an anonymized record of this manifest")
            if rid in seen:
                raise IntegrityError(f"{what}: record {rid!r} has envelopes in two files")
            seen.add(rid)
        tables.append(table)
    if seen != anonymized:
        missing = sorted(anonymized - seen)[:5]
        raise IntegrityError(f"anonymized record(s) without an envelope: {missing}")
    return tables


def _check_file(root: Path, entry: dict, what: str) -> None:
    """A shard: streamed (shards can be large); restore re-checks each photo it reads against
    the hash inside its authenticated envelope, so a later swap is caught there."""
    path = root / entry["path"]
    if path.is_symlink() or not path.is_file():
        raise IntegrityError(f"{what}: missing (or not a regular file)")
    digest, size = sha256_file(path)
    _check_entry(entry, what, size, digest, lambda: _parquet_rows(path, what))


def _read_checked(root: Path, entry: dict, what: str, where: str, doc: str = "the manifest") -> bytes:
    """A listed envelope file's bytes, read once and checked against its entry."""
    path = root / entry["path"]
    if path.is_symlink() or not path.is_file():
        raise IntegrityError(f"{what}: missing from {where} (or not a regular file)")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise IntegrityError(f"{what}: {size} bytes, {doc} says {entry['bytes']}")
    if size > MAX_ENVELOPE_FILE:
        raise IntegrityError(f"{what}: too large for an envelope table ({size} bytes)")
    data = read_bounded(path, "envelope", size, IntegrityError)  # a file grown since the stat fails here
    _check_entry(entry, what, len(data), hashlib.sha256(data).hexdigest(), lambda: _parquet_rows(pa.BufferReader(data), what), doc)
    return data


def _check_entry(entry: dict, what: str, size: int, digest: str, rows, doc: str = "the manifest") -> None:
    """Size, then hash, then (only for bytes the manifest vouches for) the Parquet row count."""
    if size != entry["bytes"]:
        raise IntegrityError(f"{what}: {size} bytes, {doc} says {entry['bytes']}")
    if digest != entry["sha256"]:
        raise IntegrityError(f"{what}: SHA-256 does not match {doc} (file changed)")
    n = rows()
    if n != entry["rows"]:
        raise IntegrityError(f"{what}: {n} rows, {doc} says {entry['rows']}")


# ---- grant folders ----------------------------------------------------------------------------


def write_grant(grant_dir, table, identity: Identity, to: list[Recipient], dataset_id: str, release_manifest_sha256: str) -> dict:
    """GRANT_DIR/grant.keys.parquet + grant.json (+ .sig, by the granting identity)."""
    final = check_new_folder(grant_dir, "grant --out", KeyError_)
    with new_folder(final) as out:  # a rerun after an interruption finds no half-written GRANT_DIR
        return _write_grant_files(out, table, identity, to, dataset_id, release_manifest_sha256)


def _write_grant_files(out: Path, table, identity: Identity, to: list[Recipient], dataset_id: str,
                       release_manifest_sha256: str) -> dict:
    from .envelope import write_envelope_table

    refs = [_recipient_ref(r) for r in to]
    check_sealed_to(table, refs, GRANT_TABLE, "the grant")  # as its readers will
    write_envelope_table(out / GRANT_TABLE, table)
    digest, size = sha256_file(out / GRANT_TABLE)
    doc = {
        "dataset_id": check_dataset_id(dataset_id),
        "envelopes": [{"bytes": size, "path": GRANT_TABLE, "rows": table.num_rows, "sha256": digest}],
        "format": GRANT_FORMAT,
        "granted_by": identity.recipient.to_json(),
        "manifest_sha256": release_manifest_sha256,
        "records": table.column("record_id").to_pylist(),
        "to": refs,
        "version": VERSION,
    }
    validate_grant(doc)
    data = canonical.dumps(doc) + b"\n"
    atomic_write(out / GRANT_SIG, identity.sign(data))
    atomic_write(out / GRANT, data)
    return doc


def validate_grant(g) -> None:
    _obj(g, "grant", {"dataset_id", "envelopes", "format", "granted_by", "manifest_sha256", "records", "to", "version"})
    if g["format"] != GRANT_FORMAT:
        _fail("grant.format", f"is {g['format']!r:.40}, expected {GRANT_FORMAT!r}")
    if type(g["version"]) is not int or g["version"] != VERSION:
        _fail("grant.version", f"unsupported version {g['version']!r:.20}")
    _str(g["dataset_id"], "grant.dataset_id", DATASET_ID_RE)
    _str(g["manifest_sha256"], "grant.manifest_sha256", SHA256_RE)
    if not isinstance(g["envelopes"], list) or len(g["envelopes"]) != 1:
        _fail("grant.envelopes", "expected exactly one file")
    e = _obj(g["envelopes"][0], "grant.envelopes[0]", {"bytes", "path", "rows", "sha256"})
    if e["path"] != GRANT_TABLE:
        _fail("grant.envelopes[0].path", f"must be {GRANT_TABLE}")
    _int(e["bytes"], "grant.envelopes[0].bytes")
    _int(e["rows"], "grant.envelopes[0].rows")
    _str(e["sha256"], "grant.envelopes[0].sha256", SHA256_RE)
    if not isinstance(g["records"], list) or len(set(map(str, g["records"]))) != len(g["records"]) or len(g["records"]) != e["rows"]:
        _fail("grant.records", "must list each granted record once (one per envelope row)")
    for i, rid in enumerate(g["records"]):
        try:
            check_record_id(rid)
        except FormatError as e:
            _fail(f"grant.records[{i}]", str(e))
    _recipient_refs(g["to"], "grant.to")


def read_grant(grant_dir, release: VerifiedRelease) -> tuple[dict, list]:
    """Verify a grant folder against the verified release it is for and return (grant doc,
    [envelope table]).

    Who may grant: a recipient of the release (its manifest, signed by the pinned signer, lists
    them by fingerprint, which covers their signing key). Only a recipient can open the
    envelopes a grant re-seals, so this authenticates the grant without a second pinned key."""
    root = Path(grant_dir)
    name = str(root / GRANT)  # messages name the folder: a grantee may hold several
    data = read_bounded(root / GRANT, "grant", 1 << 30)
    sig = read_bounded(root / GRANT_SIG, "grant signature", 1024)
    if not data.endswith(b"\n") or data.endswith(b"\n\n"):
        raise FormatError(f"{name}: expected canonical JSON followed by exactly one newline")
    g = canonical.loads(data[:-1], name)
    if not isinstance(g, dict) or "granted_by" not in g:
        raise FormatError(f"{name}: no granted_by field")
    named = _check_signature(data, sig, g["granted_by"], None, name)
    m = release.manifest
    if named.fingerprint not in {r["fingerprint"] for r in m["recipients"]}:
        raise IntegrityError(
            f"{name}: signed by {named.label}, who is not a recipient of this release "
            f"(its manifest lists {', '.join(r['fingerprint'] for r in m['recipients'])}); only a recipient can grant"
        )
    try:
        validate_grant(g)
    except FormatError as e:
        raise FormatError(f"{name}: {e}") from None
    if g["dataset_id"] != m["dataset_id"]:
        raise IntegrityError(f"{name}: made for dataset {g['dataset_id']}, not this release ({m['dataset_id']})")
    anonymized = {r["id"] for r in m["records"] if r["status"] == "anonymized"}
    stray = [r for r in g["records"] if r not in anonymized]
    if stray:
        raise IntegrityError(f"{name}: record(s) {', '.join(map(repr, stray[:5]))} are not anonymized records of this release")
    e = g["envelopes"][0]
    table = read_envelope_table(_read_checked(root, e, f"grant file {e['path']}", str(root), doc=name))
    if table_dataset_id(table, GRANT_TABLE) != g["dataset_id"] or table.column("record_id").to_pylist() != g["records"]:
        raise IntegrityError(f"{root / GRANT_TABLE}: does not match {name}")
    check_sealed_to(table, g["to"], str(root / GRANT_TABLE), name)
    return g, [table]


def release_envelopes(release: VerifiedRelease, keys=None) -> list:
    """The envelope tables to open records of a verified release with: its own keys/ (default),
    a grant folder (`read_grant`), or another folder holding a copy of its keys/ (each file
    checked against this manifest). What `restore --keys` calls; restore MUST NOT read
    envelopes any other way (HPKE base mode: anyone can seal to a public key)."""
    if keys is None:
        if release.envelopes is None:
            raise KeyError_(f"{release.root}: no keys/ folder (a public copy): use the private copy of the release "
                            "(restore and eval also take --keys KEYS_OR_GRANT_DIR)")
        return release.envelopes
    p = Path(keys)
    if (p / GRANT).exists():
        return read_grant(p, release)[1]
    base = p.parent if p.name == "keys" else p
    if not (base / "keys").is_dir():
        raise FormatError(f"{p}: neither a grant folder (grant.json) nor a keys/ folder or a folder holding one")
    return _envelope_tables(base, release.manifest, str(p))


__all__ = [
    "VerifiedRelease",
    "build_manifest",
    "open_release",
    "parse_manifest",
    "read_grant",
    "read_manifest",
    "release_envelopes",
    "validate_manifest",
    "verify_release",
    "write_grant",
    "write_signed_manifest",
]
