"""Envelopes: each record's 32-byte key and restore record, sealed to the people who may restore it.

Per record a fresh 32-byte data key (DK) encrypts the payload once (ChaCha20-Poly1305 under a
key derived from DK, dataset id and record id); DK is then HPKE-sealed to each recipient with an
`info` that binds format version, dataset id and record id. So the (possibly large) payload is
stored once whatever the number of recipients, and grant/rewrap only re-seal 32-byte DKs and copy
payload bytes untouched. Layouts: docs/FORMAT.md, "Envelopes" and "Envelope table".
"""

from __future__ import annotations

import io
import re
import secrets
from pathlib import Path
from typing import Iterable, Sized

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import canonical
from .errors import FormatError, IntegrityError, KeyError_
from .files import atomic_write
from .identity import KEM_SIZES, Identity, Recipient, hpke_suite

TABLE_FORMAT = "anondata-envelopes"
VERSION = 1
PAYLOAD_VERSION = 1

WRAP_LABEL = b"anondata/wrap/v1\x00"
PAYLOAD_LABEL = b"anondata/payload/v1\x00"
_NONCE = bytes(12)  # each payload key encrypts exactly one message (fresh DK per record)
DK_LEN = 32
RECORD_KEY_LEN = 32
TAG_LEN = 16
MIN_PAYLOAD = 1 + RECORD_KEY_LEN + TAG_LEN
MAX_RECORD_ID = 1024
MAX_ENVELOPE_FILE = 1 << 36

WRAP_LENGTHS = {kem: sizes[2] + DK_LEN + TAG_LEN for kem, sizes in KEM_SIZES.items()}

DATASET_ID_RE = re.compile(r"^[0-9a-f]{32}\Z")
FINGERPRINT_RE = re.compile(r"^[0-9a-f]{32}\Z")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

WRAP_TYPE = pa.struct(
    [pa.field("recipient", pa.string(), nullable=False), pa.field("sealed", pa.binary(), nullable=False)]
)
_BASE_SCHEMA = pa.schema(
    [
        pa.field("record_id", pa.string(), nullable=False),
        pa.field("payload", pa.binary(), nullable=False),
        pa.field("wraps", pa.list_(pa.field("element", WRAP_TYPE, nullable=False)), nullable=False),
    ]
)
METADATA_KEY = b"anondata"


def envelope_schema(dataset_id: str) -> pa.Schema:
    """The Arrow schema of an envelope table for `dataset_id` (metadata included)."""
    check_dataset_id(dataset_id)
    meta = canonical.dumps({"dataset_id": dataset_id, "format": TABLE_FORMAT, "version": VERSION})
    return _BASE_SCHEMA.with_metadata({METADATA_KEY: meta})


def check_dataset_id(dataset_id) -> str:
    if not isinstance(dataset_id, str) or not DATASET_ID_RE.match(dataset_id):
        raise FormatError(f"dataset id {dataset_id!r:.60} is not 32 lowercase hex characters")
    return dataset_id


def check_record_id(record_id) -> str:
    if (
        not isinstance(record_id, str)
        or not record_id
        or _CONTROL_RE.search(record_id)
        or len(record_id.encode("utf-8", "surrogatepass")) > MAX_RECORD_ID
    ):
        raise FormatError(
            f"record id {record_id!r:.100}: must be a non-empty string of at most {MAX_RECORD_ID} UTF-8 "
            "bytes without control characters"
        )
    try:
        record_id.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"record id {record_id!r:.100}: not valid Unicode") from None
    return record_id


def _binding(label: bytes, dataset_id: str, record_id: str) -> bytes:
    # dataset_id is fixed-length ASCII, so label || dataset_id || record_id is unambiguous.
    return label + dataset_id.encode("ascii") + record_id.encode("utf-8")


def _payload_aead(dk: bytes, dataset_id: str, record_id: str) -> ChaCha20Poly1305:
    key = HKDF(hashes.SHA256(), 32, salt=None, info=_binding(PAYLOAD_LABEL, dataset_id, record_id)).derive(dk)
    return ChaCha20Poly1305(key)


def encode_payload(record_key: bytes, restore_record: bytes) -> bytes:
    """Envelope plaintext: version byte 0x01 || record key (32) || restore record bytes."""
    return bytes([PAYLOAD_VERSION]) + record_key + restore_record


def decode_payload(data: bytes, record_id: str = "?") -> tuple[bytes, bytes]:
    """Strict inverse of `encode_payload`."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < 1 + RECORD_KEY_LEN:
        raise FormatError(f"record {record_id!r}: envelope plaintext is too short")
    if data[0] != PAYLOAD_VERSION:
        raise FormatError(f"record {record_id!r}: envelope plaintext version {data[0]} is not {PAYLOAD_VERSION}")
    return bytes(data[1 : 1 + RECORD_KEY_LEN]), bytes(data[1 + RECORD_KEY_LEN :])


def _check_recipients(recipients) -> list[Recipient]:
    recipients = list(recipients)
    if not recipients:
        raise KeyError_("no recipients: pass at least one public key (--to NAME.pub)")
    for r in recipients:
        if not isinstance(r, Recipient):
            raise KeyError_(f"{r!r} is not a Recipient (load it with load_recipient)")
    fps = [r.fingerprint for r in recipients]
    if len(set(fps)) != len(fps):
        raise KeyError_("the same recipient is listed twice")
    return recipients


def _wrap(dk: bytes, recipients: list[Recipient], dataset_id: str, record_id: str) -> list[dict]:
    info = _binding(WRAP_LABEL, dataset_id, record_id)
    out = []
    for r in recipients:
        try:
            sealed = hpke_suite(r.kem).encrypt(dk, r.hpke_public, info=info)
        except ValueError as e:
            raise KeyError_(f"cannot seal to recipient {r.label}: {e}") from None
        out.append({"recipient": r.fingerprint, "sealed": sealed})
    return out


def _build_table(rows: list[tuple[str, bytes, list[dict]]], dataset_id: str) -> pa.Table:
    schema = envelope_schema(dataset_id)
    return pa.Table.from_arrays(
        [
            pa.array([r[0] for r in rows], pa.string()),
            pa.array([r[1] for r in rows], pa.binary()),
            pa.array([r[2] for r in rows], schema.field("wraps").type),
        ],
        schema=schema,
    )


def seal_records(recipients: list[Recipient], dataset_id: str, items) -> pa.Table:
    """items: (record_id, record_key_32, restore_record_bytes). One row per record."""
    recipients = _check_recipients(recipients)
    check_dataset_id(dataset_id)
    rows, seen = [], set()
    for item in items:
        try:
            record_id, key, record = item
        except (TypeError, ValueError):
            # Type and length only: the item holds a record key, which must never reach a message.
            size = f" of length {len(item)}" if isinstance(item, Sized) else ""
            raise FormatError(
                f"expected (record_id, key, restore_record), got a {type(item).__name__}{size}"
            ) from None
        check_record_id(record_id)
        if record_id in seen:
            raise FormatError(f"record {record_id!r} is listed twice")
        seen.add(record_id)
        if not isinstance(key, bytes) or len(key) != RECORD_KEY_LEN:
            raise FormatError(f"record {record_id!r}: the record key must be 32 bytes")
        if not isinstance(record, (bytes, bytearray)):
            raise FormatError(f"record {record_id!r}: the restore record must be bytes")
        dk = secrets.token_bytes(DK_LEN)
        payload = _payload_aead(dk, dataset_id, record_id).encrypt(_NONCE, encode_payload(key, bytes(record)), None)
        rows.append((record_id, payload, _wrap(dk, recipients, dataset_id, record_id)))
    return _build_table(rows, dataset_id)


# ---- reading / validation -------------------------------------------------------


def table_dataset_id(table: pa.Table, what: str = "envelope table") -> str:
    meta = table.schema.metadata or {}
    if set(meta) != {METADATA_KEY}:
        raise FormatError(f"{what}: schema metadata must hold exactly the key 'anondata'")
    obj = canonical.loads(meta[METADATA_KEY], f"{what}: metadata")
    if not isinstance(obj, dict) or set(obj) != {"dataset_id", "format", "version"}:
        raise FormatError(f"{what}: metadata must be {{dataset_id, format, version}}")
    if obj["format"] != TABLE_FORMAT:
        raise FormatError(f"{what}: format is {obj['format']!r:.40}, expected {TABLE_FORMAT!r}")
    if type(obj["version"]) is not int or obj["version"] != VERSION:
        raise FormatError(f"{what}: unsupported version {obj['version']!r:.20} (this anondata reads {VERSION})")
    try:
        return check_dataset_id(obj["dataset_id"])
    except FormatError as e:
        raise FormatError(f"{what}: metadata: {e}") from None


def _same_field(a: pa.Field, b: pa.Field) -> bool:
    """Exactly the same field: name, type, nullability and metadata at every nesting level
    (pyarrow's own equality ignores a list element's name and, by default, field metadata)."""
    return (
        a.name == b.name
        and a.nullable == b.nullable
        and a.metadata == b.metadata
        and a.type.equals(b.type, check_metadata=True)
        and all(_same_field(a.type.field(i), b.type.field(i)) for i in range(a.type.num_fields))
    )


def _rows(table: pa.Table, what: str) -> list[tuple[str, bytes, list[dict]]]:
    """Validate an envelope table completely (schema, metadata, every value) and return its rows."""
    if not isinstance(table, pa.Table):
        raise FormatError(f"{what}: expected a pyarrow.Table")
    try:
        same = len(table.schema) == len(_BASE_SCHEMA) and all(map(_same_field, table.schema, _BASE_SCHEMA))
        got = str(table.schema.remove_metadata())
    except UnicodeDecodeError:  # pyarrow decodes names on access: a field name that is not UTF-8
        same, got = False, "field names that are not UTF-8"
    if not same:
        raise FormatError(f"{what}: schema is not the envelope schema (docs/FORMAT.md): got {got}")
    table_dataset_id(table, what)
    for name in ("record_id", "payload", "wraps"):
        if table.column(name).null_count:
            raise FormatError(f"{what}: column {name} has nulls")
    try:
        table.validate(full=True)  # Parquet readers do not check UTF-8 or offsets by themselves
        ids = table.column("record_id").to_pylist()
        payloads = table.column("payload").to_pylist()
        wraps = table.column("wraps").to_pylist()
    except (pa.ArrowException, UnicodeDecodeError, ValueError) as e:
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise FormatError(f"{what}: invalid values in the envelope table ({msg})") from None
    rows, seen = [], set()
    for rid, payload, ws in zip(ids, payloads, wraps):
        try:
            check_record_id(rid)
        except FormatError as e:
            raise FormatError(f"{what}: {e}") from None
        if rid in seen:
            raise FormatError(f"{what}: record {rid!r} appears twice")
        seen.add(rid)
        if payload is None or len(payload) < MIN_PAYLOAD:
            raise FormatError(f"{what}: record {rid!r}: payload is too short")
        if not ws:
            raise FormatError(f"{what}: record {rid!r} has no wraps")
        fps = set()
        for w in ws:
            if w is None or w["recipient"] is None or w["sealed"] is None:
                raise FormatError(f"{what}: record {rid!r}: null wrap")
            if not FINGERPRINT_RE.match(w["recipient"]):
                raise FormatError(f"{what}: record {rid!r}: recipient {w['recipient']!r:.40} is not a fingerprint")
            if w["recipient"] in fps:
                raise FormatError(f"{what}: record {rid!r}: recipient {w['recipient']} appears twice")
            fps.add(w["recipient"])
            if len(w["sealed"]) not in WRAP_LENGTHS.values():
                raise FormatError(f"{what}: record {rid!r}: sealed key has length {len(w['sealed'])}")
        rows.append((rid, payload, ws))
    return rows


def read_envelope_table(source) -> pa.Table:
    """Read and strictly check an envelope table from a path or bytes."""
    what = str(source) if not isinstance(source, (bytes, bytearray)) else "envelope table"
    try:
        if isinstance(source, (bytes, bytearray)):
            src = pa.BufferReader(bytes(source))
        else:
            if Path(source).stat().st_size > MAX_ENVELOPE_FILE:
                raise FormatError(f"{what}: too large for an envelope table")
            src = str(source)
        # Not pq.read_table: its dataset scanner frees the file's fragment on an Arrow thread after
        # returning, and when that is a Python buffer and the interpreter is exiting, the thread's
        # GIL request ends it inside a destructor: "terminate called without an active exception",
        # exit 134 after a verify that printed "ok" (1 in 10 runs of a loaded machine). One read
        # gives the rows, the Arrow schema's metadata and the footer's, from the same bytes.
        with pq.ParquetFile(src) as f:
            footer = f.metadata.metadata
            # ParquetFile.read() labels the table with the footer's key-value metadata; the Arrow
            # schema's copy (what pyarrow readers see) is checked as the table's, the footer's below.
            table = f.read().replace_schema_metadata(f.schema_arrow.metadata)
    except FileNotFoundError:
        raise FormatError(f"{what}: no such envelope file") from None
    except FormatError:
        raise
    except UnicodeDecodeError:  # pyarrow decodes names on access
        raise FormatError(f"{what}: schema is not the envelope schema (docs/FORMAT.md): field names that are not UTF-8") from None
    except Exception as e:  # pyarrow raises many types on corrupt input; all mean "not ours"
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise FormatError(f"{what}: not a readable Parquet envelope table ({msg})") from None
    _rows(table, what)
    # pyarrow reads the metadata from the footer's ARROW:schema, a reader without Arrow from the
    # footer's own key-value pairs: both must say the same, so no two readers see two datasets.
    if set(footer or {}) != {b"ARROW:schema", METADATA_KEY} or footer[METADATA_KEY] != table.schema.metadata[METADATA_KEY]:
        raise FormatError(f"{what}: the Parquet footer's key-value metadata must be exactly ARROW:schema and "
                          "anondata, the same bytes as the Arrow schema's (docs/FORMAT.md)")
    return table


def envelope_table_bytes(table: pa.Table, what: str = "envelope table") -> bytes:
    """Validate, then encode as Parquet."""
    _rows(table, what)
    buf = io.BytesIO()
    # No statistics: min/max of ciphertext tell nobody anything and are bytes nobody checks.
    pq.write_table(table, buf, write_statistics=False, compression="zstd")
    return buf.getvalue()


def write_envelope_table(path, table: pa.Table) -> None:
    """Validate, then write atomically (temp name in the same folder + rename)."""
    atomic_write(path, envelope_table_bytes(table, str(path)), private=True)


# ---- opening ------------------------------------------------------------------------


def _index(tables: Iterable[pa.Table], dataset_id: str) -> dict[str, tuple[bytes, list[dict]]]:
    check_dataset_id(dataset_id)
    if isinstance(tables, pa.Table):
        tables = [tables]
    index: dict[str, tuple[bytes, list[dict]]] = {}
    for n, table in enumerate(tables):
        what = f"envelope table #{n}"
        rows = _rows(table, what)
        found = table_dataset_id(table, what)
        if found != dataset_id:
            raise IntegrityError(f"{what} belongs to dataset {found}, not {dataset_id}: wrong keys folder?")
        for rid, payload, ws in rows:
            if rid in index:
                raise FormatError(f"record {rid!r} has envelopes in two tables: pass each keys folder once")
            index[rid] = (payload, ws)
    return index


def _open_dk(identity: Identity, rid: str, ws: list[dict], dataset_id: str) -> bytes | None:
    fp = identity.fingerprint
    for w in ws:
        if w["recipient"] == fp:
            if len(w["sealed"]) != WRAP_LENGTHS[identity.kem]:
                raise IntegrityError(f"record {rid!r}: sealed key has the wrong length for a {identity.kem} key")
            try:
                return hpke_suite(identity.kem).decrypt(
                    w["sealed"], identity.hpke_private, info=_binding(WRAP_LABEL, dataset_id, rid)
                )
            except (InvalidTag, ValueError):
                raise IntegrityError(
                    f"record {rid!r}: envelope does not open: it was changed, or moved from another "
                    "record or dataset"
                ) from None
    return None


def _open_payload(dk: bytes, payload: bytes, dataset_id: str, rid: str) -> bytes:
    try:
        return _payload_aead(dk, dataset_id, rid).decrypt(_NONCE, payload, None)
    except InvalidTag:
        raise IntegrityError(
            f"record {rid!r}: envelope payload does not open: it was changed, or moved from another record"
        ) from None


# A grantee who forgets --keys meets these errors first: the release's own keys/ has no envelope for them.
_GRANT_HINT = "records granted to you are in the grant folder (restore and eval take --keys GRANT_DIR)"


def _select(index, identity: Identity, dataset_id: str, ids) -> list[tuple[str, bytes, bytes]]:
    """(record_id, dk, payload) for the requested ids; KeyError_ naming those this identity lacks."""
    if not isinstance(identity, Identity):
        raise KeyError_("expected an Identity (load it with load_identity)")
    fp = identity.fingerprint
    if ids is None:
        wanted = [rid for rid, (_, ws) in index.items() if any(w["recipient"] == fp for w in ws)]
        if not wanted:
            raise KeyError_(f"identity {identity.recipient.label} has no envelopes here: wrong key or keys folder? "
                            f"{_GRANT_HINT}")
    else:
        if isinstance(ids, str):
            ids = [ids]
        wanted = list(dict.fromkeys(ids))
        missing = [
            rid for rid in wanted if rid not in index or not any(w["recipient"] == fp for w in index[rid][1])
        ]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise KeyError_(f"no envelope for identity {identity.recipient.label} for record(s) {shown}; {_GRANT_HINT}")
    out = []
    for rid in wanted:
        payload, ws = index[rid]
        dk = _open_dk(identity, rid, ws, dataset_id)
        out.append((rid, dk, payload))
    return out


def open_records(tables, identity: Identity, dataset_id: str, ids=None) -> dict[str, tuple[bytes, bytes]]:
    """record_id -> (record_key, restore_record_bytes) for every requested record this identity holds."""
    index = _index(tables, dataset_id)
    out = {}
    for rid, dk, payload in _select(index, identity, dataset_id, ids):
        out[rid] = decode_payload(_open_payload(dk, payload, dataset_id, rid), rid)
    return out


def _reseal(selected, to, dataset_id) -> pa.Table:
    rows = []
    for rid, dk, payload in selected:
        # Open the payload before passing it on: a grant/rewrap never forwards a broken envelope.
        decode_payload(_open_payload(dk, payload, dataset_id, rid), rid)
        rows.append((rid, payload, _wrap(dk, to, dataset_id, rid)))
    return _build_table(rows, dataset_id)


def grant_records(tables, identity: Identity, to: list[Recipient], dataset_id: str, ids) -> pa.Table:
    """A new table holding only `ids`, sealed to `to` (payload bytes copied unchanged)."""
    to = _check_recipients(to)
    ids = [ids] if isinstance(ids, str) else list(ids) if ids is not None else []  # read once: an iterator
    if not ids:
        raise KeyError_("grant needs the record ids to share (--ids ID,...)")
    index = _index(tables, dataset_id)
    return _reseal(_select(index, identity, dataset_id, ids), to, dataset_id)


def rewrap_table(table: pa.Table, identity: Identity, to: list[Recipient], dataset_id: str) -> pa.Table:
    """Same records, sealed to exactly `to` (replacing every previous recipient)."""
    to = _check_recipients(to)
    index = _index([table], dataset_id)
    return _reseal(_select(index, identity, dataset_id, list(index)), to, dataset_id)


def table_recipients(table: pa.Table) -> set[str]:
    """Fingerprints of everyone who holds at least one envelope in `table`."""
    out: set[str] = set()
    for ws in table.column("wraps").to_pylist():
        out.update(w["recipient"] for w in ws)
    return out


def recipients_per_record(table: pa.Table) -> list[frozenset[str]]:
    return [frozenset(w["recipient"] for w in ws) for ws in table.column("wraps").to_pylist()]


def check_sealed_to(table: pa.Table, recipients: list[dict], what: str, doc: str = "the manifest") -> None:
    """Every row of a (checked) envelope table is sealed to exactly `recipients` (a manifest's
    `recipients` or a grant's `to`: {fingerprint, kem, name}), each wrap the length of its kem.

    Every writer seals each record to exactly the list it signs (anonymize, rewrap, grant), so a
    difference means the signed document promises access the envelopes do not give (a botched
    rewrap, a keys/ folder from another run). Vectorised over the wraps column alone, so it costs
    little next to the table checks; Python only names the first bad row. Wraps are already
    unique within a row (`_rows`), so count and membership together mean set equality."""
    wanted = {r["fingerprint"]: r for r in recipients}
    fps = pa.array(list(wanted), pa.string())
    sizes = pa.array([WRAP_LENGTHS[r["kem"]] for r in wanted.values()], pa.int64())
    wraps = table.column("wraps")
    flat = pc.list_flatten(wraps)
    idx = pc.index_in(pc.struct_field(flat, "recipient"), value_set=fps)  # null: not a listed recipient
    wrong = pc.or_kleene(pc.is_null(idx), pc.not_equal(pc.binary_length(pc.struct_field(flat, "sealed")),
                                                       pc.take(sizes, idx)))
    bad_rows = pc.filter(pc.list_parent_indices(wraps), pc.fill_null(wrong, True))
    counts = pc.not_equal(pc.list_value_length(wraps), len(wanted))
    firsts = [pc.min(bad_rows).as_py(), pc.index(counts, True).as_py()]
    first = min((i for i in firsts if i is not None and i >= 0), default=None)
    if first is None:
        return
    rid = table.column("record_id")[first].as_py()
    got = {w["recipient"]: len(w["sealed"]) for w in wraps[first].as_py()}
    for fp, r in wanted.items():
        if fp not in got:
            raise IntegrityError(f"{what}: record {rid!r} has no envelope for recipient {fp} ({r['name']}), whom "
                                 f"{doc} lists: the envelopes are sealed to other keys than it says (botched rewrap?)")
        if got[fp] != WRAP_LENGTHS[r["kem"]]:
            raise IntegrityError(f"{what}: record {rid!r}: the key sealed to recipient {fp} ({r['name']}) has "
                                 f"{got[fp]} bytes, not the {WRAP_LENGTHS[r['kem']]} of the {r['kem']} key {doc} lists")
    extra = sorted(set(got) - set(wanted)) or ["?"]
    raise IntegrityError(f"{what}: record {rid!r} is also sealed to {extra[0]}, who is not a recipient in {doc}: "
                         "the envelopes are sealed to other keys than it says")
