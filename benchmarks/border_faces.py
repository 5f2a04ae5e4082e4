"""Faces cut by the photo's border: how much of the face stays in the clear.

The public-domain astronaut (skimage) is cut so her face lies 10-50% past the left, right or top
edge. The job's own detection and placement (`faces.anonymize_photos`, HOG with the Haar
cross-check) run on each cut with a stand-in core that sets every masked pixel to 0, so any
non-zero pixel left inside the face is the original's. "The face" is the ellipse the job places
for her whole, uncut face (found on the full photo), restricted to what the cut keeps.

Two rows per cut: the job as it is, and the job framing the detector's clipped box as given
(`faces._square_box` switched off: how it was before 2026-11-28).

    python benchmarks/border_faces.py
"""

from __future__ import annotations

import numpy as np
from skimage.data import astronaut

from anondata import detect, faces as F
from anondata.faces import FaceSpec, anonymize_photos
from anondata.keystream import new_key


class _Rec:
    def to_bytes(self) -> bytes:
        return b""


class ZeroCore:
    """Stand-in core: every masked pixel becomes 0, the rest stays (as the core leaves it)."""

    resolution = 32

    def anonymize(self, images, keys, masks=None, lossless=False, floor_db=None):
        return np.where(masks[..., None], 0, images).astype(np.uint8), [_Rec() for _ in masks]


def _cut(img, box, side: str, share: float):
    """(photo cut `share` of the face box past `side`, offset of the cut photo in the full one)."""
    x0, y0, x1, y1 = box
    if side == "left":
        c = int(x0 + share * (x1 - x0))
        return img[:, c:], (c, 0)
    if side == "right":
        c = int(x1 - share * (x1 - x0))
        return img[:, :c], (0, 0)
    c = int(y0 + share * (y1 - y0))
    return img[c:], (0, c)


def _face_pixels(face, off, shape) -> np.ndarray:
    """The uncut face's ellipse (as the job places it on the full photo), inside the cut photo."""
    x0, y0, x1, y1 = face.box
    moved = detect.Face((x0 - off[0], y0 - off[1], x1 - off[0], y1 - off[1]), 1.0,
                        face.landmarks - np.array(off, np.float32))
    p = F._place_detected(moved, "hog", 1.0, False, shape)
    H, W = shape[:2]
    a0, b0, a1, b1 = F._clip(p.crop, W, H)
    inside = np.zeros((H, W), bool)
    if a1 > a0 and b1 > b0:
        cs = (slice(b0 - p.crop[1], b1 - p.crop[1]), slice(a0 - p.crop[0], a1 - p.crop[0]))
        inside[b0:b1, a0:a1] = F._ellipse_dist(p, *p.size, cs) <= 1.0
    return inside


def main() -> int:
    full = np.maximum(astronaut(), 1)  # no original pixel is 0
    face = max(detect.get_detector("hog").detect(full), key=lambda f: f.box[2] - f.box[0])
    squaring = F._square_box
    print("| cut past | share of the face box | face pixels in the photo | left in the clear (now) | "
          "left in the clear (clipped box as given) |")
    print("|---|---|---|---|---|")
    for side in ("left", "right", "top"):
        for share in (0.1, 0.2, 0.3, 0.4, 0.5):
            img, off = _cut(full, face.box, side, share)
            img = np.ascontiguousarray(img)
            inside = _face_pixels(face, off, img.shape)
            cells = []
            for square in (True, False):
                F._square_box = squaring if square else (lambda box, shape=None: tuple(box))
                try:
                    res = anonymize_photos(ZeroCore(), [img], [new_key()],
                                           FaceSpec(mode="detect", detector="hog", cross_check="haar"))[0]
                finally:
                    F._square_box = squaring
                if res.image is None:
                    cells.append("quarantined (no face found)" if "no face" in res.quarantine_reason
                                 else "quarantined")
                else:
                    kept = (res.image[inside] != 0).any(-1)
                    cells.append(f"{kept.mean():.1%} ({res.faces} face(s) found)")
            print(f"| {side} | {share:.0%} | {int(inside.sum())} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
