"""Regenerate tests/vectors/restore_records.json: core restore records (docs/FORMAT.md, "Core
record") as exact bytes, with the values they must parse to, and records a reader MUST reject.

Everything here is deterministic (zlib level 9 of fixed arrays), so a reader in another language
can check both directions: parse `record` to `expect`, and (for the positive vectors) re-encode
to the same bytes."""

import json
import zlib
from pathlib import Path

import numpy as np

from anondata import canonical
from anondata.restore_record import RestoreRecord

R = 8


def _mask() -> np.ndarray:
    m = np.zeros((R, R), bool)
    m[2:6, 3:7] = True  # latent cells (f = 2, 4x4 latent): rows 1-2, cols 1-3
    return m


def _base() -> RestoreRecord:
    ov = np.zeros((R, R, 3), np.int16)
    ov[3, 4] = (3, -2, 0)  # 8-bit overflow carried inside the mask
    return RestoreRecord(model_sha256="ab" * 32, resolution=R, steps=10, inversion_iters=4, dtype="float32",
                         batch=1, mask=_mask(), overflow=ov)


def _lossless() -> RestoreRecord:
    rng = np.random.default_rng(7)
    rec = _base()
    original = rng.integers(0, 256, (R, R, 3), dtype=np.uint8)
    rec.residual = rng.integers(-4, 5, (R, R, 3)).astype(np.int16)
    rec.snap = (original[rec.mask] % 3).reshape(-1).astype(np.uint8)
    rec.original_sha256 = "cd" * 32
    return rec


def _latent() -> RestoreRecord:
    rec = _base()
    carry = np.zeros((4, 4, 4), np.float16)
    cells = rec.mask.reshape(4, 2, 4, 2).any(axis=(1, 3))
    carry[:, cells] = np.linspace(-2.5, 3.25, 4 * int(cells.sum()), dtype=np.float16).reshape(4, -1)
    rec.carry = carry
    return rec


def _v2(rec: RestoreRecord, cell: int = 2) -> RestoreRecord:
    rec.sign_cell = cell  # scheme v2: one sign per 2x2 latent cell
    return rec


def _v3(rec: RestoreRecord, cell: int = 0) -> RestoreRecord:
    rec.sign_cell, rec.background = cell, "noised"  # scheme v3: the noised background path
    rec.face_mean = (3204, -193, -1772) if rec.carry is None else (1500, -2500, 0, 30000)  # the flip's centre
    return rec


def _summary(rec: RestoreRecord) -> dict:
    return {
        "sign_cell": rec.sign_cell, "background": rec.background,
        "face_mean": None if rec.face_mean is None else list(rec.face_mean),
        "model_sha256": rec.model_sha256, "resolution": rec.resolution, "steps": rec.steps,
        "inversion_iters": rec.inversion_iters, "dtype": rec.dtype, "batch": rec.batch,
        "mask_pixels": int(rec.mask.sum()), "overflow_sum_abs": int(np.abs(rec.overflow).sum()),
        "residual_sum_abs": None if rec.residual is None else int(np.abs(rec.residual).sum()),
        "snap_sum": None if rec.snap is None else int(rec.snap.sum()),
        "carry_shape": None if rec.carry is None else list(rec.carry.shape),
        "carry_sum": None if rec.carry is None else float(rec.carry.astype(np.float64).sum()),
    }


def _edit(rec: RestoreRecord, fn) -> bytes:
    d = json.loads(rec.to_bytes())
    fn(d)
    return canonical.dumps(d)


def _carry_b64(a: np.ndarray) -> str:
    return canonical.b64e(zlib.compress(a.astype("<f2").tobytes(), 9))


def main():
    positive = [("key-only, pixel model", _base()), ("lossless, pixel model", _lossless()),
                ("key-only, latent model (4x4x4 latent)", _latent()),
                ("v2 key-only, pixel model, sign_cell 2", _v2(_base())), ("v2 lossless, pixel model", _v2(_lossless())),
                ("v2 key-only, latent model", _v2(_latent(), 1)),
                ("v3 key-only, pixel model, a sign per value", _v3(_base())), ("v3 lossless, pixel model", _v3(_lossless())),
                ("v3 key-only, latent model, sign_cell 2", _v3(_latent(), 2))]
    out = {"positive": [], "negative": []}
    for desc, rec in positive:
        out["positive"].append({"description": desc, "record": rec.to_bytes().decode(), "expect": _summary(rec)})
    lat = _latent()
    outside = lat.carry.copy()
    outside[0, 0, 0] = 1.0
    nonfinite = lat.carry.copy()
    nonfinite[1, 1, 1] = np.inf
    negzero = lat.carry.copy()
    negzero[0, 0, 0] = -0.0
    mask_bits = np.packbits(lat.mask.reshape(-1), bitorder="little")
    negative = [
        ("unknown field", _edit(_base(), lambda d: d.update(extra=1)), "unknown fields"),
        ("missing field latent", _edit(_base(), lambda d: d.pop("latent")), "missing fields"),
        ("float where an integer must be", _base().to_bytes().replace(b'"steps":10', b'"steps":10.0'), "float"),
        ("keys out of order (non-canonical)", json.dumps(dict(reversed(list(json.loads(_base().to_bytes()).items()))),
                                                          separators=(",", ":")).encode(), "canonical"),
        ("residual without snap", _edit(_lossless(), lambda d: d.update(snap=None)), "go together"),
        ("overflow of the wrong size", _edit(_base(), lambda d: d.update(
            overflow=canonical.b64e(zlib.compress(b"\0" * 10, 9)))), "exactly"),
        ("mask with trailing zlib data", _edit(_base(), lambda d: d.update(
            mask=canonical.b64e(zlib.compress(mask_bits.tobytes(), 9) + b"x"))), "exactly"),
        ("carry non-zero outside the latent mask", _edit(lat, lambda d: d["latent"].update(carry=_carry_b64(outside))),
         "outside the latent mask"),
        ("carry -0.0 outside the latent mask", _edit(lat, lambda d: d["latent"].update(carry=_carry_b64(negzero))),
         "outside the latent mask"),
        ("carry not finite", _edit(lat, lambda d: d["latent"].update(carry=_carry_b64(nonfinite))), "non-finite"),
        ("latent shape not dividing the resolution", _edit(lat, lambda d: d["latent"].update(shape=[4, 3, 3])),
         "does not fit"),
        ("latent with an extra key", _edit(lat, lambda d: d["latent"].update(scale=1)), "latent must be"),
        ("v1 record with a sign_cell", _edit(_base(), lambda d: d.update(sign_cell=2)), "unknown fields"),
        ("v2 record without sign_cell", _edit(_v2(_base()), lambda d: d.pop("sign_cell")), "missing fields"),
        ("v2 record naming scheme v1", _edit(_v2(_base()), lambda d: d.update(scheme="anondata-signflip/1")),
         "unsupported version"),
        ("v2 sign_cell 0", _edit(_v2(_base()), lambda d: d.update(sign_cell=0)), "sign_cell must be"),
        ("v2 sign_cell above the resolution", _edit(_v2(_base()), lambda d: d.update(sign_cell=R + 1)),
         "sign_cell must be"),
        ("v2 sign_cell a string", _edit(_v2(_base()), lambda d: d.update(sign_cell="2")), "integer"),
        ("v3 record naming scheme v2", _edit(_v2(_base()), lambda d: d.update(v=3)), "unsupported version"),
        ("v3 record without sign_cell", _edit(_v3(_base()), lambda d: d.pop("sign_cell")), "missing fields"),
        ("v3 sign_cell -1", _edit(_v3(_base()), lambda d: d.update(sign_cell=-1)), "sign_cell must be"),
        ("v3 sign_cell above the resolution", _edit(_v3(_base()), lambda d: d.update(sign_cell=R + 1)),
         "sign_cell must be"),
        ("version 4", _edit(_v3(_base()), lambda d: d.update(v=4, scheme="anondata-signflip/4")), "unsupported version"),
        ("v3 record without face_mean", _edit(_v3(_base()), lambda d: d.pop("face_mean")), "missing fields"),
        ("v2 record with a face_mean", _edit(_v2(_base()), lambda d: d.update(face_mean=[0, 0, 0])), "unknown fields"),
        ("v3 face_mean of 4 values for a pixel model", _edit(_v3(_base()), lambda d: d.update(face_mean=[0, 0, 0, 0])),
         "one value per latent channel"),
        ("v3 face_mean of 3 values for a 4-channel latent", _edit(_v3(_latent()), lambda d: d.update(face_mean=[0, 0, 0])),
         "one value per latent channel"),
        ("v3 face_mean beyond 30000", _edit(_v3(_base()), lambda d: d.update(face_mean=[0, 30001, 0])), "face_mean must be"),
        ("v3 face_mean empty", _edit(_v3(_base()), lambda d: d.update(face_mean=[])), "face_mean must be"),
    ]
    for desc, data, needle in negative:
        out["negative"].append({"description": desc, "record": data.decode(), "error": "FormatError", "message_contains": needle})
    path = Path(__file__).with_name("restore_records.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
