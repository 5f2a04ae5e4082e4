"""What runs on Ray workers: reading a shard's rows, and the anonymizer actor.

Why keys never leave the actor: the actor draws each record key, uses it, seals it to the
recipients (HPKE) in the same process, and returns only the sealed envelope. No record key
crosses the Ray object store or reaches the driver in the clear.
"""

from __future__ import annotations

import io
import re

import pyarrow as pa

from .. import canonical
from ..errors import AnondataError, SetupError
from .journal import crash_hook
from .sources import Source, derived_id, image_bytes

ROW_SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("shard", pa.int64()),
        ("row", pa.int64()),
        ("record_id", pa.string()),
        ("image", pa.large_binary()),
        ("error", pa.string()),
    ]
)

RESULT_SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("shard", pa.int64()),
        ("row", pa.int64()),
        ("record_id", pa.string()),
        ("status", pa.string()),  # anonymized | quarantined | FAILED | SETUP_FAILED (the driver stops the job)
        ("reason", pa.string()),
        ("image", pa.large_binary()),  # the anonymized, encoded image (anonymized only)
        ("envelopes", pa.large_binary()),  # Arrow IPC stream of this record's envelope rows
        ("faces", pa.int64()),
        ("model", pa.string()),  # canonical JSON {model, settings} of the actor that did it
        ("worker", pa.string()),  # which actor (host, process, GPU): for the driver's _Breaker, never published
    ]
)


# A batch whose node cannot anonymize at all (a detector or library that does not load): every row
# carries this status and the error as reason, and the driver stops the job with it. Not raised:
# the pipeline skips failed blocks to survive worker crashes (pipeline._run_shards).
SETUP_FAILED = "setup-failed"

# A record that the model step failed on with an exception anondata does not foresee (CUDA errors,
# a library bug): quarantined like the others, but counted by the driver, which stops the job
# when so many fail in a row that the device or installation, not the records, is to blame
# (pipeline._Breaker). Decoding failures and the library's own errors are the record's: never FAILED.
FAILED = "failed"


def read_shard_rows(batch: pa.Table, source: Source) -> pa.Table:
    """Ray map_batches function over shard tasks (split, shard, start, stop): the rows of
    those shards with their image bytes. Unreadable cells carry an `error` instead of bytes;
    the actor quarantines them, so one bad row never stops the job."""
    cols = {k: [] for k in ROW_SCHEMA.names}
    tasks = batch.select(["split", "shard", "start", "stop"]).to_pylist()
    for t in tasks:
        split, shard, start, stop = t["split"], t["shard"], t["start"], t["stop"]
        wanted = [source.image_column] + ([source.id_column] if source.id_column else [])
        table = source.read(split, start, stop, wanted)
        images = table.column(0).to_pylist()
        ids = (
            [str(v) for v in table.column(1).to_pylist()]
            if source.id_column
            else [derived_id(split, start + i) for i in range(len(images))]
        )
        for i, (cell, rid) in enumerate(zip(images, ids)):
            data, err = image_bytes(source, cell)
            cols["split"].append(split)
            cols["shard"].append(shard)
            cols["row"].append(start + i)
            cols["record_id"].append(rid)
            cols["image"].append(data)
            cols["error"].append(err)
    return pa.table(cols, schema=ROW_SCHEMA)


def envelopes_to_ipc(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


def envelopes_from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


class AnonymizerActor:
    """One per GPU (or CPU slot). Loads the model once; each call anonymizes a batch of rows
    and returns public results plus sealed envelopes."""

    def __init__(self, *, model: str, device: str, steps, inversion_iters, sign_cell: int, background: str,
                 flip_centre: str, model_batch: int, face_spec: dict, lossless: bool, recipients: list[bytes], dataset_id: str):
        import torch

        torch.set_num_threads(1)
        from ..faces import FaceSpec
        from ..identity import Recipient

        if device == "cuda" and not torch.cuda.is_available():
            device = "cpu"
        self.anon = _anonymizer(model=model, device=device, steps=steps, inversion_iters=inversion_iters,
                                sign_cell=sign_cell, background=background, flip_centre=flip_centre,
                                model_batch=model_batch)
        box = face_spec.get("box")
        self.spec = FaceSpec(**{**face_spec, "box": tuple(box) if box else None})
        # Load what every photo needs now: a node without it stops the job here (SetupError)
        # instead of quarantining every record it is given.
        from ..faces import _cv2

        _cv2()
        if self.spec.mode == "detect":
            from ..detect import get_detector

            for name in filter(None, (self.spec.detector, self.spec.cross_check)):
                get_detector(name)
        self.lossless = lossless
        self.recipients = [Recipient.from_bytes(b) for b in recipients]
        self.dataset_id = dataset_id
        self.model_json = _model_json(self.anon, device)
        self.worker = _worker_label(device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return process_rows(self, batch)


def _anonymizer(*, model: str, device: str, steps, inversion_iters, sign_cell: int, background: str, flip_centre: str,
                model_batch: int, weights: bool = True):
    from ..anonymizer import Anonymizer

    return Anonymizer.from_pretrained(
        model, device=device, steps=steps, inversion_iters=inversion_iters, batch_size=model_batch,
        sign_cell=sign_cell, background=background, flip_centre=flip_centre, weights=weights,
    )


def _model_json(anon, device: str) -> str:
    """What each record's marker says made it. The device is part of it: lossless restore is
    bit-exact only on the same kind of device."""
    return canonical.dumps({"model": anon.model_info, "settings": anon.settings, "device": device}).decode()


def actor_model_json(*, model: str, device: str, steps, inversion_iters, sign_cell: int, background: str,
                     flip_centre: str, model_batch: int, **_) -> str:
    """The model_json of an AnonymizerActor built with these arguments (pipeline.actor_kwargs), by
    the same code but without loading the weights: the model is built from its configs on no
    memory (backends.load_backend weights=False) and its weights only hashed, so a driver with no
    GPU can check a large model's settings before the workers load it."""
    anon = _anonymizer(model=model, device=device, steps=steps, inversion_iters=inversion_iters, sign_cell=sign_cell,
                       background=background, flip_centre=flip_centre, model_batch=model_batch, weights=False)
    return _model_json(anon, device)


def _worker_label(device: str) -> str:
    """Names this actor in the driver's message when its device keeps failing (one bad GPU of
    several): the host, the process and the GPU."""
    import os
    import socket

    label = f"{socket.gethostname()} pid {os.getpid()}"
    if device == "cuda":
        label += f" GPU {os.environ.get('CUDA_VISIBLE_DEVICES', '?')}"
    return label


def process_rows(actor, batch: pa.Table) -> pa.Table:
    """Decode -> anonymize faces -> encode -> seal, for one batch. Any per-record failure
    quarantines that record with the error as its reason (an unexpected exception by its type and
    a short message), except a SetupError, which marks the whole batch SETUP_FAILED."""
    from ..envelope import seal_records
    from ..images import decode_image, encode_image
    from ..keystream import new_key

    rows = batch.to_pylist()
    out = {k: [] for k in RESULT_SCHEMA.names}
    status: list[tuple[str, str | None, bytes | None, bytes | None, int]] = [None] * len(rows)  # type: ignore[list-item]
    todo: list[int] = []
    images = []
    for i, r in enumerate(rows):
        crash_hook("anonymize", r["row"])  # test hook: kills this worker at that source row
        if r["image"] is None:
            status[i] = ("quarantined", f"record {r['record_id']!r}: {r['error']}", None, None, 0)
            continue
        try:
            arr, _fmt = decode_image(r["image"], r["record_id"])
        except Exception as e:  # noqa: BLE001 - fail closed: the record is quarantined, never published
            status[i] = ("quarantined", _failure(e, r["record_id"])[1], None, None, 0)
            continue
        todo.append(i)
        images.append(arr)
    if todo:
        keys = [new_key() for _ in todo]
        try:
            results = _anonymize_isolating(actor, images, keys, [rows[i]["record_id"] for i in todo])
        except SetupError as e:
            results = [e] * len(todo)
        for i, key, res in zip(todo, keys, results):
            rid = rows[i]["record_id"]
            if isinstance(res, SetupError):
                status[i] = (SETUP_FAILED, str(res), None, None, 0)
            elif isinstance(res, tuple):  # (status, reason) from _failure
                status[i] = (*res, None, None, 0)
            elif res.quarantine_reason is not None or res.image is None or res.record is None:
                reason = res.quarantine_reason or "the face step returned no image"
                status[i] = ("quarantined", _name(reason, rid), None, None, res.faces)
            else:
                try:
                    env = seal_records(actor.recipients, actor.dataset_id, [(rid, key, res.record)])
                    status[i] = ("anonymized", None, encode_image(res.image), envelopes_to_ipc(env), res.faces)
                except Exception as e:  # noqa: BLE001 - no envelope or no image: not published
                    status[i] = (*_failure(e, rid), None, None, res.faces)
        del keys
    for r, (st, reason, img, env, faces) in zip(rows, status):
        out["split"].append(r["split"])
        out["shard"].append(r["shard"])
        out["row"].append(r["row"])
        out["record_id"].append(r["record_id"])
        out["status"].append(st)
        out["reason"].append(reason)
        out["image"].append(img)
        out["envelopes"].append(env)
        out["faces"].append(int(faces or 0))
        out["model"].append(actor.model_json)
        out["worker"].append(actor.worker)
    return pa.table(out, schema=RESULT_SCHEMA)


def _name(reason: str, rid: str) -> str:
    return reason if rid in reason else f"record {rid!r}: {reason}"


# What an unexpected exception's message may not carry into the public manifest: bytes reprs
# (image data), file paths, and long hex/base64 runs (key material).
_REDACT = re.compile(r"""b'(?:[^'\\]|\\.)*'|b"(?:[^"\\]|\\.)*"|(?:[A-Za-z]:)?(?:[\\/][^\s'"\\/:,;()]+){2,}"""
                     r"|[A-Za-z0-9+/_=-]{32,}")


def _failure(e: Exception, rid: str) -> tuple[str, str]:
    """(status, quarantine reason) for exception `e` on record `rid`: the project's own error is
    the record's ("quarantined", its message as it is); anything else is FAILED, by its type and a
    short, redacted first line."""
    if isinstance(e, AnondataError):
        return "quarantined", _name(str(e), rid)
    line = _REDACT.sub("…", (str(e).strip().splitlines() or [""])[0])
    line = line if len(line) <= 160 else line[:159] + "…"
    return FAILED, f"record {rid!r}: could not be anonymized: {type(e).__name__}" + (f": {line}" if line else "")


def _anonymize_isolating(actor, images, keys, ids):
    """The whole batch at once; if that fails, each photo alone, so the one bad record is
    quarantined ((status, reason) from _failure) and the rest go through. A SetupError is the
    node's, not the record's: it propagates."""
    from ..anonymizer import RESTORE_FLOOR_DB
    from ..faces import anonymize_photos

    # --lossy-restore: a face whose key-only restore would be poor keeps its residual anyway
    kw = {"lossless": actor.lossless, "floor_db": None if actor.lossless else RESTORE_FLOOR_DB}
    try:
        return anonymize_photos(actor.anon, images, keys, actor.spec, **kw)
    except SetupError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. CUDA out of memory for the batch: try each alone
        if len(images) == 1:
            return [_failure(e, ids[0])]
    out = []
    for img, key, rid in zip(images, keys, ids):
        try:
            out.extend(anonymize_photos(actor.anon, [img], [key], actor.spec, **kw))
        except SetupError:
            raise
        except Exception as e:  # noqa: BLE001 - fail closed: quarantined with its reason
            out.append(_failure(e, rid))
    return out
