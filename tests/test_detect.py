from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("dlib")
pytest.importorskip("cv2")
skimage_data = pytest.importorskip("skimage.data")

from anondata import detect  # noqa: E402
from anondata.errors import InputError  # noqa: E402

ASTRONAUT_FACE = (175, 70, 270, 170)  # generous box around the face in skimage.data.astronaut()


def _overlap(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = (a[2] - a[0]) * (a[3] - a[1])
    return ix * iy / area


@pytest.fixture(scope="module")
def astronaut():
    return skimage_data.astronaut()


@pytest.mark.parametrize("name", ["hog", "haar", "haar:frontalface_default,5"])
def test_finds_the_astronaut(astronaut, name):
    faces = detect.get_detector(name).detect(astronaut)
    best = [f for f in faces if _overlap(f.box, ASTRONAUT_FACE) > 0.8]
    assert len(best) == 1
    f = best[0]
    x0, y0, x1, y1 = f.box
    assert 0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 512 and all(isinstance(v, int) for v in f.box)
    assert f.landmarks is not None and f.landmarks.shape == (5, 2)
    # Landmarks (eyes, nose) lie inside the face box.
    assert (f.landmarks[:, 0] > x0).all() and (f.landmarks[:, 0] < x1).all()
    assert (f.landmarks[:, 1] > y0).all() and (f.landmarks[:, 1] < y1).all()


def test_mmod_cnn_detector(astronaut):
    d = detect.MmodDetector(upsample=0)
    faces = d.detect(np.ascontiguousarray(astronaut[40:240, 120:320]))
    assert len(faces) == 1 and _overlap(tuple(np.add(faces[0].box, (120, 40, 120, 40))), ASTRONAUT_FACE) > 0.8


def test_large_photo_is_searched_downscaled_and_boxes_map_back(astronaut):
    big = np.kron(astronaut, np.ones((4, 4, 1), np.uint8))  # 2048x2048, face at 4x
    d = detect.HogDetector(max_side=512)
    faces = [f for f in d.detect(big) if _overlap(f.box, tuple(4 * v for v in ASTRONAUT_FACE)) > 0.8]
    assert len(faces) == 1


@pytest.mark.parametrize("name", ["hog", "haar", "haar:frontalface_default,5"])
def test_no_face_in_flat_or_noise_image(name):
    flat = np.full((120, 160, 3), 128, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    d = detect.get_detector(name)
    assert d.detect(flat) == [] and d.detect(noise) == []


def test_haar_setting_is_named_in_the_spec():
    """"haar" is detect.HAAR_SETTINGS; "haar:CASCADE,MIN_NEIGHBORS" another one (job plans name it,
    so that a resumed job keeps the setting it started with); a bad one says the format."""
    d = detect.get_detector("haar")
    assert (d.cascade, d.min_neighbors) == ("frontalface_alt2", 2) and detect.HAAR_SETTINGS == "frontalface_alt2,2"
    before = detect.get_detector("haar:" + detect.HAAR_SETTINGS_BEFORE)
    assert (before.cascade, before.min_neighbors) == ("frontalface_default", 5)
    for bad in ("haar:frontalface_alt2", "haar:frontalface_alt2,0", "haar:eye,3", "haar:frontalface_alt2,x"):
        with pytest.raises(InputError, match="expected haar:CASCADE,MIN_NEIGHBORS .* e.g. haar:frontalface_alt2,2"):
            detect.get_detector(bad)


def test_unknown_detector_lists_the_choices():
    with pytest.raises(InputError, match="unknown face detector 'retinaface'; choose one of: ") as e:
        detect.get_detector("retinaface")
    choices = str(e.value).split("choose one of: ")[1].split(", ")  # other tests may have registered more
    assert {"haar", "hog", "mmod", "yunet"} <= set(choices) and choices == sorted(choices)


def test_detector_needing_a_download_fails_clearly(tmp_path):
    with pytest.raises(InputError, match="no PyPI package ships"):
        detect.get_detector("yunet")
    with pytest.raises(InputError, match="not found"):
        detect.get_detector(f"yunet:{tmp_path / 'missing.onnx'}")


def test_register_a_detector():
    class One:
        name = "one"

        def detect(self, rgb):
            return [detect.Face((1, 2, 30, 40), 1.0, None)]

    detect.register("one-test", lambda arg: One())
    assert detect.get_detector("one-test").detect(np.zeros((50, 50, 3), np.uint8))[0].box == (1, 2, 30, 40)


def test_dlib_rectangles_convert_to_half_open_boxes_and_back():
    r = detect.rect_of((3, 4, 10, 12))
    assert (r.left(), r.top(), r.right(), r.bottom()) == (3, 4, 9, 11) and (r.width(), r.height()) == (7, 8)
    assert detect.box_of(r) == (3, 4, 10, 12)


def _astronaut_at(canvas, k, x, y):
    """Paste the astronaut scaled by k at (x, y); -> the box of her face (HOG's at k = 1)."""
    import cv2

    a = cv2.resize(skimage_data.astronaut(), (round(512 * k), round(512 * k)), interpolation=cv2.INTER_AREA)
    canvas[y:y + a.shape[0], x:x + a.shape[1]] = a
    return tuple(round(v) for v in (x + 175 * k, y + 76 * k, x + 266 * k, y + 167 * k))


@pytest.mark.parametrize("name", ["hog", "haar"])
def test_small_face_in_a_photo_larger_than_the_working_size_is_found(name):
    """A photo over max_side was searched only on a downscaled copy, so a face under ~40 px / scale
    was never seen (64 px faces in a 6000x4000 photo were published as they were, and the Haar
    cross-check, downscaled too, did not see them either). Full-resolution tiles find it, as in a
    photo of max_side."""
    canvas = np.full((1200, 1600, 3), 90, np.uint8)
    canvas[:, :, 2] = np.linspace(60, 200, 1600).astype(np.uint8)
    face = _astronaut_at(canvas, 0.5 if name == "hog" else 0.85, 900, 500)
    d = detect.HogDetector(max_side=512) if name == "hog" else detect.HaarDetector("frontalface_alt2", 2, max_side=512)
    tile = np.ascontiguousarray(canvas[400:912, 800:1312])
    assert any(_overlap(f.box, tuple(np.subtract(face, (800, 400, 800, 400)))) > 0.5 for f in d.detect(tile))
    assert any(_overlap(f.box, face) > 0.5 for f in d.detect(canvas))
