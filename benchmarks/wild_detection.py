"""Face detection and identity protection on in-the-wild photos (issue 6).

    python benchmarks/wild_detection.py [--limit N] [--min-side PX] [--detectors hog,haar,mmod]
        [--model embedded|PATH --steps S --inversion-iters K --device cpu|cuda] [--json out.json]
    python benchmarks/wild_detection.py --calibrate [--limit N]
    python benchmarks/wild_detection.py --cross-check haar [--limit N]

Reads ../shared/data/celeba-wild-dev.parquet (150 CelebA photos, research only: never copied
anywhere); exits 0 with a message when it is absent.

Per detector: detection rate (share of photos with >= 1 face), faces per photo, seconds per photo.
With --model: every photo where the HOG detector finds a face is anonymized (--faces detect,
hog); then for each original face, dlib's ResNet descriptor is computed on the anonymized photo
at the original face's own box (the attacker knows where the face is) and compared with the
original face's descriptor. A photo counts as re-identified when any face is closer than 0.6
(dlib's same-person threshold). Goal: <= 5%.

--cross-check D: how many photos `--faces detect --detector hog --cross-check D` quarantines
because D finds a face the HOG faces do not cover (a face HOG missed, or a false positive of D),
and where those boxes lie: a shifted second box of an anonymized face (IoU >= 0.3 with its box),
overlapping one (chins, necks), or elsewhere; --json keeps the boxes per photo (no pixels).

--calibrate measures, on aligned CelebA images (celeba-ids-dev), where each detector's box and
dlib's 5 landmarks sit relative to the model's training framing, the CelebA crop
(25, 57, 153, 185): these are the constants at the top of anondata/faces.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"


def _load(name: str, limit: int | None):
    path = DATA / name
    if not path.is_file():
        print(f"skipped: {path} is absent (research data, only on development machines)")
        raise SystemExit(0)
    import pyarrow.parquet as pq

    from anondata.images import decode_image

    t = pq.read_table(path, columns=["record_id", "image"])
    if limit:
        t = t.slice(0, limit)
    ids = t.column("record_id").to_pylist()
    return ids, [decode_image(c["bytes"], rid)[0] for rid, c in zip(ids, t.column("image").to_pylist())]


def detection(ids, imgs, detectors):
    from anondata.detect import get_detector

    out = {}
    for name in detectors:
        det = get_detector(name)
        det.detect(imgs[0][:64, :64].copy())  # load lazily-initialized state outside the timing
        counts, t0 = [], time.perf_counter()
        for img in imgs:
            counts.append(len(det.detect(img)))
        dt = time.perf_counter() - t0
        c = np.array(counts)
        out[name] = {
            "photos": len(imgs),
            "detection_rate": round(float((c > 0).mean()), 4),
            "faces_per_photo": round(float(c.mean()), 3),
            "faces_per_photo_when_found": round(float(c[c > 0].mean()), 3) if (c > 0).any() else 0.0,
            "seconds_per_photo": round(dt / len(imgs), 4),
        }
        print(name, json.dumps(out[name]), flush=True)
    return out


def _descriptors(img, boxes):
    import dlib
    import face_recognition_models as frm

    from anondata.detect import rect_of

    sp = _descriptors.sp = getattr(_descriptors, "sp", None) or dlib.shape_predictor(
        frm.pose_predictor_five_point_model_location())
    rec = _descriptors.rec = getattr(_descriptors, "rec", None) or dlib.face_recognition_model_v1(
        frm.face_recognition_model_location())
    out = []
    for x0, y0, x1, y1 in boxes:
        shape = sp(img, rect_of((x0, y0, x1, y1)))
        out.append(np.array(rec.compute_face_descriptor(img, shape)))
    return out


def identity(ids, imgs, model, steps, iters, device, batch):
    from anondata.anonymizer import Anonymizer
    from anondata.detect import get_detector
    from anondata.faces import FaceSpec, anonymize_photos
    from anondata.keystream import new_key

    anon = Anonymizer.from_pretrained(model, device=device, steps=steps, inversion_iters=iters)
    det = get_detector("hog")
    spec = FaceSpec(mode="detect", detector="hog")
    dists, leaked, done, t0 = [], 0, 0, time.perf_counter()
    for i in range(0, len(imgs), batch):
        chunk = imgs[i:i + batch]
        res = anonymize_photos(anon, chunk, [new_key() for _ in chunk], spec)
        for img, r in zip(chunk, res):
            if r.image is None:
                continue  # quarantined: not published, so nothing to re-identify
            boxes = [f.box for f in sorted(det.detect(img), key=lambda f: (f.box[1], f.box[0]))]
            orig, after = _descriptors(img, boxes), _descriptors(r.image, boxes)
            d = [float(np.linalg.norm(a - b)) for a, b in zip(orig, after)]
            dists += d
            leaked += any(x < 0.6 for x in d)
            done += 1
    dt = time.perf_counter() - t0
    out = {
        "model": anon.model_info.get("name"), "settings": anon.settings, "photos_anonymized": done,
        "reidentified_share": round(leaked / max(done, 1), 4),
        "faces": len(dists), "median_distance": round(float(np.median(dists)), 4) if dists else None,
        "seconds_per_photo_anonymize": round(dt / max(done, 1), 3),
    }
    print("identity", json.dumps(out), flush=True)
    return out


def calibrate(limit, detectors):
    from anondata.detect import get_detector

    ids, imgs = _load("celeba-ids-dev.parquet", limit or 300)
    for name in detectors:
        det = get_detector(name)
        box, lm, miss = [], [], 0
        for img in imgs:
            faces = det.detect(img)
            if not faces:
                miss += 1
                continue
            f = max(faces, key=lambda f: f.box[2] - f.box[0])
            x0, y0, x1, y1 = f.box
            box.append([(x1 - x0) / 128, ((x0 + x1) / 2 - 89) / 128, ((y0 + y1) / 2 - 121) / 128])
            if f.landmarks is not None:
                e1, e2 = f.landmarks[0:2].mean(0), f.landmarks[2:4].mean(0)
                em = (e1 + e2) / 2
                lm.append([np.linalg.norm(e2 - e1) / 128, (f.landmarks[4][1] - em[1]) / 128, (121 - em[1]) / 128])
        b, m = np.array(box), np.array(lm)
        print(f"{name}: {len(imgs) - miss}/{len(imgs)} found; framing side = box width x {1 / b[:, 0].mean():.3f}, "
              f"framing centre = box centre + ({-b[:, 1].mean():.3f}, {-b[:, 2].mean():.3f}) x side")
        print(f"  landmarks: eye distance / side = {m[:, 0].mean():.3f}, nose below eye line / side = "
              f"{m[:, 1].mean():.3f}, framing centre below eye midpoint = {m[:, 2].mean():.4f} x side")


def _iou(a, b) -> float:
    i = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return i / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - i)


def _classify(img, second: str) -> list[dict]:
    """The boxes of `second` that the cross-check counts as missed, each with its best IoU with a
    HOG box, its centre's elliptic distance in the nearest anonymized face ellipse (1 = on it) and
    its width over that face's box width; kind: 'shifted box' (IoU >= 0.3, the usual loose
    same-object match), 'overlaps a face' (IoU > 0) or 'elsewhere'."""
    from anondata.detect import get_detector
    from anondata.faces import _dist_at, _missed_faces, _place_detected

    found = sorted(get_detector("hog").detect(img), key=lambda f: (f.box[1], f.box[0], f.box[2], f.box[3]))
    places = [_place_detected(f, "hog", 1.15, False, img.shape) for f in found]
    out = []
    for b in _missed_faces(img, places, get_detector(second), second, 1.15):
        cx, cy = np.array([(b[0] + b[2]) / 2]), np.array([(b[1] + b[3]) / 2])
        d, j = min((float(_dist_at(p, cx, cy)[0, 0]), j) for j, p in enumerate(places))
        iou = max(_iou(b, f.box) for f in found)
        kind = "shifted box" if iou >= 0.3 else "overlaps a face" if iou > 0 else "elsewhere"
        out.append({"box": list(b), "kind": kind, "iou": round(iou, 3), "centre_in_ellipse": round(d, 3),
                    "width_ratio": round((b[2] - b[0]) / (found[j].box[2] - found[j].box[0]), 3)})
    return out


def cross_check(ids, imgs, second: str) -> dict:
    """Photos published / quarantined by `--detector hog --cross-check second`; the cross-check's
    quarantines by their boxes' kind (see _classify; a photo counts under the farthest kind among
    its boxes: 'shifted box' only when every box it was quarantined for is one)."""
    from collections import Counter

    from anondata.faces import FaceSpec, _find_places

    spec, outcome, kinds, photos = FaceSpec(mode="detect", detector="hog", cross_check=second), Counter(), Counter(), []
    order = ["shifted box", "overlaps a face", "elsewhere"]
    for rid, img in zip(ids, imgs):
        _, reason, _ = _find_places(img, spec)
        if reason is None or reason.startswith("no face"):
            outcome["published" if reason is None else "quarantined: no face"] += 1
            continue
        outcome[f"quarantined: {second} found a face hog missed"] += 1
        boxes = _classify(img, second)
        kinds[max((b["kind"] for b in boxes), key=order.index)] += 1
        photos.append({"id": rid, "boxes": boxes})
    out = {"photos": len(imgs), **outcome, "cross_check_quarantines_by_kind": dict(kinds),
           "boxes_by_kind": dict(Counter(b["kind"] for p in photos for b in p["boxes"]))}
    print("cross-check", second, json.dumps(out), flush=True)
    return {**out, "quarantined": photos}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="only the first N photos")
    ap.add_argument("--min-side", type=int, default=0, metavar="PX",
                    help="only photos whose longer side is over PX (1600: those searched in tiles too)")
    ap.add_argument("--detectors", default="hog,haar")
    ap.add_argument("--model", default=None, help="also measure re-identification after anonymizing")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--inversion-iters", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8, help="photos per anonymize_photos call")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--cross-check", default=None, metavar="DETECTOR", help="measure --cross-check DETECTOR instead")
    a = ap.parse_args()
    if a.calibrate:
        return calibrate(a.limit, a.detectors.split(","))
    ids, imgs = _load("celeba-wild-dev.parquet", a.limit)
    if a.min_side:
        keep = [j for j, im in enumerate(imgs) if max(im.shape[:2]) > a.min_side]
        ids, imgs = [ids[j] for j in keep], [imgs[j] for j in keep]
    if a.cross_check:
        out = cross_check(ids, imgs, a.cross_check)
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=1))
        return out
    sizes = np.array([im.shape[0] * im.shape[1] for im in imgs]) / 1e6
    results = {"photos": len(imgs), "megapixels_median": round(float(np.median(sizes)), 3),
               "detection": detection(ids, imgs, a.detectors.split(","))}
    if a.model:
        results["identity"] = identity(ids, imgs, a.model, a.steps, a.inversion_iters, a.device, a.batch)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
