"""Faces in photos: find them, anonymize each in place, and restore the photo.

Why this shape: the model only sees square-ish crops at its resolution R, framed like its
training data (CelebA's 128 px crop of the aligned 178x218 image). A photo can hold any number
of faces at any size, so per face we:

1. place a crop: `aligned` mode takes the given box (or the whole image) as that framing;
   `detect` mode derives it from the detector box (made square again where the photo's border
   clipped it, and framed larger past a border it lies at: a face cut by the border is placed
   whole) and dlib's 5 landmarks (scale and offset
   measured on CelebA aligned images, `benchmarks/wild_detection.py --calibrate`), widened by
   `expand` so a feathered border fits inside it;
2. resize the crop to R and anonymize it with the core under a boolean mask (the face ellipse,
   widened by what resizing back reaches and over any other face's ellipse: `_core_masks`) and
   the per-face key `face_key(record_key, i)` (all crops of all photos in one core call);
3. resize back and blend: weight 1 inside the ellipse, a smooth fall-off outside it that reaches
   0 inside the crop. Overlapping faces share weight (never more than 1 in total), so where any
   face has weight 1 no original pixel remains. Pixels outside every crop are never written.

Restore re-crops the stored photo, resizes to R and adds a small per-face correction (`fix`,
anonymized crop minus what re-cropping gives back) so the core sees exactly what it produced;
then photo = stored + sum_i w_i * up(restored_i - anonymized_i). That is the original outside
the faces and the original seen through R inside them. Lossless mode also stores the residual
original - that estimate over the crops (zlib int16), and the original's sha256, which restore
checks: bit-exact on the same device/dtype, a loud error otherwise.

Photo restore record (canonical JSON, sealed with the record key, never public):
  v 2 (v 1: no snap), kind "anondata/photo", width, height, resolution, mask ("ellipse"|"full"),
  anon_sha256 (the stored photo: restore refuses a changed or re-encoded one),
  faces: [{crop [x0,y0,x1,y1] (may extend past the image; padding is edge-replicated),
           ellipse [cx, cy, rx, ry, angle] in 1/10000 of the crop width/height and 1/100 degree,
           feather (outer ellipse scale, 1/10000), core (b64 core RestoreRecord), fix (b64 zlib int16 R*R*3)}],
  lossless: null | {sha256 (original photo), residual (b64 zlib int16, union of crops, row-major per group),
             snap (v2: b64 trits, the original's values mod 3 in the residual's order)}
"""

from __future__ import annotations

import hashlib
import math
import numbers
import zlib
from dataclasses import dataclass, field

import numpy as np

from . import canonical
from .errors import FormatError, InputError, IntegrityError, LosslessMismatch, SetupError
from .restore_record import pack_trits, snap, unpack_trits

KIND = "anondata/photo"
U = 10000  # fixed-point unit for normalized geometry (canonical JSON has no floats)

# Face ellipse in the training framing (unit square of the CelebA 128 crop): covers brow to chin.
_DETECT_ELLIPSE = (0.5, 0.56, 0.36, 0.45)
_DETECT_FEATHER = 1.12
# Aligned boxes cannot grow, so the ellipse and its fall-off must fit inside the box itself.
_ALIGNED_ELLIPSE = (0.5, 0.54, 0.36, 0.42)
_ALIGNED_FEATHER = 1.10
# Training-framing side per detector box width, and framing centre offset (in sides) from the
# box centre; measured on 300 CelebA aligned images (40 for mmod) by benchmarks/wild_detection.py --calibrate.
# Looked up by detector and Haar cascade (the framing is the cascade's; minNeighbors only drops
# boxes), then by detector: "haar" is detect.HAAR_SETTINGS's frontalface_alt2 (boxes 3% smaller), and
# the other cascades, never calibrated, take it too; frontalface_default is the setting before
# ("haar:frontalface_default,5"), which older job plans resume with.
_BOX_FRAMING = {"hog": (1.357, -0.079), "haar": (1.269, -0.017), "haar:frontalface_default": (1.235, -0.019),
                "mmod": (1.476, -0.031)}
_DEFAULT_FRAMING = (1.30, -0.05)


def _framing(detector: str) -> tuple[float, float]:
    name, _, settings = detector.partition(":")
    return (_BOX_FRAMING.get(f"{name}:{settings.partition(',')[0]}") or _BOX_FRAMING.get(name)
            or _DEFAULT_FRAMING)
# From the 5 landmarks: side = eye distance / 0.296 (or nose-to-eye-line / 0.234 for turned
# heads); framing centre = eye midpoint + 0.0627 side downwards (in the face's own frame).
_EYE_DIST, _NOSE_DIST, _EYE_TO_CENTRE = 0.296, 0.234, 0.0627


@dataclass(frozen=True)
class FaceSpec:
    mode: str = "detect"  # "aligned" | "detect"
    box: tuple[int, int, int, int] | None = None  # aligned: the face box; None = whole image
    detector: str = "hog"  # see anondata.detect.get_detector
    on_no_face: str = "quarantine"  # "quarantine" | "keep"
    mask: str = "ellipse"  # "ellipse" (face only, feathered) | "full" (the whole crop)
    expand: float = 1.15  # detect: crop side / training framing side (the crop also always fits the fall-off)
    min_face: int = 32  # detect: faces narrower than this (px) are reported in notes
    # detect: a second detector; a face it finds that the anonymized faces do not cover (see
    # _missed_faces) quarantines the photo (a face the first detector missed would be published as is)
    cross_check: str | None = None

    def __post_init__(self):
        if self.mode not in ("aligned", "detect"):
            raise InputError(f"--faces must be 'aligned' or 'detect', got {self.mode!r}")
        if self.on_no_face not in ("quarantine", "keep"):
            raise InputError(f"--on-no-face must be 'quarantine' or 'keep', got {self.on_no_face!r}")
        if self.mask not in ("ellipse", "full"):
            raise InputError(f"face mask must be 'ellipse' or 'full', got {self.mask!r}")
        if self.box is not None:
            b = self.box
            if self.mode != "aligned":
                raise InputError("--face-box only applies to --faces aligned")
            # type() is int: True is an int to isinstance, and went into the record as JSON true, which restore refuses
            if len(b) != 4 or not all(type(v) is int and v >= 0 for v in b) or b[2] - b[0] < 8 or b[3] - b[1] < 8:
                raise InputError(f"--face-box must be x0,y0,x1,y1 integers with x1-x0 >= 8 and y1-y0 >= 8, got {b}")
        if self.cross_check is not None:
            if self.mode != "detect":
                raise InputError("--cross-check only applies to --faces detect")
            if self.cross_check == self.detector:
                raise InputError(f"--cross-check must be another detector than --detector ({self.detector!r})")
        # a bool is a number to isinstance (True counted as 1.0); anything else failed the range check with a TypeError
        if isinstance(self.expand, bool) or not isinstance(self.expand, numbers.Real) or not 1.0 <= self.expand <= 2.0:
            raise InputError(f"expand must be a number between 1.0 and 2.0, got {self.expand!r}")
        if type(self.min_face) is not int or self.min_face < 0:  # else a TypeError later, in every photo
            raise InputError(f"min_face must be a whole number of pixels >= 0, got {self.min_face!r}")


def parse_face_box(text: str) -> tuple[int, int, int, int]:
    """"x0,y0,x1,y1" -> ints (for the CLI's --face-box)."""
    try:
        b = tuple(int(v) for v in text.split(","))
    except ValueError:
        b = ()
    if len(b) != 4:
        raise InputError(f"--face-box must be four integers x0,y0,x1,y1 (e.g. 25,57,153,185), got {text!r}")
    return b  # type: ignore[return-value]


@dataclass
class PhotoResult:
    image: np.ndarray | None
    record: bytes | None
    quarantine_reason: str | None = None
    faces: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Place:
    """One face's geometry, exactly as stored in the record (integers only)."""

    crop: tuple[int, int, int, int]
    ellipse: tuple[int, int, int, int, int] | None  # cx, cy, rx, ry (1/U of w/h), angle (1/100 deg)
    feather: int | None  # 1/U

    @property
    def size(self) -> tuple[int, int]:
        return self.crop[2] - self.crop[0], self.crop[3] - self.crop[1]


# -- geometry ------------------------------------------------------------------------------------
def _ellipse_dist(place: _Place, w: int, h: int, cs=(slice(None), slice(None))) -> np.ndarray:
    """Normalized elliptic distance (1 on the face ellipse) at the pixel centres of a w x h grid
    over the crop (only the rows/columns in `cs`, so huge crops cost only their visible part)."""
    cx, cy, rx, ry = (v / U for v in place.ellipse[:4])
    ang = place.ellipse[4] / 100
    u = ((np.arange(w, dtype=np.float64)[cs[1]] + 0.5) / w - cx).astype(np.float32)
    v = ((np.arange(h, dtype=np.float64)[cs[0]] + 0.5) / h - cy).astype(np.float32)
    c, s = np.float32(math.cos(math.radians(ang))), np.float32(math.sin(math.radians(ang)))
    a = (u[None, :] * c + v[:, None] * s) / np.float32(rx)
    b = (v[:, None] * c - u[None, :] * s) / np.float32(ry)
    return np.sqrt(a * a + b * b)


def _dist_at(place: _Place, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Normalized elliptic distance of `place`'s ellipse at photo coordinates (xs columns, ys rows)."""
    cx, cy, rx, ry = (v / U for v in place.ellipse[:4])
    c, s = math.cos(math.radians(place.ellipse[4] / 100)), math.sin(math.radians(place.ellipse[4] / 100))
    w, h = place.size
    u, v = (xs - place.crop[0]) / w - cx, (ys - place.crop[1]) / h - cy
    a = (u[None, :] * c + v[:, None] * s) / rx
    b = (v[:, None] * c - u[None, :] * s) / ry
    return np.sqrt(a * a + b * b)


def _lipschitz(place: _Place) -> float:
    """The most `place`'s elliptic distance changes per photo pixel moved (any direction)."""
    w, h = place.size
    return U / (min(place.ellipse[2], place.ellipse[3]) * min(w, h))


def _core_masks(places: list[_Place], r: int) -> list[np.ndarray]:
    """Each face's (r, r) mask for the core: every pixel of its model crop whose value the paste-back
    can carry into a face, i.e. into a pixel inside its own ellipse or inside another face's.

    Why not the ellipse at r alone: outside its mask the core returns its input, the original seen
    through r, and resizing back mixes neighbouring r pixels (bicubic: 2 each side; area: r / size),
    so a ring inside the ellipse showed the original (up to 96% of a pixel's value); and where faces
    overlap, a neighbour's layer in its fall-off takes up to half the weight inside this face, with
    the original there too. Restore reads each mask from the core record, so older records restore
    as before."""
    cv2 = _cv2()
    out = []
    for j, p in enumerate(places):
        if p.ellipse is None:
            out.append(np.ones((r, r), bool))
            continue
        d = _ellipse_dist(p, r, r)
        need = d <= 1.0
        w, h = p.size
        xs, ys = p.crop[0] + (np.arange(r) + 0.5) * w / r, p.crop[1] + (np.arange(r) + 0.5) * h / r
        # Tested at the r pixel centres only, w / r photo pixels apart: where this face's fall-off meets
        # another's ellipse in a sliver narrower than that, no centre passed and that face kept ~1% of
        # the original (a turned face beside a small one). So both distances are widened by how much
        # they can change from a photo pixel to its nearest centre (half an r pixel each way); the
        # dilation below then reaches every r pixel resizing back takes from. Exact at size r.
        gap = 0.0 if (w, h) == (r, r) else math.hypot(w, h) / (2 * r)
        for i, q in enumerate(places):
            a, b = p.crop, q.crop
            if i != j and q.ellipse is not None and a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                need |= (d < p.feather / U + gap * _lipschitz(p)) & (_dist_at(q, xs, ys) <= 1.0 + gap * _lipschitz(q))
        # how far resizing back reaches, in r pixels: bicubic's 2 taps a side, or the area of a shrink;
        # nothing for a crop of size r (cv2.resize to the same size copies: an aligned 64 px face)
        if (w, h) == (r, r):
            out.append(need)
            continue
        k = 2 if min(w, h) >= r else math.ceil(r / min(w, h) / 2) + 1
        out.append(cv2.dilate(need.astype(np.uint8), np.ones((2 * k + 1, 2 * k + 1), np.uint8)) > 0)
    return out


def aligned_mask(r: int) -> np.ndarray:
    """The (r, r) face mask the job gives an aligned crop (`--faces aligned`, ellipse mask): for
    benchmarks that should measure what a release gets, background and all."""
    return _core_masks([_place_aligned((0, 0, r, r), False)], r)[0]


def _alpha(place: _Place, cs) -> np.ndarray:
    """Blend weight over the crop slice `cs`, float32: 1 inside the core's ellipse, smooth to 0 outside."""
    w, h = place.size
    if place.ellipse is None:
        return np.ones((cs[0].stop - cs[0].start, cs[1].stop - cs[1].start), np.float32)
    band = np.float32(place.feather / U - 1.0)
    t = np.clip((_ellipse_dist(place, w, h, cs) - np.float32(1.0)) / band, 0.0, 1.0)
    return np.float32(1.0) - t * t * (np.float32(3.0) - np.float32(2.0) * t)


def _quantize(crop, centre, radii, angle_deg, feather) -> _Place:
    x0, y0, x1, y1 = crop
    w, h = x1 - x0, y1 - y0
    ell = (
        int(round((centre[0] - x0) / w * U)), int(round((centre[1] - y0) / h * U)),
        max(1, int(round(radii[0] / w * U))), max(1, int(round(radii[1] / h * U))),
        int(round(angle_deg * 100)),
    )
    return _Place(crop, ell, int(round(feather * U)))


def _place_aligned(box, full: bool) -> _Place:
    if full:
        return _Place(tuple(box), None, None)
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy, rx, ry = _ALIGNED_ELLIPSE
    return _quantize(box, (x0 + cx * w, y0 + cy * h), (rx * w, ry * h), 0.0, _ALIGNED_FEATHER)


def _square_box(box, shape=None) -> tuple[float, float, float, float]:
    """The detector's box made square again. Detectors' boxes are square, but the built-in ones are
    clipped to the photo: a face cut by the border came as a narrow box, framed from its width as a
    face of that size, and up to 58% of its visible ellipse was published in the clear (a face
    40% past the left edge). A side at the photo's edge (`shape` (H, W)) grows outwards; a box
    that is merely tall or wide (a registered detector's) grows around its centre."""
    x0, y0, x1, y1 = box
    H, W = shape[:2] if shape is not None else (None, None)
    side = max(x1 - x0, y1 - y0)

    def grow(lo, hi, limit):
        if lo <= 0 and (limit is None or hi < limit):
            return hi - side, hi
        if limit is not None and hi >= limit and lo > 0:
            return lo, lo + side
        mid = (lo + hi) / 2
        return mid - side / 2, mid + side / 2

    if x1 - x0 < side:
        x0, x1 = grow(x0, x1, W)
    if y1 - y0 < side:
        y0, y1 = grow(y0, y1, H)
    return x0, y0, x1, y1


# A face cut by the photo's border is seen as a box inside the photo smaller than the face: Haar
# never reports a window past the border (up to 1.32x smaller on the astronaut and Grace Hopper cut
# 5-15% past an edge or corner), HOG falls a pyramid step (1.2x) smaller, and a corner clips both
# sides of the box (up to 1.35x). Framed from that box, up to 48% of the face's ellipse (25% of its
# inner face) was published in the clear. So a box within _BORDER_MARGIN of its side from the border
# is framed as a face _BORDER_GROW larger, grown past the border, with its ellipse _BORDER_ELLIPSE
# wider (benchmarks/border_faces.py: what is left in the clear, from up to 48% to up to 0.1%).
_BORDER_MARGIN, _BORDER_GROW, _BORDER_ELLIPSE = 0.08, 1.3, 1.15


def _grow_at_border(box, shape) -> tuple[tuple[float, float, float, float], bool]:
    """(the square `box` grown past the photo's border where it lies at it, whether it did)."""
    x0, y0, x1, y1 = box
    H, W = shape[:2]
    side = x1 - x0
    m = _BORDER_MARGIN * side
    at = (x0 <= m, y0 <= m, x1 >= W - m, y1 >= H - m)
    if not any(at):
        return box, False
    n = _BORDER_GROW * side

    def grow(lo, hi, at_lo, at_hi):
        if at_lo and not at_hi:
            return hi - n, hi
        if at_hi and not at_lo:
            return lo, lo + n
        mid = (lo + hi) / 2  # neither border, or both (a face filling the photo's width)
        return mid - n / 2, mid + n / 2

    (x0, x1), (y0, y1) = grow(x0, x1, at[0], at[2]), grow(y0, y1, at[1], at[3])
    return (x0, y0, x1, y1), True


def _place_detected(face, detector: str, expand: float, full: bool, shape=None, grow: bool = True) -> _Place:
    """`shape`: the photo's (H, W), which tells a box clipped at its border from a tall one (and a
    face at its border, framed larger if `grow`: _grow_at_border)."""
    box, at_border = _square_box(face.box, shape), False
    if shape is not None and grow:
        box, at_border = _grow_at_border(box, shape)
    x0, y0, x1, y1 = box
    k, dy = _framing(detector)
    s_box = (x1 - x0) * k
    c_box = np.array([(x0 + x1) / 2, (y0 + y1) / 2 + dy * s_box])
    side, centre, theta = s_box, c_box, 0.0
    lm = face.landmarks
    if lm is not None:
        e1, e2 = lm[0:2].mean(0), lm[2:4].mean(0)
        v = e2 - e1 if e2[0] >= e1[0] else e1 - e2
        ed = float(np.hypot(*v))
        if ed > 1e-3:
            ux, uy = v / ed
            em = (e1 + e2) / 2
            nose_perp = abs(ux * (lm[4][1] - em[1]) - uy * (lm[4][0] - em[0]))
            s_lm = max(ed / _EYE_DIST, nose_perp / _NOSE_DIST)
            c_lm = em + _EYE_TO_CENTRE * s_lm * np.array([-uy, ux])
            # Trust landmarks only when they agree with the box; never shrink below the box's framing.
            if s_lm <= 1.6 * s_box and np.hypot(*(c_lm - c_box)) <= 0.3 * s_box:
                side, centre, theta = max(s_lm, s_box), c_lm, math.atan2(uy, ux)
    ex, ey, rx, ry = _DETECT_ELLIPSE
    if at_border:
        rx, ry = rx * _BORDER_ELLIPSE, ry * _BORDER_ELLIPSE
    c, s = math.cos(theta), math.sin(theta)
    off = np.array([-(ey - 0.5) * s, (ey - 0.5) * c]) * side  # ellipse centre, rotated with the face
    ecentre = centre + off
    rxp, ryp = rx * side, ry * side
    f = _DETECT_FEATHER
    hx = f * math.hypot(rxp * c, ryp * s)
    hy = f * math.hypot(rxp * s, ryp * c)
    crop_side = max(expand * side, 2 * (abs(off[0]) + hx) + 2, 2 * (abs(off[1]) + hy) + 2)
    S = max(8, int(math.ceil(crop_side)))
    cx0, cy0 = int(round(centre[0] - S / 2)), int(round(centre[1] - S / 2))
    crop = (cx0, cy0, cx0 + S, cy0 + S)
    if full:
        return _Place(crop, None, None)
    return _quantize(crop, ecentre, (rxp, ryp), math.degrees(theta), f)


# -- pixels --------------------------------------------------------------------------------------
def _cv2():
    try:
        import cv2
    except ImportError:
        raise SetupError("photos need OpenCV for resizing; pip install 'anondata[faces]'") from None
    return cv2


def _resize(a: np.ndarray, w: int, h: int) -> np.ndarray:
    """float32 resize, linear in its input: area average when shrinking, bicubic when growing."""
    cv2 = _cv2()
    shrink = w <= a.shape[1] and h <= a.shape[0]
    return cv2.resize(a, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def _clip(crop, W, H):
    x0, y0, x1, y1 = crop
    return max(0, x0), max(0, y0), min(W, x1), min(H, y1)


def _crop_to_r(photo: np.ndarray, place: _Place, r: int) -> np.ndarray:
    """The crop (edge-replicated where it leaves the photo), resized to r x r, as uint8."""
    H, W = photo.shape[:2]
    x0, y0, x1, y1 = place.crop
    a0, b0, a1, b1 = _clip(place.crop, W, H)
    region = photo[b0:b1, a0:a1]
    if (a0, b0, a1, b1) != place.crop:
        region = np.pad(region, ((b0 - y0, y1 - b1), (a0 - x0, x1 - a1), (0, 0)), mode="edge")
    out = _resize(region.astype(np.float32), r, r)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _groups(places: list[_Place], W: int, H: int) -> list[tuple[tuple[int, int, int, int], list[int]]]:
    """Faces whose (clipped) crops overlap, transitively, with their bounding rectangle."""
    rects = [_clip(p.crop, W, H) for p in places]
    parent = list(range(len(rects)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(rects)):
        for j in range(i):
            a, b = rects[i], rects[j]
            if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                parent[find(i)] = find(j)
    members: dict[int, list[int]] = {}
    for i in range(len(rects)):
        members.setdefault(find(i), []).append(i)
    out = []
    for idx in sorted(members.values()):
        rs = [rects[i] for i in idx]
        out.append(((min(r[0] for r in rs), min(r[1] for r in rs), max(r[2] for r in rs), max(r[3] for r in rs)), idx))
    return out


class _Weights:
    """Per-face blend weights inside one group's rectangle, normalized so they sum to <= 1."""

    def __init__(self, places: list[_Place], roi, idx: list[int]):
        gx0, gy0, gx1, gy1 = roi
        total = np.zeros((gy1 - gy0, gx1 - gx0), np.float32)
        self.parts = []  # (face index, roi slice, crop slice, alpha)
        for i in idx:
            p = places[i]
            x0, y0 = p.crop[:2]
            a0, b0, a1, b1 = _clip(p.crop, gx1, gy1)
            a0, b0 = max(a0, gx0), max(b0, gy0)
            rs = (slice(b0 - gy0, b1 - gy0), slice(a0 - gx0, a1 - gx0))
            cs = (slice(b0 - y0, b1 - y0), slice(a0 - x0, a1 - x0))
            al = _alpha(p, cs)
            total[rs] += al
            self.parts.append((i, rs, cs, al))
        self.alpha_sum = total
        self.norm = np.maximum(total, np.float32(1.0))

    def apply(self, base: np.ndarray, layers: dict[int, np.ndarray], replace: bool) -> np.ndarray:
        """replace: (1 - W) * base + sum w_i layer_i; else base + sum w_i layer_i. -> rounded uint8."""
        acc = base.astype(np.float32)
        if replace:
            keep = np.ones(base.shape[:2], np.float32)
            add = np.zeros(base.shape, np.float32)
        for i, rs, cs, al in self.parts:
            w = al / self.norm[rs]
            if replace:
                keep[rs] -= w
                add[rs] += w[..., None] * layers[i][cs]
            else:
                acc[rs] += w[..., None] * layers[i][cs]
        if replace:
            acc = acc * np.maximum(keep, 0)[..., None] + add
        return np.clip(np.round(acc), 0, 255).astype(np.uint8)

    def total(self) -> np.ndarray:
        """Per pixel of the rectangle, the share `apply(replace=True)` takes from the faces (W)."""
        return self.alpha_sum / self.norm

    def union(self) -> np.ndarray:
        m = np.zeros(self.norm.shape, bool)
        for _, rs, _, _ in self.parts:
            m[rs] = True
        return m


def _up(diff_r: np.ndarray, place: _Place) -> np.ndarray:
    w, h = place.size
    return _resize(diff_r.astype(np.float32), w, h)


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _pack(a: np.ndarray) -> str:
    return canonical.b64e(zlib.compress(a.astype("<i2").tobytes(), 6))


def _unpack(text: str, n: int, what: str) -> np.ndarray:
    raw = canonical.b64d(text, what)
    try:
        d = zlib.decompressobj()
        data = d.decompress(raw, 2 * n + 1)
    except zlib.error:
        raise FormatError(f"{what} is not valid zlib data") from None
    if not d.eof or d.unused_data or len(data) != 2 * n:
        raise FormatError(f"{what} does not decompress to exactly {2 * n} bytes")
    return np.frombuffer(data, "<i2").astype(np.int16)


# -- records -------------------------------------------------------------------------------------
_TOP = {"v", "kind", "width", "height", "resolution", "mask", "anon_sha256", "faces", "lossless"}
_FACE = {"crop", "ellipse", "feather", "core", "fix"}


def _is_int(v, lo, hi) -> bool:
    return type(v) is int and lo <= v <= hi


def _hex64(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _crop_fits(c, W: int, H: int) -> bool:
    """A crop a photo record may hold: integers, overlapping the W x H photo, sides at most
    5 x its longer side (bounds restore's memory; a detector box inside the photo gives at most
    ~2.4 x expand x that side). Anonymizing checks the crops it writes with this too."""
    lim = 5 * max(W, H)
    return (len(c) == 4 and all(_is_int(v, -lim, lim) for v in c)
            and 1 <= c[2] - c[0] <= lim and 1 <= c[3] - c[1] <= lim
            and c[0] < W and c[1] < H and c[2] > 0 and c[3] > 0)


def _parse_record(data: bytes, what: str, resolution: int | None = None):
    """-> (record, places, core records, fixes). resolution: the restoring model's, checked before
    any fix is decompressed (each is resolution^2 x 6 bytes: at the 4096 a record may name, 100 MB
    from 130 kB of zlib, so a 4 MB record took 3 GB and half a minute before it was refused)."""
    d = canonical.loads(data, what)
    if not isinstance(d, dict) or set(d) != _TOP:
        got = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise FormatError(f"{what}: expected fields {sorted(_TOP)}, got {got}")
    if not _is_int(d["v"], 1, 2) or d["kind"] != KIND:  # JSON true == 1 in Python: not a version
        raise FormatError(f"{what}: unsupported version {d['v']!r} / kind {d['kind']!r}")
    if not _is_int(d["width"], 1, 10**6) or not _is_int(d["height"], 1, 10**6) or not _is_int(d["resolution"], 1, 4096):
        raise FormatError(f"{what}: width, height and resolution must be positive integers")
    if resolution is not None and d["resolution"] != resolution:
        raise InputError(f"{what}: made at model resolution {d['resolution']}, this model has {resolution}: "
                         "use the same --model")
    if d["mask"] not in ("ellipse", "full") or not _hex64(d["anon_sha256"]) or not isinstance(d["faces"], list):
        raise FormatError(f"{what}: bad mask, anon_sha256 or faces")
    W, H, full = d["width"], d["height"], d["mask"] == "full"
    places, cores, fixes = [], [], []
    for k, f in enumerate(d["faces"]):
        fw = f"{what}: faces[{k}]"
        if not isinstance(f, dict) or set(f) != _FACE:
            raise FormatError(f"{fw}: expected fields {sorted(_FACE)}")
        c = f["crop"]
        if not (isinstance(c, list) and _crop_fits(c, W, H)):
            raise FormatError(f"{fw}: crop must be 4 integers x0<x1, y0<y1 overlapping the {W}x{H} image")
        if full:
            if f["ellipse"] is not None or f["feather"] is not None:
                raise FormatError(f"{fw}: mask 'full' has no ellipse or feather")
            place = _Place(tuple(c), None, None)
        else:
            e = f["ellipse"]
            ok = (isinstance(e, list) and len(e) == 5 and all(_is_int(v, 0, 2 * U) for v in e[:2])
                  and all(_is_int(v, 1, 2 * U) for v in e[2:4]) and _is_int(e[4], -18000, 18000)
                  and _is_int(f["feather"], U + 1, 3 * U))
            if not ok:
                raise FormatError(f"{fw}: ellipse must be [cx, cy, rx, ry, angle] integers in range, feather > {U}")
            place = _Place(tuple(c), tuple(e), f["feather"])
        if not isinstance(f["core"], str) or not isinstance(f["fix"], str):
            raise FormatError(f"{fw}: core and fix must be base64url strings")
        places.append(place)
        cores.append(canonical.b64d(f["core"], f"{fw}.core"))
        r = d["resolution"]
        fix = _unpack(f["fix"], r * r * 3, f"{fw}.fix").reshape(r, r, 3)
        fixes.append(fix)
    ll = d["lossless"]
    want = {"sha256", "residual"} | ({"snap"} if d["v"] == 2 else set())  # v1 records have no snap
    if ll is not None and (not isinstance(ll, dict) or set(ll) != want or not _hex64(ll["sha256"])
                           or not all(isinstance(ll[k], str) for k in want - {"sha256"})):
        raise FormatError(f"{what}: lossless must be null or {{{', '.join(sorted(want))}}} (v{d['v']})")
    return d, places, cores, fixes


def _make_record(W, H, r, mask, anon, places, cores, fixes, lossless) -> bytes:
    return canonical.dumps({
        "v": 2, "kind": KIND, "width": W, "height": H, "resolution": r, "mask": mask,
        "anon_sha256": _sha(anon),
        "faces": [
            {"crop": list(p.crop), "ellipse": None if p.ellipse is None else list(p.ellipse),
             "feather": p.feather, "core": canonical.b64e(c), "fix": _pack(fx)}
            for p, c, fx in zip(places, cores, fixes)
        ],
        "lossless": lossless,
    })


def key_only_record(record: bytes) -> bytes:
    """The photo record without its lossless parts (the photo residual, and each face's core
    residual, snap and hash): what the key alone restores. For demos and evaluations, where a
    wrong key must show a wrong face rather than the lossless check's error."""
    from .restore_record import RestoreRecord

    d, _, cores, _ = _parse_record(record, "photo record")
    d["lossless"] = None
    for f, core in zip(d["faces"], cores):
        f["core"] = canonical.b64e(RestoreRecord.from_bytes(core).key_only().to_bytes())
    return canonical.dumps(d)


# -- the two operations ----------------------------------------------------------------------------
def _check_photo(img, what: str) -> np.ndarray:
    a = np.asarray(img)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or min(a.shape[:2]) < 1:
        raise InputError(f"{what}: expected RGB uint8 (H, W, 3) from decode_image, got {a.dtype} {a.shape}")
    return a


class _UnusableBox(Exception):
    """A detector's box that cannot be anonymized (str: the box and why)."""


def _detect(detector, name: str, img: np.ndarray, expand: float) -> list:
    """detector.detect(img), every box checked: built-in detectors clip theirs to the photo
    (detect._clip_box), a registered one may return anything. Placed as given, a box outside the
    photo crashed the whole batch, an empty one anonymized an 8 px crop for a face, and a huge one
    gave a crop restore refuses (_crop_fits), so the record could never be restored. Raises
    _UnusableBox, which quarantines the photo: dropping the box could publish a face. A list:
    a registered detector may yield its faces, and a spent generator handed on finds none."""
    H, W = img.shape[:2]
    found = list(detector.detect(img))
    for f in found:
        try:
            box = tuple(f.box)
        except TypeError:
            box = ()
        shown = list(box) if box else repr(f.box)
        if len(box) != 4 or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in box):
            raise _UnusableBox(f"{shown}: not 4 numbers x0, y0, x1, y1")
        if not all(math.isfinite(v) for v in box):
            raise _UnusableBox(f"{shown}: not finite")
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            raise _UnusableBox(f"{shown}: empty (x1 <= x0 or y1 <= y0)")
        if x1 <= 0 or y1 <= 0 or x0 >= W or y0 >= H:
            raise _UnusableBox(f"{shown}: outside the {W}x{H} photo")
        crop = _place_detected(f, name, expand, True, img.shape).crop
        if not _crop_fits(crop, W, H):
            raise _UnusableBox(f"{shown}: its crop {list(crop)} is over 5x the {W}x{H} photo's side, "
                               "more than a photo record holds")
    return found


def _find_places(img: np.ndarray, spec: FaceSpec) -> tuple[list[_Place] | None, str | None, list[str]]:
    """-> (places, quarantine reason, notes)."""
    H, W = img.shape[:2]
    full = spec.mask == "full"
    if spec.mode == "aligned":
        box = spec.box or (0, 0, W, H)
        if box[2] > W or box[3] > H:
            return None, f"face box {box} does not fit the {W}x{H} image", []
        return [_place_aligned(box, full)], None, []
    from .detect import get_detector

    name = spec.detector
    try:
        found = sorted(_detect(get_detector(name), name, img, spec.expand),
                       key=lambda f: (f.box[1], f.box[0], f.box[2], f.box[3]))
        places = [_place_detected(f, spec.detector, spec.expand, full, img.shape) for f in found]
        missed = []
        if spec.cross_check and (found or spec.on_no_face == "keep"):
            name = spec.cross_check
            missed = _missed_faces(img, places, get_detector(name), name, spec.expand)
    except InputError:
        raise  # unusable detector setup: the user must fix it, not every record
    except _UnusableBox as e:
        return None, f"detector {name!r} returned an unusable face box {e}: quarantined (check the detector)", []
    except Exception as e:  # noqa: BLE001 - a per-photo detector crash must quarantine, not leak
        return None, f"face detector {name!r} failed: {type(e).__name__}: {e}", []
    if missed:
        return None, (
            f"detector {spec.cross_check!r} (--cross-check) found {len(missed)} face(s) that {spec.detector!r} did not, "
            f"first at box {list(missed[0])}: quarantined so that a missed face is not published; review the photo"
        ), []
    notes = []
    for i, f in enumerate(found):
        fw = f.box[2] - f.box[0]
        if fw < spec.min_face:
            notes.append(f"face {i} is {fw} px wide (< {spec.min_face}): anonymized from an upscaled crop; "
                         "faces this small are often missed, check the photo")
    if not found:
        if spec.on_no_face == "quarantine":
            return None, f"no face found by detector {spec.detector!r} (use --on-no-face keep to keep such records)", []
        notes.append(f"no face found by detector {spec.detector!r}: kept unchanged (--on-no-face keep)")
    return places, None, notes


# The cross-check counts a pixel as anonymized where the paste-back takes at least _COVERED_WEIGHT
# of it from the faces, and a second detector's face as covered when _COVERED_SHARE of its inner
# face (elliptic distance <= _FEATURES in its own face ellipse: eyes, nose and mouth sit within
# ~0.6 in the training framing) is. Not its whole box: the box's corners (hair, background) get
# weight 0 even for the very face the first detector anonymized (86% of a box lies at weight ~1
# for the same box, 75% for Haar's box of a HOG face, frontalface_default); jitter between detectors (box shifted 15%
# or 15% larger) keeps >= 0.96 of the inner face, a face beside another one's chin 0.69 or less.
_COVERED_WEIGHT = 0.99
_COVERED_SHARE = 0.95
_FEATURES = 0.75


def _missed_faces(img: np.ndarray, places: list[_Place], detector, name: str,
                  expand: float) -> list[tuple[int, int, int, int]]:
    """Boxes of the faces `detector` (called `name`) finds that the anonymized faces do not cover.

    Covered means: nearly all of the face's inner ellipse (placed from its box as if it were
    anonymized itself) lies where the paste-back weight of `places` (`_Weights`) is ~1. Being
    inside a crop is not enough: the weight falls to 0 in a crop's corners, so a small face there
    would be published untouched."""
    H, W = img.shape[:2]
    found = _detect(detector, name, img, expand)
    covered = np.zeros((H, W), bool)
    if found:
        for roi, idx in _groups(places, W, H):
            gx0, gy0, gx1, gy1 = roi
            covered[gy0:gy1, gx0:gx1] |= _Weights(places, roi, idx).total() >= _COVERED_WEIGHT
    out = []
    for f in found:
        # its face at the detected size: grown at the border (as anonymized faces are), a face near
        # the edge that the anonymized one covers whole was judged missed (2 of 150 wild photos)
        p = _place_detected(f, name, expand, False, img.shape, grow=False)
        a0, b0, a1, b1 = _clip(p.crop, W, H)
        seen = np.zeros(0, bool)
        if a1 > a0 and b1 > b0:
            x0, y0 = p.crop[:2]
            inner = _ellipse_dist(p, *p.size, (slice(b0 - y0, b1 - y0), slice(a0 - x0, a1 - x0))) <= _FEATURES
            seen = covered[b0:b1, a0:a1][inner]
        if seen.size == 0:  # no inner face inside the photo: judge by the box itself
            # rounded outward: a registered detector's float box sliced the mask with floats, and
            # the TypeError quarantined the photo as a detector failure
            x0, y0, x1, y1 = f.box
            bx0, by0, bx1, by1 = _clip((math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)), W, H)
            seen = covered[by0:max(by0, by1), bx0:max(bx0, bx1)].reshape(-1)
        if seen.size and seen.mean() < _COVERED_SHARE:
            out.append(f.box)
    return out


def anonymize_photos(anon, images, keys, spec: FaceSpec, lossless: bool = False,
                     floor_db: float | None = None) -> list[PhotoResult]:
    """Anonymize every face of every photo; one core call for all crops. See the module docstring.
    floor_db: see Anonymizer.anonymize (a face whose key-only restore is poor keeps its residual)."""
    from .keystream import check_key, face_key

    if len(images) != len(keys):
        raise InputError(f"expected one key per photo: {len(images)} photos, {len(keys)} keys")
    images = [_check_photo(im, f"images[{i}]") for i, im in enumerate(images)]
    keys = [check_key(k, f"keys[{i}]") for i, k in enumerate(keys)]
    r = anon.resolution
    results: list[PhotoResult] = []
    all_places: list[list[_Place]] = []
    crops, fkeys, masks = [], [], []
    for img, key in zip(images, keys):
        places, reason, notes = _find_places(img, spec)
        results.append(PhotoResult(None, None, reason, 0 if places is None else len(places), notes))
        all_places.append(places or [])
        for i, p in enumerate(places or []):
            crops.append(_crop_to_r(img, p, r))
            fkeys.append(face_key(key, i))
        masks.extend(_core_masks(places or [], r))
    if crops:
        out, recs = anon.anonymize(np.stack(crops), fkeys, np.stack(masks), lossless=lossless, floor_db=floor_db)
    k = 0
    for img, res, places in zip(images, results, all_places):
        if res.quarantine_reason is not None:
            continue
        n = len(places)
        x, a, core = crops[k:k + n], out[k:k + n] if n else [], [rec.to_bytes() for rec in recs[k:k + n]] if n else []
        k += n
        res.image, res.record = _paste(img, places, x, a, core, r, spec.mask, lossless)
    return results


def _paste(img, places, x, a, core, r, mask, lossless):
    H, W = img.shape[:2]
    anon_img = img.copy()
    groups = _groups(places, W, H)
    weights = []
    for roi, idx in groups:
        wts = _Weights(places, roi, idx)
        gx0, gy0, gx1, gy1 = roi
        ups = {i: _up(a[i], places[i]) for i in idx}
        # only the group's crops: its rectangle can hold a face of another group, already pasted
        u = wts.union()
        anon_img[gy0:gy1, gx0:gx1][u] = wts.apply(img[gy0:gy1, gx0:gx1], ups, replace=True)[u]
        weights.append(wts)
    fixes = [a[i].astype(np.int16) - _crop_to_r(anon_img, p, r).astype(np.int16) for i, p in enumerate(places)]
    ll = None
    if lossless:
        # The core's lossless restore returns exactly the crops it was given, so the key-only
        # estimate restore will compute is known here without running the model again.
        parts, orig = [], []
        for (roi, idx), wts in zip(groups, weights):
            est = _estimate(anon_img, roi, idx, wts, places, x, a)
            gx0, gy0, gx1, gy1 = roi
            u = wts.union()
            o = img[gy0:gy1, gx0:gx1][u]
            parts.append((o.astype(np.int16) - est[u].astype(np.int16)).reshape(-1))
            orig.append(o.reshape(-1))
        res = np.concatenate(parts) if parts else np.zeros(0, np.int16)
        # The residues mod 3 of the original let restore absorb a +-1 drift of its estimate (another
        # OpenCV or numpy rounding the resize differently), as the core's snap does inside a crop.
        trits = (np.concatenate(orig) % 3) if orig else np.zeros(0, np.uint8)
        ll = {"sha256": _sha(img), "residual": _pack(res), "snap": canonical.b64e(pack_trits(trits))}
    return anon_img, _make_record(W, H, r, mask, anon_img, places, core, fixes, ll)


def _estimate(stored, roi, idx, wts, places, x, a) -> np.ndarray:
    gx0, gy0, gx1, gy1 = roi
    ups = {i: _up(x[i].astype(np.int16) - a[i].astype(np.int16), places[i]) for i in idx}
    return wts.apply(stored[gy0:gy1, gx0:gx1], ups, replace=False)


def restore_photos(anon, images, keys, records, ids: list[str] | None = None) -> list[np.ndarray]:
    """Stored (anonymized) photos + record keys + photo records -> restored photos.

    Raises FormatError/IntegrityError/InputError naming the photo (by `ids` when given)."""
    from .keystream import check_key, face_key

    if not len(images) == len(keys) == len(records):
        raise InputError(f"restore needs one key and one record per photo: {len(images)}, {len(keys)}, {len(records)}")
    names = list(ids) if ids is not None else [f"#{i}" for i in range(len(images))]
    r = anon.resolution
    parsed, inputs, fkeys, cores, crop_names = [], [], [], [], []
    for i, (img, key, rec) in enumerate(zip(images, keys, records)):
        what = f"photo record of {names[i]!r}"
        img = _check_photo(img, f"photo {names[i]!r}")
        key = check_key(key, f"key of {names[i]!r}")
        d, places, core, fixes = _parse_record(rec, what, r)
        if img.shape[:2] != (d["height"], d["width"]):
            raise InputError(f"{what}: photo is {img.shape[1]}x{img.shape[0]}, the record is for {d['width']}x{d['height']}")
        if _sha(img) != d["anon_sha256"]:
            raise IntegrityError(f"{what}: the stored photo is not the one this record was made for "
                                 "(changed or re-encoded lossily); restore needs the published pixels")
        a = []
        for j, (p, fx) in enumerate(zip(places, fixes)):
            v = _crop_to_r(img, p, r).astype(np.int16) + fx
            if v.min() < 0 or v.max() > 255:
                raise FormatError(f"{what}: faces[{j}].fix does not match the stored photo")
            a.append(v.astype(np.uint8))
            inputs.append(a[-1])
            fkeys.append(face_key(key, j))
            cores.append(core[j])
            crop_names.append(f"photo {names[i]!r}, face {j}")
        parsed.append((img, d, places, a))
    restored_crops = anon.restore(np.stack(inputs), fkeys, cores, names=crop_names) if inputs else []
    out, k = [], 0
    for i, (img, d, places, a) in enumerate(parsed):
        x = list(restored_crops[k:k + len(places)])
        k += len(places)
        H, W = img.shape[:2]
        result = img.copy()
        groups = _groups(places, W, H)
        parts = []
        for roi, idx in groups:
            wts = _Weights(places, roi, idx)
            est = _estimate(img, roi, idx, wts, places, x, a)
            gx0, gy0, gx1, gy1 = roi
            u = wts.union()
            result[gy0:gy1, gx0:gx1][u] = est[u]  # as in _paste: not another group's face in the rectangle
            parts.append((roi, u))
        ll = d["lossless"]
        if ll is not None:
            what = f"photo record of {names[i]!r}: lossless"
            n = sum(int(u.sum()) for _, u in parts) * 3
            res = _unpack(ll["residual"], n, f"{what}.residual")
            trits = None
            if "snap" in ll:
                try:
                    trits = unpack_trits(canonical.b64d(ll["snap"], f"{what}.snap"), n)
                except FormatError as e:
                    raise FormatError(f"{what}.snap: {e}") from None
            o = 0
            for (gx0, gy0, gx1, gy1), u in parts:
                m = int(u.sum()) * 3
                view = result[gy0:gy1, gx0:gx1]
                v = view[u].astype(np.int16) + res[o:o + m].reshape(-1, 3)
                if trits is not None:
                    v = snap(v.reshape(-1), trits[o:o + m]).reshape(-1, 3)
                o += m
                if v.size and (v.min() < 0 or v.max() > 255):
                    v = np.clip(v, 0, 255)  # the hash check below reports it
                view[u] = v.astype(np.uint8)
            if _sha(result) != ll["sha256"]:
                raise LosslessMismatch(f"photo {names[i]!r}: lossless restore does not reproduce the original (hash "
                                     "mismatch): wrong key, or a different device/dtype than the one that anonymized it")
        out.append(result)
    return out
