"""What restore needs besides the key, for one face crop at model resolution (v3; v1 and v2 still read).

Canonical JSON (anondata.canonical), sealed inside the record's envelope, never public:
  v                 3 (2 and 1: records of the older schemes, whose background path is "inverted")
  scheme            "anondata-signflip/3" (v2: "anondata-signflip/2", v1: "anondata-signflip/1")
  sign_cell         v3: 0 (a sign per value) or the side of the latent cells that share one sign
                    (keystream.cell_signs); v2: >= 1; v1: absent (a sign per value)
  face_mean         v3 only: the centre the flip reflects around (scheme.flip), one integer per latent
                    channel in 1/10000 (|v| <= 30000): the model's mean face when it has one, else zeros
  model_sha256      sha256 of the model weights (backends.weights_sha256): restore refuses another model
  resolution        R, the crop size the model saw
  steps, inversion_iters, dtype    the sampler settings used
  batch             the model-call batch size it was computed at (results are exact only at one shape)
  mask              b64url(zlib(packbits(mask R*R, LSB first)))
  overflow          b64url(zlib(int16 LE R*R*3)): the part of the generated pixels that 8-bit storage
                    clipped, in 1/127.5 units, so restore starts from exactly what was generated (up to rounding)
  residual          null, or b64url(zlib(int16 LE R*R*3)): original - key-only restore (lossless mode, or a poor key-only restore)
  snap              null, or b64url(trits): (original mod 3) of every value inside the mask, in (row, col,
                    channel) order, 5 trits a byte (t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4, unused trits 0):
                    restore snaps each value to the one of {v-1, v, v+1} with that residue, so lossless
                    restore survives the ±1 rounding drift of another thread count, batch or device
  original_sha256   null, or sha256 of the original R*R*3 uint8 crop (lossless mode): restore checks it
  latent            null (pixel models), or for latent models {"shape": [C, h, w], "carry":
                    b64url(zlib(float16 LE C*h*w))}: generated latent - encode(stored image), finite,
                    0 outside the latent mask (a latent cell is in if any of its R/h x R/h pixels is)
Readers reject unknown or missing fields, wrong types, and payloads that do not decompress to the exact size.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass, replace

import numpy as np

from . import canonical
from .errors import FormatError, InputError

SCHEME_V1 = "anondata-signflip/1"
SCHEME_V2 = "anondata-signflip/2"
SCHEME_V3 = "anondata-signflip/3"
SCHEMES = {1: SCHEME_V1, 2: SCHEME_V2, 3: SCHEME_V3}
DTYPES = ("float32", "float64")
_FIELDS_V1 = {
    "v", "scheme", "model_sha256", "resolution", "steps", "inversion_iters", "dtype", "batch",
    "mask", "overflow", "residual", "snap", "original_sha256", "latent",
}
_FIELDS = {1: _FIELDS_V1, 2: _FIELDS_V1 | {"sign_cell"}, 3: _FIELDS_V1 | {"sign_cell", "face_mean"}}
FACE_MEAN_UNIT = 10000
MAX_FACE_MEAN = 3 * FACE_MEAN_UNIT


def scheme_version(sign_cell: int, background: str) -> int:
    """v3: the "noised" background path (either sign layout). The "inverted" path: v1 is one sign
    per latent element (sign_cell 0), v2 one per cell, shared by the channels."""
    if background == "noised":
        return 3
    return 1 if sign_cell == 0 else 2


def scheme_name(sign_cell: int, background: str) -> str:
    return SCHEMES[scheme_version(sign_cell, background)]


MAX_LATENT_VALUES = 1 << 26
_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_RESOLUTION = 4096
MAX_BATCH = 1024


def _pack_i16(a: np.ndarray) -> str:
    return canonical.b64e(zlib.compress(a.astype("<i2").tobytes(), 9))


def _unpack(text: str, shape: tuple[int, ...], dtype: str, what: str) -> np.ndarray:
    raw = canonical.b64d(text, what)
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    try:
        d = zlib.decompressobj()
        data = d.decompress(raw, size + 1)
        if not d.eof or d.unused_data or len(data) != size:
            raise FormatError(f"restore record: {what} does not decompress to exactly {size} bytes")
    except zlib.error:
        raise FormatError(f"restore record: {what} is not valid zlib data") from None
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


@dataclass
class RestoreRecord:
    model_sha256: str
    resolution: int
    steps: int
    inversion_iters: int
    dtype: str
    batch: int
    mask: np.ndarray  # (R, R) bool
    overflow: np.ndarray  # (R, R, 3) int16
    residual: np.ndarray | None = None  # (R, R, 3) int16
    snap: np.ndarray | None = None  # (mask.sum() * 3,) uint8 in 0..2
    original_sha256: str | None = None
    carry: np.ndarray | None = None  # (C, h, w) float16, latent models only
    sign_cell: int = 0  # 0: a sign per element; >= 1: cells (keystream.cell_signs)
    background: str = "inverted"  # "noised": scheme v3; "inverted": v1 / v2 (scheme.background_trajectory)
    face_mean: tuple[int, ...] | None = None  # v3: the flip's centre in 1/FACE_MEAN_UNIT; None in v1 / v2

    def key_only(self) -> "RestoreRecord":
        """This record without its lossless part: what restore computes from the key alone."""
        return replace(self, residual=None, snap=None, original_sha256=None)

    def to_bytes(self) -> bytes:
        bits = np.packbits(self.mask.astype(bool).reshape(-1), bitorder="little")
        v = scheme_version(self.sign_cell, self.background)
        if (v == 3) != (self.face_mean is not None):
            raise ValueError("restore record: face_mean goes with the noised background (v3) and only with it")
        return canonical.dumps({
            **({"sign_cell": self.sign_cell} if v > 1 else {}),
            **({"face_mean": [int(c) for c in self.face_mean]} if v == 3 else {}),
            "v": v,
            "scheme": SCHEMES[v],
            "model_sha256": self.model_sha256,
            "resolution": self.resolution,
            "steps": self.steps,
            "inversion_iters": self.inversion_iters,
            "dtype": self.dtype,
            "batch": self.batch,
            "mask": canonical.b64e(zlib.compress(bits.tobytes(), 9)),
            "overflow": _pack_i16(self.overflow),
            "residual": None if self.residual is None else _pack_i16(self.residual),
            "snap": None if self.snap is None else canonical.b64e(pack_trits(self.snap)),
            "original_sha256": self.original_sha256,
            "latent": None if self.carry is None else {
                "shape": [int(n) for n in self.carry.shape],
                "carry": canonical.b64e(zlib.compress(self.carry.astype("<f2").tobytes(), 9)),
            },
        })

    @classmethod
    def from_bytes(cls, data: bytes, resolution: int | None = None) -> "RestoreRecord":
        """`resolution`: the restoring model's; a record of another is refused before its arrays are
        unpacked (at 4096 the residual alone inflates to 100 MB from a small zlib stream)."""
        d = canonical.loads(data, "restore record")
        if not isinstance(d, dict):
            raise FormatError("restore record: not a JSON object")
        v = d.get("v")
        if type(v) is not int or v not in SCHEMES or d.get("scheme") != SCHEMES[v]:
            raise FormatError(f"restore record: unsupported version {v!r} / scheme {d.get('scheme')!r}")
        if set(d) != _FIELDS[v]:
            extra, missing = sorted(set(d) - _FIELDS[v]), sorted(_FIELDS[v] - set(d))
            raise FormatError(f"restore record: unknown fields {extra} / missing fields {missing}")
        for k in ("resolution", "steps", "inversion_iters", "batch") + (("sign_cell",) if v > 1 else ()):
            if type(d[k]) is not int:
                raise FormatError(f"restore record: {k} must be an integer")
        r = d["resolution"]
        if not (1 <= r <= MAX_RESOLUTION and 1 <= d["steps"] <= 1000 and 0 <= d["inversion_iters"] <= 100
                and 1 <= d["batch"] <= MAX_BATCH):
            raise FormatError("restore record: resolution, steps, inversion_iters or batch out of range")
        if resolution is not None and r != resolution:
            raise InputError(f"restore record: made at model resolution {r}, this model has {resolution}: "
                             "restore with the same --model")
        lo = 1 if v == 2 else 0  # v2 exists for cells; a v3 record may have a sign per value
        if v > 1 and not lo <= d["sign_cell"] <= r:
            raise FormatError(f"restore record: sign_cell must be in {lo}..{r} in a v{v} record")
        if v == 3:
            fm = d["face_mean"]
            if not (isinstance(fm, list) and fm and all(type(c) is int and abs(c) <= MAX_FACE_MEAN for c in fm)):
                raise FormatError(f"restore record: face_mean must be a list of integers in -{MAX_FACE_MEAN}..{MAX_FACE_MEAN}")
        if d["dtype"] not in DTYPES:
            raise FormatError(f"restore record: dtype must be one of {DTYPES}")
        for k in ("model_sha256",) + (("original_sha256",) if d["original_sha256"] is not None else ()):
            if not isinstance(d[k], str) or not _HEX64.fullmatch(d[k]):
                raise FormatError(f"restore record: {k} must be 64 lowercase hex digits")
        if not (d["residual"] is None) == (d["snap"] is None) == (d["original_sha256"] is None):
            raise FormatError("restore record: residual, snap and original_sha256 go together")
        nbits = r * r
        bits = _unpack(d["mask"], ((nbits + 7) // 8,), "u1", "mask")
        if nbits % 8 and bits[-1] >> (nbits % 8):
            raise FormatError("restore record: mask has non-zero padding bits")
        mask = np.unpackbits(bits, bitorder="little")[:nbits].reshape(r, r).astype(bool)
        carry = None if d["latent"] is None else _parse_latent(d["latent"], mask)
        if v == 3 and len(d["face_mean"]) != (3 if carry is None else carry.shape[0]):
            raise FormatError("restore record: face_mean needs one value per latent channel (3 for a pixel model)")
        return cls(
            model_sha256=d["model_sha256"],
            resolution=r,
            steps=d["steps"],
            inversion_iters=d["inversion_iters"],
            dtype=d["dtype"],
            batch=d["batch"],
            mask=mask,
            overflow=_unpack(d["overflow"], (r, r, 3), "<i2", "overflow").astype(np.int16),
            residual=None if d["residual"] is None else _unpack(d["residual"], (r, r, 3), "<i2", "residual").astype(np.int16),
            snap=None if d["snap"] is None else unpack_trits(canonical.b64d(d["snap"], "snap"), int(mask.sum()) * 3),
            original_sha256=d["original_sha256"],
            carry=carry,
            sign_cell=d["sign_cell"] if v > 1 else 0,
            background="noised" if v == 3 else "inverted",
            face_mean=tuple(d["face_mean"]) if v == 3 else None,
        )


def latent_cells(mask: np.ndarray, size: int) -> np.ndarray:
    """(R, R) pixel mask -> (size, size): a latent cell is in if any of its pixels is (as backends.latent_mask)."""
    f = mask.shape[0] // size
    return mask.reshape(size, f, size, f).any(axis=(1, 3))


def _parse_latent(lat, mask: np.ndarray) -> np.ndarray:
    if not isinstance(lat, dict) or set(lat) != {"shape", "carry"}:
        raise FormatError('restore record: latent must be null or {"shape", "carry"}')
    shape = lat["shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(n) is int and n >= 1 for n in shape)):
        raise FormatError("restore record: latent.shape must be [C, h, w] of positive integers")
    c, h, w = shape
    r = mask.shape[0]
    if h != w or r % h or c * h * w > MAX_LATENT_VALUES:
        raise FormatError(f"restore record: latent.shape {shape} does not fit resolution {r}")
    if not isinstance(lat["carry"], str):
        raise FormatError("restore record: latent.carry must be a string")
    carry = _unpack(lat["carry"], (c, h, w), "<f2", "latent.carry").astype(np.float16)
    if not np.isfinite(carry).all():
        raise FormatError("restore record: latent.carry holds a non-finite value")
    if np.any(carry.view(np.uint16)[:, ~latent_cells(mask, h)]):  # +0.0 only, bit for bit
        raise FormatError("restore record: latent.carry is non-zero outside the latent mask")
    return carry


def sha256_image(img: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(img, dtype=np.uint8).tobytes()).hexdigest()


def pack_trits(t: np.ndarray) -> bytes:
    """Values 0..2, five to a byte, little-endian base 3."""
    t = np.asarray(t, dtype=np.uint8).reshape(-1)
    padded = np.zeros(-(-len(t) // 5) * 5, np.uint8)
    padded[: len(t)] = t
    return (padded.reshape(-1, 5).astype(np.uint16) @ np.array([1, 3, 9, 27, 81], np.uint16)).astype(np.uint8).tobytes()


def unpack_trits(data: bytes, n: int) -> np.ndarray:
    b = np.frombuffer(data, np.uint8)
    if len(b) != -(-n // 5) or (b >= 243).any():
        raise FormatError(f"restore record: snap must be {-(-n // 5)} bytes of 5 trits each")
    t = (b[:, None] // np.array([1, 3, 9, 27, 81], np.uint8)[None] % 3).reshape(-1)
    if t[n:].any():
        raise FormatError("restore record: snap has non-zero padding trits")
    return t[:n].astype(np.uint8)


def snap(estimate: np.ndarray, trits: np.ndarray) -> np.ndarray:
    """The value in {estimate-1, estimate, estimate+1} whose residue mod 3 is `trits` (int16 in, int16 out)."""
    return estimate + ((trits.astype(np.int16) - estimate + 1) % 3) - 1
