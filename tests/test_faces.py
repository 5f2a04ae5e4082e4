from __future__ import annotations

import io
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

cv2 = pytest.importorskip("cv2")
pytest.importorskip("dlib")
skimage_data = pytest.importorskip("skimage.data")

from anondata import canonical, detect  # noqa: E402
from anondata.errors import FormatError, InputError, IntegrityError  # noqa: E402
from anondata.faces import FaceSpec, _parse_record, anonymize_photos, parse_face_box, restore_photos  # noqa: E402
from anondata.images import decode_image  # noqa: E402
from anondata.keystream import new_key  # noqa: E402


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def anon(tmp_path_factory):
    import torch

    from anondata.anonymizer import Anonymizer
    from anondata.testing import tiny_model_dir

    # A 40k-parameter model gains nothing from threads, and on a shared machine they thrash.
    torch.set_num_threads(1)

    return Anonymizer.from_pretrained(tiny_model_dir(tmp_path_factory.mktemp("m"), resolution=32), steps=2, inversion_iters=1)


class _Rec:
    def __init__(self, b):
        self.b = b

    def to_bytes(self):
        return self.b


class InvertAnon:
    """Exactly invertible stand-in for the core (colours inverted inside the mask), so the photo
    maths can be checked without the model's own restore error."""

    resolution = 32

    def anonymize(self, images, keys, masks=None, lossless=False, floor_db=None):
        assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3) and len(keys) == len(images)
        assert all(isinstance(k, bytes) and len(k) == 32 for k in keys)
        out = np.where(masks[..., None], 255 - images, images).astype(np.uint8)
        return out, [_Rec(np.packbits(m).tobytes()) for m in masks]

    def restore(self, images, keys, recs, names=None):
        m = np.stack([np.unpackbits(np.frombuffer(r, np.uint8)).reshape(32, 32).astype(bool) for r in recs])
        return np.where(m[..., None], 255 - images, images).astype(np.uint8)


def _small(a, w):
    return cv2.resize(a, (w, round(a.shape[0] * w / a.shape[1])), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def group_photo():
    """Astronaut and Grace Hopper (sample photos shipped with dependencies) on one canvas."""
    from matplotlib.cbook import get_sample_data

    with get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    canvas = np.full((300, 560, 3), 90, np.uint8)
    canvas[:, :, 2] = np.linspace(60, 200, 560).astype(np.uint8)  # a background that is not flat
    a = _small(skimage_data.astronaut(), 280)
    canvas[10:290, 0:280] = a
    h = _small(hopper, 230)
    canvas[20:20 + h.shape[0], 310:540] = h[:270]
    return canvas


def _crops(record: bytes):
    return [tuple(p.crop) for p in _parse_record(record, "t")[1]]


def _outside(shape, crops) -> np.ndarray:
    m = np.ones(shape[:2], bool)
    for x0, y0, x1, y1 in crops:
        m[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = False
    return m


# -- detect mode on real photos --------------------------------------------------------------------
@pytest.mark.parametrize("detector", ["hog", "haar"])
def test_group_photo_each_face_changed_background_identical_lossless_exact(anon, group_photo, detector):
    keys = [new_key()]
    res = anonymize_photos(anon, [group_photo], keys, FaceSpec(mode="detect", detector=detector), lossless=True)[0]
    assert res.quarantine_reason is None and res.faces >= 2
    faces = sorted(detect.get_detector(detector).detect(group_photo), key=lambda f: (f.box[1], f.box[0]))
    assert len(faces) == res.faces
    centres = [((f.box[0] + f.box[2]) // 2, (f.box[1] + f.box[3]) // 2) for f in faces]
    assert any(x < 280 for x, _ in centres) and any(x > 310 for x, _ in centres)  # both people found
    for f in faces:
        x0, y0, x1, y1 = f.box
        inner = (slice(y0 + (y1 - y0) // 4, y1 - (y1 - y0) // 4), slice(x0 + (x1 - x0) // 4, x1 - (x1 - x0) // 4))
        changed = np.any(res.image[inner] != group_photo[inner], axis=2).mean()
        assert changed > 0.9, f"face {f.box} only {changed:.0%} changed"
    crops = _crops(res.record)
    out = _outside(group_photo.shape, crops)
    assert out.mean() > 0.5
    assert np.array_equal(res.image[out], group_photo[out])
    restored = restore_photos(anon, [res.image], keys, [res.record])[0]
    assert np.array_equal(restored, group_photo)


def test_key_only_restore_is_original_outside_and_close_inside(group_photo):
    keys = [new_key()]
    fake = InvertAnon()
    res = anonymize_photos(fake, [group_photo], keys, FaceSpec(mode="detect"))[0]
    assert res.faces >= 2
    restored = restore_photos(fake, [res.image], keys, [res.record])[0]
    changed = np.any(res.image != group_photo, axis=2)
    out = _outside(group_photo.shape, _crops(res.record))
    assert np.array_equal(restored[out], group_photo[out])
    err = np.abs(restored.astype(int) - group_photo.astype(int))[changed]
    anon_err = np.abs(res.image.astype(int) - group_photo.astype(int))[changed]
    # Restored through the model's 32 px: blurred, but far closer than the anonymized face.
    assert err.mean() < 20 and err.mean() < anon_err.mean() / 4


def test_blend_weight_never_exceeds_one_for_overlapping_faces():
    class Two:
        name = "two"

        def detect(self, rgb):
            return [detect.Face((40, 40, 100, 100), 1.0), detect.Face((70, 50, 130, 110), 1.0)]

    detect.register("two-overlapping", lambda arg: Two())
    img = np.random.default_rng(1).integers(0, 256, (170, 200, 3), dtype=np.uint8)
    keys = [new_key()]
    fake = InvertAnon()
    res = anonymize_photos(fake, [img], keys, FaceSpec(mode="detect", detector="two-overlapping"), lossless=True)[0]
    assert res.faces == 2
    # Where the two faces overlap at full weight, no trace of the original remains: the pixel is
    # the mean of two inverted crops, and never the original.
    centre = (slice(75, 85), slice(80, 90))
    assert np.abs(res.image[centre].astype(int) - img[centre].astype(int)).mean() > 40
    restored = restore_photos(fake, [res.image], keys, [res.record])[0]
    assert np.array_equal(restored, img)


def test_faces_at_the_border_and_tiny_faces_are_noted(anon):
    class Edge:
        name = "edge"

        def detect(self, rgb):
            return [detect.Face((0, 0, 30, 30), 1.0), detect.Face((170, 100, 200, 150), 1.0)]

    detect.register("edge-faces", lambda arg: Edge())
    img = np.random.default_rng(2).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    keys = [new_key()]
    res = anonymize_photos(anon, [img], keys, FaceSpec(mode="detect", detector="edge-faces", min_face=32),
                           lossless=True)[0]
    crops = _crops(res.record)
    assert crops[0][0] < 0 and crops[0][1] < 0 and crops[1][2] > 200  # crops leave the photo
    assert any("face 0 is 30 px" in n for n in res.notes) and any("face 1 is 30 px" in n for n in res.notes)
    assert np.array_equal(restore_photos(anon, [res.image], keys, [res.record])[0], img)


class Blackout:
    """Stand-in core that sets every masked pixel to 0 (and leaves the rest, as the core does), so a
    non-zero pixel of the pasted photo inside a face ellipse is the original's. Its records hold the
    crops it was given, which restore returns, as the core's lossless restore does."""

    resolution = 32

    def anonymize(self, images, keys, masks=None, lossless=False, floor_db=None):
        return np.where(masks[..., None], 0, images).astype(np.uint8), [_Rec(im.tobytes()) for im in images]

    def restore(self, images, keys, recs, names=None):
        return np.stack([np.frombuffer(r, np.uint8).reshape(32, 32, 3) for r in recs])


def _inside_faces(record: bytes, shape) -> np.ndarray:
    """The photo's pixels at full face weight (the paste-back's weight 1): inside a face ellipse, at
    the crop's own pixel grid, or anywhere in the crop for mask "full"."""
    from anondata.faces import _clip, _ellipse_dist

    H, W = shape[:2]
    inside = np.zeros((H, W), bool)
    for p in _parse_record(record, "t")[1]:
        a0, b0, a1, b1 = _clip(p.crop, W, H)
        cs = (slice(b0 - p.crop[1], b1 - p.crop[1]), slice(a0 - p.crop[0], a1 - p.crop[0]))
        inside[b0:b1, a0:a1] |= True if p.ellipse is None else _ellipse_dist(p, *p.size, cs) <= 1.0
    return inside


# Faces 1 and 2 overlap diagonally, so they are pasted as one group over their bounding rectangle;
# face 0 (first from the top) overlaps neither but sits in that rectangle's corner.
_CORNER_FACES = [(240, 95, 270, 125), (100, 120, 180, 200), (200, 200, 280, 280)]
# A face turned by its landmarks (eyes at -27 degrees) and a small face whose ellipse's top meets the
# turned one's fall-off in a sliver narrower than one of its crop's pixels at the model's resolution
# (found by fuzzing layouts).
_TURNED_AND_SMALL = [detect.Face((150, 100, 243, 193), 1.0, np.array(
    [[169, 150], [182, 143], [202, 133], [215, 126], [203, 159]], np.float32)), (194, 211, 236, 253)]


@pytest.mark.parametrize("boxes", [
    None,  # the group photo's own faces (HOG, turned ellipses from landmarks)
    [(60, 80, 160, 180)],  # one face: the ring at its ellipse's edge
    [(60, 80, 160, 180), (140, 80, 240, 180)],  # overlapping faces
    [(60, 80, 160, 180), (90, 110, 130, 150)],  # a face detected again inside another
    [(50, 50, 60, 60), (58, 52, 70, 64)],  # tiny faces: crops smaller than the model's resolution
    _CORNER_FACES,  # a face inside the rectangle of two others that overlap: pasted first, then kept
    _TURNED_AND_SMALL,  # the neighbour's mask, tested at its r pixel centres only, missed the sliver
])
def test_no_original_pixel_left_inside_any_face_ellipse(group_photo, boxes):
    """Fail closed on paste-back: outside its mask the core returns the original crop, and resizing
    back mixes neighbouring pixels, so with the mask equal to the ellipse a ring inside every face
    kept up to 96% of the original, and a neighbour's fall-off put up to half of the original back
    inside an overlapping face. Every pixel inside a face ellipse must come from masked pixels only."""
    class Fixed:
        name = "fixed"

        def detect(self, rgb):
            return [b if isinstance(b, detect.Face) else detect.Face(b, 1.0) for b in boxes]

    img = np.maximum(group_photo, 1)  # no original pixel is 0
    if boxes is not None:
        detect.register("blackout-boxes", lambda arg: Fixed())
    spec = FaceSpec(mode="detect", detector="hog" if boxes is None else "blackout-boxes")
    res = anonymize_photos(Blackout(), [img], [new_key()], spec)[0]
    assert res.faces == len(boxes) if boxes else res.faces >= 2
    inside = _inside_faces(res.record, img.shape)
    assert inside.sum() > 150 and res.image[inside].max() == 0


def _layouts():
    """Random face layouts: a photo of 1-200 px a side, then 1-5 boxes, each anywhere (often past
    the edge) or related to an earlier one (a copy, inside it, shifted over it), some turned by
    landmarks; a mask, and lossless or not."""
    def face(draw, W, H, boxes):
        how = draw(st.sampled_from(["free", "free", "copy", "inside", "shifted"] if boxes else ["free"]))
        s = draw(st.integers(4, 120))
        if how == "free":
            x0, y0 = draw(st.integers(-s + 1, W - 1)), draw(st.integers(-s + 1, H - 1))
            box = (x0, y0, x0 + s, y0 + draw(st.integers(max(4, s // 2), s * 2)))
        else:
            x0, y0, x1, y1 = draw(st.sampled_from(boxes))
            if how == "copy":
                box = (x0, y0, x1, y1)
            elif how == "inside":
                w, h = draw(st.integers(4, max(4, x1 - x0))), draw(st.integers(4, max(4, y1 - y0)))
                x, y = x0 + (x1 - x0 - w) // 2, y0 + (y1 - y0 - h) // 2
                box = (x, y, x + w, y + h)
            else:
                dx, dy = draw(st.integers(-(x1 - x0), x1 - x0)), draw(st.integers(-(y1 - y0), y1 - y0))
                box = (x0 + dx, y0 + dy, x0 + dx + s, y0 + dy + s)
        lm = None
        if draw(st.booleans()):  # eyes and nose of a face turned by t radians
            t, w = draw(st.floats(-1.2, 1.2)), box[2] - box[0]
            c, sn, cx, cy = np.cos(t), np.sin(t), (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            lm = np.array([(cx + e * w * c + 0.1 * w * sn, cy + e * w * sn - 0.1 * w * c) for e in (-0.28, -0.12, 0.12, 0.28)]
                          + [(cx - 0.15 * w * sn, cy + 0.15 * w * c)], np.float32)
        return box, lm

    @st.composite
    def layout(draw):
        W, H = draw(st.integers(1, 200)), draw(st.integers(1, 200))
        boxes, found = [], []
        for _ in range(draw(st.integers(1, 5))):
            box, lm = face(draw, W, H, boxes)
            boxes.append(box)
            found.append(detect.Face(box, 1.0, lm))
        return W, H, found, draw(st.sampled_from(["ellipse", "ellipse", "full"])), draw(st.booleans())

    return layout()


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(_layouts(), st.integers(0, 2**32 - 1))
def test_fuzz_face_layouts_fail_closed_and_restore(layout, seed):
    """Random layouts with the Blackout core (a fixed set: derandomized): either the photo is
    quarantined for a box it cannot use, or no pixel at full face weight keeps anything of the
    original, pixels outside every crop are untouched, the record is what its parse writes again,
    and lossless restore is bit-exact. The corner and turned-face leaks above were layouts of this
    kind; thousands more, with the tiny model too, ran before this test was written."""
    W, H, found, mask, lossless = layout
    detect.register("fuzz-layout", lambda arg: FixedFaces(found))
    img = np.random.default_rng(seed).integers(1, 256, (H, W, 3), dtype=np.uint8)  # no original pixel is 0
    keys, core = [new_key()], Blackout()
    spec = FaceSpec(mode="detect", detector="fuzz-layout", mask=mask)
    res = anonymize_photos(core, [img], keys, spec, lossless=lossless)[0]
    if res.quarantine_reason is not None:
        assert res.image is None and res.record is None and "unusable face box" in res.quarantine_reason
        return
    d, places, _, _ = _parse_record(res.record, "t")
    assert canonical.dumps(d) == res.record and res.faces == len(found)
    assert not res.image[_inside_faces(res.record, img.shape)].any()
    out = _outside(img.shape, [p.crop for p in places])
    assert np.array_equal(res.image[out], img[out])
    back = restore_photos(core, [res.image], keys, [res.record])[0]
    assert np.array_equal(back, img) if lossless else np.array_equal(back[out], img[out])


def test_face_in_the_corner_of_another_group_restores_exactly(group_photo):
    """Pasting a group (and restoring one) writes only the pixels of its own crops: writing its whole
    bounding rectangle put back the original, or the anonymized, pixels of a face pasted before it."""
    class Fixed:
        name = "fixed"

        def detect(self, rgb):
            return [detect.Face(b, 1.0) for b in _CORNER_FACES]

    detect.register("corner-faces", lambda arg: Fixed())
    keys, fake = [new_key()], InvertAnon()
    spec = FaceSpec(mode="detect", detector="corner-faces")
    res = anonymize_photos(fake, [group_photo], keys, spec, lossless=True)[0]
    assert res.faces == 3
    assert np.array_equal(restore_photos(fake, [res.image], keys, [res.record])[0], group_photo)
    key_only = anonymize_photos(fake, [group_photo], keys, spec)[0]
    restored = restore_photos(fake, [key_only.image], keys, [key_only.record])[0]
    x0, y0, x1, y1 = _crops(key_only.record)[0]
    face = (slice(y0 + 10, y1 - 10), slice(x0 + 10, x1 - 10))  # inside face 0's ellipse
    err = np.abs(restored[face].astype(int) - group_photo[face].astype(int)).mean()
    assert err < np.abs(key_only.image[face].astype(int) - group_photo[face].astype(int)).mean() / 4


# -- no face, detector failure -------------------------------------------------------------------
def test_no_face_is_quarantined_by_default_and_kept_on_request(anon):
    img = np.zeros((120, 160, 3), np.uint8)
    img[:, :, 1] = np.linspace(0, 255, 160).astype(np.uint8)
    res = anonymize_photos(anon, [img], [new_key()], FaceSpec(mode="detect"))[0]
    assert res.image is None and res.record is None and "no face found" in res.quarantine_reason
    keys = [new_key()]
    kept = anonymize_photos(anon, [img], keys, FaceSpec(mode="detect", on_no_face="keep"))[0]
    assert kept.quarantine_reason is None and kept.faces == 0 and np.array_equal(kept.image, img)
    assert any("kept unchanged" in n for n in kept.notes)
    assert np.array_equal(restore_photos(anon, [kept.image], keys, [kept.record])[0], img)


def test_detector_crash_quarantines_only_that_photo(anon, group_photo):
    class Flaky:
        name = "flaky"

        def detect(self, rgb):
            if rgb.shape[0] == 99:
                raise RuntimeError("boom")
            return [detect.Face((10, 10, 60, 60), 1.0)]

    detect.register("flaky", lambda arg: Flaky())
    imgs = [np.zeros((99, 99, 3), np.uint8), np.full((80, 80, 3), 7, np.uint8)]
    res = anonymize_photos(anon, imgs, [new_key(), new_key()], FaceSpec(mode="detect", detector="flaky"))
    assert "failed: RuntimeError: boom" in res[0].quarantine_reason and res[0].image is None
    assert res[1].quarantine_reason is None and res[1].faces == 1


_GOOD = (60, 40, 120, 100)


@pytest.mark.parametrize("box, why", [
    ((300, 200, 360, 260), "outside"),  # past the 200x150 photo
    ((-90, -90, -30, -30), "outside"),
    ((80, 50, 80, 90), "empty"),  # no width
    ((120, 50, 80, 90), "empty"),  # x1 < x0
    ((float("nan"), 50, 90, 90), "finite"),
    ((10, 10, float("inf"), 90), "finite"),
    ((True, 10, 60, 60), "numbers"),
    ((-400, -400, 600, 600), "5x"),  # a crop restore refuses (more than 5x the photo's side)
])
@pytest.mark.parametrize("role", ["detector", "cross_check"])
def test_unusable_boxes_from_a_registered_detector_quarantine_the_photo(box, why, role):
    """Built-in detectors clip their boxes to the photo; a registered one may return anything. A
    box that gives no usable crop quarantines the photo, naming the box (never dropped: a broken
    box may be a face that would be published as is), and a record is written only when restore
    will accept it: a huge box gave a crop over 5x the photo's side, which restore refuses, so the
    record's faces could never be restored."""
    class Fixed:
        def __init__(self, boxes):
            self.boxes, self.name = boxes, "fixed"

        def detect(self, rgb):
            return [detect.Face(b, 1.0) for b in self.boxes]

    detect.register("good-box", lambda arg: Fixed([_GOOD]))
    detect.register("bad-box", lambda arg: Fixed([_GOOD, box]))
    img = np.random.default_rng(5).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    spec = (FaceSpec(mode="detect", detector="bad-box") if role == "detector"
            else FaceSpec(mode="detect", detector="good-box", cross_check="bad-box"))
    res = anonymize_photos(InvertAnon(), [img], [new_key()], spec)[0]
    assert res.image is None and res.record is None
    assert f"detector 'bad-box' returned an unusable face box {list(box)}" in res.quarantine_reason
    assert why in res.quarantine_reason


@pytest.mark.parametrize("box", [(-20, 10, 40, 70), (0, 0, 200, 150), (150, 100, 230, 180), (5.4, 9.6, 60.2, 70)])
def test_boxes_past_the_edge_or_as_large_as_the_photo_restore(box):
    """What the check lets through is written so that restore accepts it: faces at the border,
    a face that fills the photo, float coordinates."""
    class Fixed:
        name = "fixed"

        def detect(self, rgb):
            return [detect.Face(box, 1.0)]

    detect.register("edge-box", lambda arg: Fixed())
    img = np.random.default_rng(6).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    keys, fake = [new_key()], InvertAnon()
    res = anonymize_photos(fake, [img], keys, FaceSpec(mode="detect", detector="edge-box"), lossless=True)[0]
    assert res.quarantine_reason is None and res.faces == 1
    assert np.array_equal(restore_photos(fake, [res.image], keys, [res.record])[0], img)


def test_cross_check_quarantines_a_photo_with_a_face_the_first_detector_missed():
    """Fail closed: the second detector's face at (130..170) lies in no anonymized crop, so the
    photo is not published; faces both detectors find, or a crashing second detector, behave."""

    class Fixed:
        def __init__(self, boxes, crash=False):
            self.boxes, self.crash, self.name = boxes, crash, "fixed"

        def detect(self, rgb):
            if self.crash:
                raise RuntimeError("cascade broke")
            return [detect.Face(b, 1.0) for b in self.boxes]

    detect.register("one-face", lambda arg: Fixed([(20, 20, 80, 80)]))
    detect.register("same-face", lambda arg: Fixed([(25, 22, 78, 83)]))
    detect.register("two-faces", lambda arg: Fixed([(22, 20, 80, 82), (130, 40, 170, 80)]))
    detect.register("crashes", lambda arg: Fixed([], crash=True))
    img = np.random.default_rng(4).integers(0, 256, (120, 200, 3), dtype=np.uint8)
    fake, spec = InvertAnon(), dict(mode="detect", detector="one-face")
    run = lambda **kw: anonymize_photos(fake, [img], [new_key()], FaceSpec(**spec, **kw))[0]  # noqa: E731
    assert run().quarantine_reason is None  # without a cross-check the missed face would be published
    res = run(cross_check="two-faces")
    assert res.image is None and res.record is None
    assert "'two-faces' (--cross-check) found 1 face(s) that 'one-face' did not, first at box [130, 40, 170, 80]" in res.quarantine_reason
    assert run(cross_check="same-face").faces == 1
    assert "face detector 'crashes' failed: RuntimeError: cascade broke" in run(cross_check="crashes").quarantine_reason
    # no face kept on request: a face the cross-check finds still quarantines the photo
    detect.register("no-face", lambda arg: Fixed([]))
    kept = anonymize_photos(fake, [img], [new_key()], FaceSpec(mode="detect", detector="no-face", on_no_face="keep",
                                                               cross_check="same-face"))[0]
    assert "found 1 face(s) that 'no-face' did not" in kept.quarantine_reason
    for bad in (dict(mode="aligned", cross_check="haar"), dict(mode="detect", detector="hog", cross_check="hog")):
        with pytest.raises(InputError, match="cross-check"):
            FaceSpec(**bad)


class FixedBoxes:
    """A registered detector that finds the given boxes in every photo."""

    name = "fixed"

    def __init__(self, boxes):
        self.boxes = boxes

    def detect(self, rgb):
        return [detect.Face(b, 1.0) for b in self.boxes]


class FixedFaces(FixedBoxes):
    """FixedBoxes with whole detect.Face values (landmarks too)."""

    def detect(self, rgb):
        return list(self.boxes)


@pytest.mark.parametrize("box", [(-45.5, 40.2, 6.5, 100.7), (-50.5, 40.2, 2.5, 100.7)])
def test_cross_check_float_box_past_the_edge_is_judged_not_a_detector_failure(box):
    """A registered cross-check detector's float box whose inner face lies outside the photo is
    judged by the box itself: sliced with its floats, it raised a TypeError that quarantined the
    photo as "face detector failed" (closed, with the wrong reason). Rounded outward now, it is a
    missed face when nothing covers it, and covered when an anonymized face covers what is in the photo."""

    detect.register("float-edge", lambda arg: FixedBoxes([box]))
    detect.register("over-the-edge", lambda arg: FixedBoxes([(-30, 20, 40, 120)]))  # its ellipse covers the sliver
    detect.register("nothing", lambda arg: FixedBoxes([]))
    img = np.random.default_rng(5).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    run = lambda first: anonymize_photos(InvertAnon(), [img], [new_key()], FaceSpec(  # noqa: E731
        mode="detect", detector=first, cross_check="float-edge", on_no_face="keep"))[0]
    missed = run("nothing")
    assert missed.image is None and "'float-edge' (--cross-check) found 1 face(s) that 'nothing' did not, first at " \
        f"box {list(box)}" in missed.quarantine_reason
    covered = run("over-the-edge")
    assert covered.quarantine_reason is None and covered.faces == 1


def test_cross_check_face_in_a_crop_corner_is_not_counted_as_anonymized():
    """A small face only the second detector finds, centred inside the first face's crop but in
    its corner, where the paste-back weight is 0: it used to count as covered and was published
    untouched. Now the photo is quarantined; the same face seen a little shifted and larger by the
    second detector still counts as covered."""

    big, small = (100, 100, 200, 200), (205, 200, 225, 220)
    detect.register("big-face", lambda arg: FixedBoxes([big]))
    detect.register("big-and-corner", lambda arg: FixedBoxes([big, small]))
    detect.register("big-jittered", lambda arg: FixedBoxes([(104, 92, 210, 203)]))
    img = np.random.default_rng(7).integers(0, 256, (320, 320, 3), dtype=np.uint8)
    run = lambda cc: anonymize_photos(InvertAnon(), [img], [new_key()],  # noqa: E731
                                      FaceSpec(mode="detect", detector="big-face", cross_check=cc))[0]
    plain = run(None)
    (x0, y0, x1, y1), = _crops(plain.record)
    assert x0 <= 215 < x1 and y0 <= 210 < y1  # the small face's centre is inside the crop ...
    assert np.array_equal(plain.image[200:220, 205:225], img[200:220, 205:225])  # ... yet left as it was
    res = run("big-and-corner")
    assert res.image is None and res.record is None
    assert "'big-and-corner' (--cross-check) found 1 face(s) that 'big-face' did not, first at box [205, 200, 225, 220]" \
        in res.quarantine_reason
    same = run("big-jittered")
    assert same.quarantine_reason is None and same.faces == 1


def _hidden_face_photo(dx: int, dy: int) -> np.ndarray:
    """The astronaut with Grace Hopper's face (scaled to the same size) behind her head, shifted dx
    px sideways and dy down: the astronaut's head (an ellipse over face and hair) is in front."""
    from matplotlib.cbook import get_sample_data

    with get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    ast = skimage_data.astronaut()
    k = 91 / 187  # HOG's face box: 91 px wide on the astronaut, 187 px on Grace Hopper at (180, 139)
    h = cv2.resize(hopper, (round(hopper.shape[1] * k), round(hopper.shape[0] * k)), interpolation=cv2.INTER_AREA)
    ox, oy = 175 + dx - round(180 * k), 76 + dy - round(139 * k)
    img = ast.copy()
    img[max(0, oy):oy + h.shape[0], max(0, ox):ox + h.shape[1]] = h[max(0, -oy):512 - oy, max(0, -ox):512 - ox]
    head = np.zeros(ast.shape[:2], np.uint8)
    cv2.ellipse(head, (221, 118), (50, 62), 0, 0, 360, 1, -1)
    img[head > 0] = ast[head > 0]
    return img


def test_cross_check_face_half_hidden_behind_an_anonymized_one_is_quarantined():
    """A real face half hidden behind the anonymized one, which HOG misses and Haar finds: its box
    overlaps the anonymized face (centre at the edge of its ellipse, about half its inner face
    anonymized) and what shows of it (an eye, half the mouth) would be published: quarantined.

    This is also why a second detector's box that overlaps an anonymized face is never excused as
    'the same face, shifted' (the Haar setting before quarantined 3 of 150 wild photos for such a
    box, with centres at 0.66-0.81 of the face ellipse and IoU 0.32-0.48 with the face's box; the
    current one none; benchmarks/README.md): Haar (either setting) puts the hidden face below at
    0.95-1.15, but a detector that finds a face by one eye
    (dlib's CNN, YuNet, a registered one) finds it further behind, where a shifted box lies."""
    hog, haar = detect.get_detector("hog"), detect.get_detector("haar")
    run = lambda img, cc="haar": anonymize_photos(InvertAnon(), [img], [new_key()],  # noqa: E731
                                                  FaceSpec(mode="detect", detector="hog", cross_check=cc))[0]
    alone = run(skimage_data.astronaut())
    assert alone.quarantine_reason is None and alone.faces >= 1  # Haar's own box of her face counts as covered
    seen = 0
    for dx, dy in ((51, -8), (51, 0), (54, 0)):
        img = _hidden_face_photo(dx, dy)
        if any(f.box[0] > 195 and f.box[1] < 200 for f in hog.detect(img)):
            continue  # HOG found the hidden face itself: nothing for the cross-check to catch
        if not any(f.box[0] > 195 and f.box[3] < 250 for f in haar.detect(img)):
            continue  # Haar did not see it either (another OpenCV build): no claim to test here
        seen += 1
        assert run(img, None).quarantine_reason is None  # without the cross-check it would be published
        res = run(img)
        assert res.image is None and "'haar' (--cross-check) found 1 face(s) that 'hog' did not" in res.quarantine_reason
    assert seen >= 1, "no composite where Haar sees the hidden face and HOG does not: the test checks nothing"

    class Shifted:
        name = "shifted"

        def detect(self, rgb):  # the astronaut's HOG box 44% of its width sideways: centre at 0.70 of her
            return [detect.Face((175 + 40, 76 + 4, 266 + 40, 167 + 4), 1.0)]  # face ellipse, IoU 0.37

    detect.register("shifted-box", lambda arg: Shifted())
    res = run(skimage_data.astronaut(), "shifted-box")
    assert res.image is None and "first at box [215, 80, 306, 171]" in res.quarantine_reason


WILD = Path(__file__).resolve().parents[2] / "shared" / "data" / "celeba-wild-dev.parquet"


@pytest.mark.shared_data
def test_cross_check_haar_setting_on_wild_photos():
    """The cross-check's Haar setting (detect.HAAR_SETTINGS, frontalface_alt2 with minNeighbors 2)
    replaced frontalface_default with 5 after both were measured on 150 wild CelebA photos
    (benchmarks/README.md): it finds more real faces at every size and fewer boxes on clothing.
    Here, photos of that set where it differs: the setting before quarantined three for a box on
    a neck, a shirt or a chin and published two with a face HOG missed (a 30 px face in the
    background, a face on a poster), which the new one quarantines at that face. Research data,
    not shipped: skipped where ../shared/data is absent."""
    if not WILD.is_file():
        pytest.skip(f"{WILD} is absent (CelebA research data, see its README)")
    import pyarrow.parquet as pq

    missed = {"celeba-wild-092582": (226, 34, 256, 64), "celeba-wild-111292": (31, 41, 55, 65)}
    clothing = ["celeba-wild-016458", "celeba-wild-194128", "celeba-wild-196557"]
    t = pq.read_table(WILD, filters=[("record_id", "in", clothing + list(missed))])
    assert t.num_rows == 5
    photos = {rid: decode_image(c["bytes"], rid)[0] for rid, c in zip(t.column("record_id").to_pylist(),
                                                                       t.column("image").to_pylist())}

    def run(rid, cc):
        return anonymize_photos(InvertAnon(), [photos[rid]], [new_key()],
                                FaceSpec(mode="detect", detector="hog", cross_check=cc))[0]

    for rid in clothing:
        assert run(rid, "haar:frontalface_default,5").quarantine_reason is not None
        res = run(rid, "haar")
        assert res.quarantine_reason is None and res.faces == 1, (rid, res.quarantine_reason)
    for rid, (x0, y0, x1, y1) in missed.items():
        assert run(rid, "haar:frontalface_default,5").quarantine_reason is None  # published with the face
        res = run(rid, "haar")
        assert res.image is None and "'haar' (--cross-check) found 1 face(s)" in res.quarantine_reason
        bx0, by0, bx1, by1 = (int(v) for v in res.quarantine_reason.split("first at box [")[1].split("]")[0].split(","))
        assert bx0 < (x0 + x1) / 2 < bx1 and by0 < (y0 + y1) / 2 < by1, (rid, res.quarantine_reason)


def test_unusable_detector_setting_raises_for_the_whole_batch(anon):
    with pytest.raises(InputError, match="yunet"):
        anonymize_photos(anon, [np.zeros((64, 64, 3), np.uint8)], [new_key()], FaceSpec(mode="detect", detector="yunet"))


# -- aligned mode -----------------------------------------------------------------------------------
def test_aligned_face_box_leaves_outside_bit_identical_and_restores_exactly(anon):
    img = _small(skimage_data.astronaut(), 356)[:, 89:89 + 178]  # 178 wide, crop to 218 high below
    img = np.ascontiguousarray(img[:218])
    keys = [new_key(), new_key()]
    spec = FaceSpec(mode="aligned", box=parse_face_box("25,57,153,185"))
    res = anonymize_photos(anon, [img, img], keys, spec, lossless=True)
    for r in res:
        assert r.faces == 1 and _crops(r.record) == [(25, 57, 153, 185)]
        out = _outside(img.shape, [(25, 57, 153, 185)])
        assert np.array_equal(r.image[out], img[out])
        assert np.any(r.image[100:140, 70:110] != img[100:140, 70:110], axis=2).mean() > 0.9
    assert not np.array_equal(res[0].image, res[1].image)  # different keys, different faces
    back = restore_photos(anon, [r.image for r in res], keys, [r.record for r in res])
    assert all(np.array_equal(b, img) for b in back)


def test_aligned_whole_image_full_mask(anon):
    img = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    keys = [new_key()]
    res = anonymize_photos(anon, [img], keys, FaceSpec(mode="aligned", mask="full"), lossless=True)[0]
    assert np.any(res.image != img, axis=2).mean() > 0.95
    assert np.array_equal(restore_photos(anon, [res.image], keys, [res.record])[0], img)


def test_aligned_box_outside_the_image_is_quarantined(anon):
    res = anonymize_photos(anon, [np.zeros((100, 100, 3), np.uint8)], [new_key()],
                           FaceSpec(mode="aligned", box=(25, 57, 153, 185)))[0]
    assert "does not fit the 100x100 image" in res.quarantine_reason


@pytest.mark.parametrize("kw", [dict(mode="crop"), dict(on_no_face="ignore"), dict(mode="detect", box=(0, 0, 9, 9)),
                                dict(mode="aligned", box=(0, 0, 4, 4)), dict(mask="blob"), dict(expand=0.5)])
def test_bad_spec(kw):
    with pytest.raises(InputError):
        FaceSpec(**kw)


@pytest.mark.parametrize("kw, needle", [
    # True is an int to isinstance: the crop went into the record as JSON true, which restore refuses
    (dict(mode="aligned", box=(True, 0, 100, 100)), "face-box"),
    (dict(min_face="32"), "min_face"),  # failed later, per photo, with a TypeError
    (dict(min_face=True), "min_face"),
    (dict(min_face=-1), "min_face"),
    (dict(expand=True), "expand"),  # counted as 1.0
    (dict(expand="1.2"), "expand"),  # a TypeError from the range check
    (dict(expand=None), "expand"),
])
def test_bools_and_non_integers_are_refused_in_the_spec(kw, needle):
    with pytest.raises(InputError, match=needle):
        FaceSpec(**kw)


def test_parse_face_box():
    assert parse_face_box("25,57,153,185") == (25, 57, 153, 185)
    with pytest.raises(InputError, match="four integers"):
        parse_face_box("25,57,153")


# -- odd inputs through decode_image --------------------------------------------------------------
def _encode(im: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_grayscale_rgba_16bit_and_exif_rotated_photos(anon):
    ast = _small(skimage_data.astronaut(), 256)
    exif = Image.Exif()
    exif[0x0112] = 8  # stored rotated; displayed upright after transposing
    rotated = np.ascontiguousarray(np.rot90(ast, k=-1))
    gray16 = (np.asarray(Image.fromarray(ast).convert("L")).astype(np.uint16) * 257)
    inputs = {
        "gray": _encode(Image.fromarray(ast).convert("L")),
        "rgba": _encode(Image.fromarray(np.dstack([ast, np.full(ast.shape[:2], 200, np.uint8)]), "RGBA")),
        "16bit": _encode(Image.fromarray(gray16)),
        "exif": _encode(Image.fromarray(rotated), "JPEG", quality=95, exif=exif),
    }
    imgs = [decode_image(b, rid)[0] for rid, b in inputs.items()]
    keys = [new_key() for _ in imgs]
    res = anonymize_photos(anon, imgs, keys, FaceSpec(mode="detect"), lossless=True)
    for rid, r in zip(inputs, res):
        assert r.quarantine_reason is None and r.faces >= 1, rid
    back = restore_photos(anon, [r.image for r in res], keys, [r.record for r in res])
    assert all(np.array_equal(b, i) for b, i in zip(back, imgs))


@pytest.mark.slow
def test_huge_photo_lossless_restore_is_exact(anon):
    """6000x4000: only the face region is processed; the rest is never touched."""
    rng = np.random.default_rng(4)
    big = np.empty((4000, 6000, 3), np.uint8)
    big[:] = rng.integers(0, 256, (1, 6000, 3), dtype=np.uint8)
    # Detection runs on a <= 1600 px copy, so the face must be large enough to survive that.
    big[1000:2024, 3000:4024] = np.kron(skimage_data.astronaut(), np.ones((2, 2, 1), np.uint8))
    keys = [new_key()]
    res = anonymize_photos(anon, [big], keys, FaceSpec(mode="detect"), lossless=True)[0]
    assert res.faces >= 1 and len(res.record) < 3_000_000
    changed = np.any(res.image != big, axis=2)
    ys, xs = np.nonzero(changed)
    assert ys.min() >= 1000 and xs.min() >= 3000 and ys.max() < 2024 and xs.max() < 4024
    assert np.array_equal(restore_photos(anon, [res.image], keys, [res.record])[0], big)


# -- restore record ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one(anon):
    img = _small(skimage_data.astronaut(), 200)
    keys = [new_key()]
    res = anonymize_photos(anon, [img], keys, FaceSpec(mode="detect"), lossless=True)[0]
    return img, keys, res


def test_wrong_key_or_changed_photo_is_loud(anon, one):
    img, keys, res = one
    with pytest.raises(IntegrityError, match="hash mismatch"):
        restore_photos(anon, [res.image], [new_key()], [res.record], ids=["rec-7"])
    changed = res.image.copy()
    changed[0, 0] ^= 1
    with pytest.raises(IntegrityError, match="rec-7"):
        restore_photos(anon, [changed], keys, [res.record], ids=["rec-7"])
    with pytest.raises(InputError, match="record is for"):
        restore_photos(anon, [res.image[:-1]], keys, [res.record])


def test_restore_errors_name_the_photo_not_a_crop_index(anon, one):
    """Photo restore runs the crops of all its photos in one core call; the core's errors named a
    crop's place in that call ("record 1"), which is neither the record id nor even its position
    when photos have several faces. They name the photo's id and the face now."""
    img, keys, res = one
    flipped = bytes([keys[0][0] ^ 1]) + keys[0][1:]  # one bit of the key
    with pytest.raises(IntegrityError, match=r"photo 'bob', face 0: lossless restore .*hash mismatch"):
        restore_photos(anon, [res.image, res.image], [keys[0], flipped], [res.record, res.record], ids=["alice", "bob"])

    def bad_core(d):
        d["faces"][0]["core"] = canonical.b64e(b"{}")

    with pytest.raises(FormatError, match=r"photo 'bob', face 0: restore record"):
        restore_photos(anon, [res.image, res.image], keys * 2, [res.record, _edit(res.record, bad_core)],
                       ids=["alice", "bob"])


def test_restore_names_a_photo_that_is_not_rgb_by_its_id(anon, one):
    """Restore jobs pass ids; an error naming "images[1]" left the user to count."""
    img, keys, res = one
    with pytest.raises(InputError, match=r"photo 'bob': expected RGB uint8"):
        restore_photos(anon, [res.image, res.image[..., 0]], keys * 2, [res.record] * 2, ids=["alice", "bob"])
    with pytest.raises(InputError, match=r"photo '#1': expected RGB uint8"):
        restore_photos(anon, [res.image, res.image[..., 0]], keys * 2, [res.record] * 2)


@pytest.mark.parametrize("field, edit", [
    ("faces[0].fix", lambda d: d["faces"][0].update(fix=canonical.b64e(zlib.compress(b"\0" * 10)))),
    ("faces[0].fix", lambda d: d["faces"][0].update(fix="!")),
    ("lossless.residual", lambda d: d["lossless"].update(residual=canonical.b64e(b"not zlib"))),
])
def test_bad_payload_errors_name_the_photo(anon, one, field, edit):
    """A restore job restores many photos per call; an error that names only the field leaves the
    user to guess which record's photo record is broken."""
    img, keys, res = one
    with pytest.raises(FormatError, match=rf"photo record of 'bob'.*{re.escape(field)}"):
        restore_photos(anon, [res.image, res.image], keys * 2, [res.record, _edit(res.record, edit)],
                       ids=["alice", "bob"])


def _edit(record: bytes, fn) -> bytes:
    d = canonical.loads(record)
    fn(d)
    return canonical.dumps(d)


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d.update(extra=1), "expected fields"),
    (lambda d: d.pop("lossless"), "expected fields"),
    (lambda d: d.update(v=3), "unsupported version"),
    (lambda d: d.update(v=1), "lossless must be null or {residual, sha256} \\(v1\\)"),  # v1 has no snap
    (lambda d: d["lossless"].pop("snap"), "lossless must be null or {residual, sha256, snap} \\(v2\\)"),
    (lambda d: d["lossless"].update(snap=canonical.b64e(b"\xff")), "lossless.snap"),
    (lambda d: d["faces"][0].update(crop=[0, 0, 0, 0]), "crop"),
    (lambda d: d["faces"][0].update(ellipse=[1, 2, 3]), "ellipse"),
    (lambda d: d["faces"][0].update(fix=canonical.b64e(zlib.compress(b"\0" * 10))), "decompress"),
    (lambda d: d["faces"][0].update(nose=1), "expected fields"),
])
def test_record_is_parsed_strictly(anon, one, edit, needle):
    img, keys, res = one
    with pytest.raises(FormatError, match=needle):
        restore_photos(anon, [res.image], keys, [_edit(res.record, edit)])


def test_photo_record_version_must_be_an_integer_not_true():
    r = 2
    rec = {"v": 1, "kind": "anondata/photo", "width": 4, "height": 4, "resolution": r, "mask": "full",
           "anon_sha256": "0" * 64, "lossless": None,
           "faces": [{"crop": [0, 0, 4, 4], "ellipse": None, "feather": None, "core": canonical.b64e(b"x"),
                      "fix": canonical.b64e(zlib.compress(bytes(2 * r * r * 3)))}]}
    _parse_record(canonical.dumps(rec), "photo")
    with pytest.raises(FormatError, match="unsupported version True"):
        _parse_record(canonical.dumps(dict(rec, v=True)), "photo")


def test_record_of_another_resolution_is_refused_before_its_fixes_are_decompressed():
    """A record may name a resolution up to 4096, where each face's fix is 100 MB from 130 kB of
    zlib: restore decompressed every face's fix before comparing the resolution with the model's
    (a 4 MB record took 3 GB and half a minute to be refused). It compares first now."""
    import tracemalloc

    r = 2048
    fix = canonical.b64e(zlib.compress(bytes(2 * r * r * 3), 9))
    rec = canonical.dumps({"v": 1, "kind": "anondata/photo", "width": 64, "height": 64, "resolution": r, "mask": "full",
                           "anon_sha256": "0" * 64, "lossless": None, "faces": [
                               {"crop": [0, 0, 64, 64], "ellipse": None, "feather": None, "core": "eA", "fix": fix}]})
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="made at model resolution 2048, this model has 32"):
            restore_photos(InvertAnon(), [np.zeros((64, 64, 3), np.uint8)], [new_key()], [rec])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < r * r  # not a single fix (6 r^2 bytes) decompressed


def test_non_canonical_record_rejected(anon, one):
    img, keys, res = one
    with pytest.raises(FormatError, match="canonical"):
        restore_photos(anon, [res.image], keys, [res.record.replace(b'{"anon_sha256"', b'{ "anon_sha256"', 1)])


def test_record_and_image_hold_no_key(one):
    img, keys, res = one
    assert keys[0] not in res.record and canonical.b64e(keys[0]).encode() not in res.record


def test_haar_box_framing_follows_the_cascade_not_min_neighbors():
    """The framing calibration belongs to the cascade (minNeighbors only drops boxes): a
    frontalface_default cross-check at another minNeighbors took alt2's framing (benchmarks/README.md,
    the Haar setting study), while frontalface_default's own was measured and on hand."""
    from anondata.detect import Face
    from anondata.faces import _place_detected

    face = Face((100, 100, 180, 180), 1.0)

    def place(name):
        return _place_detected(face, name, 1.0, False)

    assert place("haar:frontalface_default,3") == place("haar:frontalface_default,5") != place("haar")
    assert place("haar:frontalface_alt2,4") == place("haar") == place("haar:profileface,3")


@pytest.mark.parametrize("true_box, clipped", [
    ((-40, 60, 60, 160), (0, 60, 60, 160)),  # 40% past the left edge
    ((150, 60, 250, 160), (150, 60, 200, 160)),  # half past the right edge
    ((60, -30, 160, 70), (60, 0, 160, 70)),  # past the top
    ((60, 170, 160, 270), (60, 170, 160, 200)),  # past the bottom
])
def test_face_cut_by_the_border_is_anonymized_at_its_full_size(true_box, clipped):
    """Built-in detectors clip their (square) boxes to the photo. A face cut by the border came as a
    narrow box and was framed from its width as a smaller face: 40% past the left edge, 58% of the
    astronaut's visible face ellipse was published in the clear. The box is made square again,
    growing away from the border, so the face is placed as if it were whole."""
    from skimage.data import astronaut

    from anondata.faces import _clip, _ellipse_dist, _place_detected

    class Fixed:
        name = "fixed"

        def detect(self, rgb):
            return [detect.Face(clipped, 1.0)]

    img = np.maximum(np.asarray(Image.fromarray(astronaut()).resize((200, 200))), 1)
    assert _place_detected(detect.Face(clipped, 1.0), "hog", 1.15, False, img.shape) == \
        _place_detected(detect.Face(true_box, 1.0), "hog", 1.15, False, img.shape)
    detect.register("clipped-box", lambda arg: Fixed())
    res = anonymize_photos(Blackout(), [img], [new_key()], FaceSpec(mode="detect", detector="clipped-box"))[0]
    true = _place_detected(detect.Face(true_box, 1.0), "clipped-box", 1.15, False, img.shape)
    a0, b0, a1, b1 = _clip(true.crop, 200, 200)
    cs = (slice(b0 - true.crop[1], b1 - true.crop[1]), slice(a0 - true.crop[0], a1 - true.crop[0]))
    inside = np.zeros((200, 200), bool)
    inside[b0:b1, a0:a1] = _ellipse_dist(true, *true.size, cs) <= 1.0
    assert inside.sum() > 1000 and res.image[inside].max() == 0


def _cut_at(photo: str, sides: str, share: float):
    """(photo, its largest HOG face's ellipse as placed on the whole photo, inside the photo cut so
    that `share` of that face's box lies past each of `sides`)."""
    from matplotlib.cbook import get_sample_data

    from anondata.faces import _clip, _ellipse_dist, _place_detected

    if photo == "astronaut":
        full = skimage_data.astronaut()
    else:
        with get_sample_data("grace_hopper.jpg") as f:
            full = np.asarray(Image.open(f).convert("RGB"))
    full = np.maximum(full, 1)  # no original pixel is 0: a 0 is Blackout's
    face = max(detect.get_detector("hog").detect(full), key=lambda f: f.box[2] - f.box[0])
    x0, y0, x1, y1 = face.box
    c = int(share * (x1 - x0))
    H, W = full.shape[:2]
    cx0, cy0 = x0 + c if "left" in sides else 0, y0 + c if "top" in sides else 0
    cx1, cy1 = x1 - c if "right" in sides else W, y1 - c if "bottom" in sides else H
    img = np.ascontiguousarray(full[cy0:cy1, cx0:cx1])
    moved = detect.Face((x0 - cx0, y0 - cy0, x1 - cx0, y1 - cy0), 1.0,
                        face.landmarks - np.array((cx0, cy0), np.float32))
    true = _place_detected(moved, "hog", 1.0, False)  # no shape: the whole face's box, framed as given
    h, w = img.shape[:2]
    a0, b0, a1, b1 = _clip(true.crop, w, h)
    inside = np.zeros((h, w), bool)
    inside[b0:b1, a0:a1] = _ellipse_dist(true, *true.size, (slice(b0 - true.crop[1], b1 - true.crop[1]),
                                                             slice(a0 - true.crop[0], a1 - true.crop[0]))) <= 1.0
    return img, inside


@pytest.mark.parametrize("photo, sides, share, detector, cross_check", [
    ("astronaut", "left+bottom", 0.15, "haar", "hog"),  # 48% of the ellipse, 25% of the inner face left
    ("hopper", "left+top", 0.2, "hog", "haar"),  # 28%, the default detectors
    ("hopper", "left", 0.2, "hog", "haar"),  # 14%
    ("hopper", "right", 0.1, "haar", "hog"),  # 3.5%
])
def test_a_face_cut_at_a_border_or_corner_is_anonymized_whole(photo, sides, share, detector, cross_check):
    """A face cut by the photo's border is seen as a box inside the photo smaller than the face:
    Haar never reports a window past the border, HOG falls a pyramid step (1.2x) smaller, and a
    corner clips both sides of the box. Framed from that box, the rim of the face (and at the
    corner with Haar, a quarter of its inner face) was published in the clear. A box at a border is
    framed as a face up to 1.3x larger past it, with a wider ellipse."""
    img, inside = _cut_at(photo, sides, share)
    res = anonymize_photos(Blackout(), [img], [new_key()],
                           FaceSpec(mode="detect", detector=detector, cross_check=cross_check))[0]
    assert res.quarantine_reason is None and inside.sum() > 5000
    assert (res.image[inside] != 0).any(-1).mean() <= 0.01


def test_a_tall_box_grows_around_its_centre():
    """A registered detector's box that is merely tall (not at a border) is framed as the square
    around it, not from its width alone."""
    from anondata.faces import _place_detected

    shape = (300, 300, 3)
    assert _place_detected(detect.Face((80, 50, 120, 150), 1.0), "hog", 1.15, False, shape) == \
        _place_detected(detect.Face((50, 50, 150, 150), 1.0), "hog", 1.15, False, shape)


@pytest.mark.parametrize("role", ["detector", "cross_check"])
def test_a_detector_that_yields_its_faces_is_read_once(role):
    """A registered detector may return any iterable of faces (a generator). The box check read it
    and handed the spent generator on: as the detector no face was anonymized (published with
    --on-no-face keep), as the cross-check a face the first detector missed went unseen."""
    class Yields(FixedBoxes):
        def detect(self, rgb):
            yield from super().detect(rgb)

    detect.register("yields-face", lambda arg: Yields([(20, 20, 80, 80)]))
    detect.register("no-face-found", lambda arg: FixedBoxes([]))
    img = np.random.default_rng(7).integers(0, 256, (120, 200, 3), dtype=np.uint8)
    spec = (FaceSpec(mode="detect", detector="yields-face", on_no_face="keep") if role == "detector" else
            FaceSpec(mode="detect", detector="no-face-found", cross_check="yields-face", on_no_face="keep"))
    res = anonymize_photos(InvertAnon(), [img], [new_key()], spec)[0]
    if role == "detector":
        assert res.quarantine_reason is None and res.faces == 1
        assert not np.array_equal(res.image[20:80, 20:80], img[20:80, 20:80])
    else:
        assert res.image is None and "'yields-face' (--cross-check) found 1 face(s)" in res.quarantine_reason


def test_photo_lossless_restore_absorbs_a_one_level_drift_of_its_estimate(anon, one, monkeypatch):
    """Photo lossless restore recomputes the estimate it adds the residual to (resizing each face's
    change back into the photo). Another OpenCV or numpy may round that resize differently by one
    level, which failed the hash check: the original's residues mod 3 (v2's snap) absorb it, as the
    core's snap does inside a crop. Two levels are still a loud error (restore --key-only then)."""
    from anondata import faces

    img, keys, res = one
    real = faces._estimate

    def drifted(levels):  # every value of the estimate one (two) levels up, as far as uint8 goes
        return lambda *a: np.clip(real(*a).astype(np.int16) + levels, 0, 255).astype(np.uint8)

    # Not +1.0 on _up's float resize (as this test first did): np.round rounds halves to even, so
    # a value at x.5 moved two levels (2.5 -> 2, 3.5 -> 4) and the test failed for 1 key in 7.
    monkeypatch.setattr(faces, "_estimate", drifted(1))
    assert np.array_equal(restore_photos(anon, [res.image], keys, [res.record])[0], img)
    monkeypatch.setattr(faces, "_estimate", drifted(2))
    with pytest.raises(IntegrityError, match="lossless restore does not reproduce"):
        restore_photos(anon, [res.image], keys, [res.record])


def test_v1_photo_records_without_snap_still_restore(anon, one):
    """Releases written before v2 carry no snap: they restore as before."""
    img, keys, res = one
    d = canonical.loads(res.record, "t")
    d["v"], d["lossless"] = 1, {k: v for k, v in d["lossless"].items() if k != "snap"}
    assert np.array_equal(restore_photos(anon, [res.image], keys, [canonical.dumps(d)])[0], img)


def test_small_face_beside_a_large_one_in_a_photo_over_the_detectors_working_size_is_anonymized():
    """A photo larger than the detector's max_side was searched only downscaled: beside a subject
    found there, a bystander's 45 px face was published untouched (on 6000x4000 photos at the default
    1600, 64 px faces, with the Haar cross-check blind to them too). Every pixel of its inner face
    must come from the anonymized crops now."""
    canvas = np.full((1200, 1600, 3), 90, np.uint8)
    canvas[:, :, 2] = np.linspace(60, 200, 1600).astype(np.uint8)
    for k, x, y in ((1.5, 0, 0), (0.5, 1000, 600)):
        a = cv2.resize(skimage_data.astronaut(), (round(512 * k),) * 2, interpolation=cv2.INTER_AREA)
        canvas[y:y + a.shape[0], x:x + a.shape[1]] = a
    detect.register("hog-512", lambda arg: detect.HogDetector(max_side=512))
    img = np.maximum(canvas, 1)
    res = anonymize_photos(Blackout(), [img], [new_key()], FaceSpec(mode="detect", detector="hog-512"))[0]
    assert res.quarantine_reason is None and res.faces >= 2
    x0, y0, x1, y1 = (round(v) for v in (1000 + 0.5 * 190, 600 + 0.5 * 95, 1000 + 0.5 * 250, 600 + 0.5 * 150))
    assert not res.image[y0:y1, x0:x1].any(), "the small face's eyes, nose and mouth were published"
