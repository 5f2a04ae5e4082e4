"""Faces cut by the photo's border or corner: how much of the face stays in the clear.

Two public-domain faces, the astronaut (skimage) and Grace Hopper (matplotlib), are cut so 10-40%
of their face box lies past one edge (left, right, top, bottom) or two (the four corners). The
job's own detection and placement (`faces.anonymize_photos`) run on each cut with a stand-in core
that sets every masked pixel to 0, so any non-zero pixel left inside the face is the original's.
"The face" is the ellipse the job places for her whole, uncut face (HOG's box and landmarks on the
full photo, framed as given), restricted to what the cut keeps. Detectors: HOG with the Haar
cross-check (the default) and Haar with the HOG cross-check.

Two numbers per group: the job as it is, and with `faces._grow_at_border` switched off (how it was
before 2026-11-29: a box at the border framed at its detected size).

    python benchmarks/border_faces.py
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from skimage.data import astronaut

from anondata import detect, faces as F
from anondata.faces import FaceSpec, anonymize_photos
from anondata.keystream import new_key

SIDES = {"edge": ("left", "right", "top", "bottom"),
         "corner": ("left+top", "right+top", "left+bottom", "right+bottom")}
SHARES = (0.1, 0.15, 0.2, 0.3, 0.4)


class _Rec:
    def to_bytes(self) -> bytes:
        return b""


class ZeroCore:
    """Stand-in core: every masked pixel becomes 0, the rest stays (as the core leaves it)."""

    resolution = 32

    def anonymize(self, images, keys, masks=None, lossless=False, floor_db=None):
        return np.where(masks[..., None], 0, images).astype(np.uint8), [_Rec() for _ in masks]


def _photos() -> dict[str, np.ndarray]:
    from matplotlib.cbook import get_sample_data

    with get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    return {"astronaut": astronaut(), "Grace Hopper": hopper}


def _cut(img, box, sides: str, share: float):
    """(photo cut `share` of the face box past each of `sides`, offset of the cut photo in the full one)."""
    x0, y0, x1, y1 = box
    H, W = img.shape[:2]
    c = int(share * (x1 - x0))
    cx0, cy0 = x0 + c if "left" in sides else 0, y0 + c if "top" in sides else 0
    cx1, cy1 = x1 - c if "right" in sides else W, y1 - c if "bottom" in sides else H
    return img[cy0:cy1, cx0:cx1], (cx0, cy0)


def _face_pixels(face, off, shape) -> np.ndarray:
    """The uncut face's ellipse (as the job places it on the full photo), inside the cut photo."""
    x0, y0, x1, y1 = face.box
    moved = detect.Face((x0 - off[0], y0 - off[1], x1 - off[0], y1 - off[1]), 1.0,
                        face.landmarks - np.array(off, np.float32))
    p = F._place_detected(moved, "hog", 1.0, False)  # no photo shape: the whole box, framed as given
    H, W = shape[:2]
    a0, b0, a1, b1 = F._clip(p.crop, W, H)
    inside = np.zeros((H, W), bool)
    if a1 > a0 and b1 > b0:
        cs = (slice(b0 - p.crop[1], b1 - p.crop[1]), slice(a0 - p.crop[0], a1 - p.crop[0]))
        inside[b0:b1, a0:a1] = F._ellipse_dist(p, *p.size, cs) <= 1.0
    return inside


def main() -> int:
    growing = F._grow_at_border
    print("| detector (cross-check) | photo | cut past | cuts | face found | "
          "left in the clear, mean / max (now) | same, box at the border not grown (before) |")
    print("|---|---|---|---|---|---|---|")
    for det, cc in (("hog", "haar"), ("haar", "hog")):
        for name, full in _photos().items():
            full = np.maximum(full, 1)  # no original pixel is 0
            face = max(detect.get_detector("hog").detect(full), key=lambda f: f.box[2] - f.box[0])
            for group, sides in SIDES.items():
                kept = {True: [], False: []}
                n = 0
                for side in sides:
                    for share in SHARES:
                        img, off = _cut(full, face.box, side, share)
                        img = np.ascontiguousarray(img)
                        inside = _face_pixels(face, off, img.shape)
                        n += 1
                        for grow in (True, False):
                            F._grow_at_border = growing if grow else (lambda box, shape: (box, False))
                            try:
                                res = anonymize_photos(ZeroCore(), [img], [new_key()],
                                                       FaceSpec(mode="detect", detector=det, cross_check=cc))[0]
                            finally:
                                F._grow_at_border = growing
                            if res.image is None:
                                continue
                            left = (res.image[inside] != 0).any(-1).mean()
                            if left < 0.99:  # else only another "face" was found (the mission patch)
                                kept[grow].append(left)
                cells = []
                for grow in (True, False):
                    k = np.array(kept[grow])
                    cells.append(f"{k.mean():.1%} / {k.max():.1%}" if k.size else "-")
                print(f"| {det} ({cc}) | {name} | {group} | {n} | {len(kept[True])} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
