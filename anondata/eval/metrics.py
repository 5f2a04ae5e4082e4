"""The numbers, as plain functions of arrays (no models): easy to test and to recompute.

Re-identification follows the protocol of the paper's LFW table: each probe (an original,
anonymized, restored or wrong-key face) is compared with a gallery of *other* photos of people,
never with its own photo. Rank-1: the nearest gallery face is the same person. TAR@FAR: the share
of same-person pairs accepted at the distance threshold that accepts a share FAR of the
different-person pairs (threshold set on this probe set's own impostor pairs: the best an
attacker with labelled data could do, so a low TAR is a strong statement).
"""

from __future__ import annotations

import math

import numpy as np

from .identity import SAME_PERSON


def _f(v) -> float | None:
    """JSON-safe float (None for NaN/inf: the schema allows null where a number can be undefined)."""
    v = float(v)
    return v if math.isfinite(v) else None


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Euclidean distance between two (N, 128) embedding arrays."""
    return np.linalg.norm(np.asarray(a) - np.asarray(b), axis=1)


def distance_stats(d) -> dict:
    d = np.asarray(d, dtype=np.float64)
    if d.size == 0:
        return {"n": 0, "mean": None, "median": None, "min": None, "max": None, "share_beyond_0_6": None}
    return {
        "n": int(d.size),
        "mean": _f(d.mean()),
        "median": _f(np.median(d)),
        "min": _f(d.min()),
        "max": _f(d.max()),
        "share_beyond_0_6": _f((d > SAME_PERSON).mean()),
    }


def known_label(v) -> bool:
    """A person label that names someone (not None, not a float NaN from a pandas-written column)."""
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def reidentification(probes: np.ndarray, probe_ids, probe_keys, gallery: np.ndarray, gallery_ids, gallery_keys,
                     far: float = 1e-3) -> dict:
    """Rank-1 and TAR@FAR of `probes` against `gallery`, pairs with the same key (photo) excluded.

    probe_ids/gallery_ids: person labels, None (or NaN) where unknown; probe_keys/gallery_keys: photo
    labels (record ids). An unlabelled photo is in no pair and is no gallery candidate: two unlabelled
    photos compared equal (None == None) and counted as the same person."""
    probes, gallery = np.asarray(probes, np.float64), np.asarray(gallery, np.float64)
    pid, gid = np.asarray(probe_ids, dtype=object), np.asarray(gallery_ids, dtype=object)
    pk, gk = np.asarray(probe_keys, dtype=object), np.asarray(gallery_keys, dtype=object)
    d = np.sqrt(np.maximum(((probes[:, None, :] - gallery[None, :, :]) ** 2).sum(-1), 0))
    known_p, known_g = np.array([known_label(v) for v in pid], bool), np.array([known_label(v) for v in gid], bool)
    valid = (pk[:, None] != gk[None, :]) & known_g[None, :]
    same = (pid[:, None] == gid[None, :]) & valid & known_p[:, None]
    diff = (pid[:, None] != gid[None, :]) & valid & known_p[:, None]
    has_mate = same.any(1)
    # Rank-1 hit: a photo of the person is at least as near as every other person's. Why not argmin:
    # a tie went to whichever came first in the gallery, so the number depended on its order; a
    # tie counts as re-identified (the cautious reading for a sign-off).
    rank1 = (np.where(same, d, np.inf).min(1) <= np.where(diff, d, np.inf).min(1))[has_mate]
    gen, imp = d[same], d[diff]
    out = {
        "probes": int(len(probes)),
        "probes_with_mates": int(has_mate.sum()),
        "gallery": int(len(gallery)),
        "genuine_pairs": int(gen.size),
        "impostor_pairs": int(imp.size),
        "rank1": _f(rank1.mean()) if rank1.size else None,
        "far": far,
        "threshold_at_far": None,
        "tar_at_far": None,
        "tar_at_0_6": _f((gen <= SAME_PERSON).mean()) if gen.size else None,
        "far_at_0_6": _f((imp <= SAME_PERSON).mean()) if imp.size else None,
        "genuine_mean_distance": _f(gen.mean()) if gen.size else None,
        "impostor_mean_distance": _f(imp.mean()) if imp.size else None,
    }
    k = int(math.floor(far * imp.size))
    if gen.size and k >= 1:
        # Accept d <= t with t the largest threshold that accepts at most `far` of the impostors.
        # Why k >= 1: with fewer than 1/far impostor pairs the threshold is the closest impostor
        # whatever `far` is, so the number would not be TAR@FAR (it is TAR at one pair's distance,
        # FAR about 1/pairs) yet the report's re-identification check passed on it; it stays null.
        s = np.sort(imp)
        t = s[k] if k < s.size else np.inf
        out["threshold_at_far"] = _f(np.nextafter(t, -np.inf)) if k < s.size else None
        out["tar_at_far"] = _f((gen < t).mean())
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR in dB of two uint8 images, or None (left out of the summaries, whose `n` then counts
    fewer faces) in two cases: identical images (infinite PSNR) and an empty crop (a face box
    entirely outside the photo: no pixel to compare, so the number is undefined; numpy's mean of
    nothing is NaN with a warning). Tell the two apart by the crop: an empty one also has SSIM null."""
    if a.size == 0 or b.size == 0:
        return None
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return None if mse == 0 else _f(10 * math.log10(255.0**2 / mse))


SSIM_MIN_SIDE = 3  # the smallest odd window with a sample variance in it


def ssim(a: np.ndarray, b: np.ndarray) -> float | None:
    """Mean SSIM of two uint8 crops over 7x7 windows, or the largest odd window that fits.

    None (undefined, left out of the summaries, whose `n` then counts fewer faces) when either
    side is under 3 px: a 1-px window has no variance to compare (skimage divides by N - 1 = 0)
    and a 2-px side fits no odd window. Such a crop is a face box that lies almost entirely
    outside the photo; a number made up for it would say nothing about the face."""
    from skimage.metrics import structural_similarity

    side = min(a.shape[:2])
    if side < SSIM_MIN_SIDE:
        return None
    win = min(7, side if side % 2 else side - 1)
    return _f(structural_similarity(a, b, channel_axis=2, data_range=255, win_size=win))


def crop(img: np.ndarray, box) -> np.ndarray:
    """The part of the half-open box inside the photo (empty when none is). Why clamp both ends
    at 0: a negative end would index from the far edge, so a box above or left of the photo
    cropped most of the photo instead of nothing."""
    x0, y0, x1, y1 = box
    h, w = img.shape[:2]
    return img[max(0, y0):max(0, min(h, y1)), max(0, x0):max(0, min(w, x1))]


def landmark_displacement(ref: np.ndarray, other: np.ndarray) -> float | None:
    """Mean point distance between two (68, 2) landmark sets over the inter-ocular distance
    (outer eye corners 36 and 45 of `ref`)."""
    iod = float(np.linalg.norm(ref[36] - ref[45]))
    if iod < 1e-6:
        return None
    return _f(np.linalg.norm(ref - other, axis=1).mean() / iod)


_LUMA = np.array([0.299, 0.587, 0.114])


def colour_shift(orig: np.ndarray, anon: np.ndarray) -> dict:
    """Mean RGB and luma (Rec. 601) of `anon` minus `orig`, in 8-bit levels, over the given pixels."""
    o = orig.reshape(-1, 3).astype(np.float64).mean(0)
    a = anon.reshape(-1, 3).astype(np.float64).mean(0)
    d = a - o
    return {"r": float(d[0]), "g": float(d[1]), "b": float(d[2]), "luma": float(d @ _LUMA)}


def summary(values) -> dict:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "mean": None, "median": None, "min": None, "max": None}
    return {"n": int(v.size), "mean": _f(v.mean()), "median": _f(np.median(v)), "min": _f(v.min()), "max": _f(v.max())}


def wilson(share: float | None, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """95% Wilson score interval of a share observed on n faces (small samples: say how sure)."""
    if share is None or n == 0:
        return None
    c = z * z
    centre = (share + c / (2 * n)) / (1 + c / n)
    half = z * math.sqrt(share * (1 - share) / n + c / (4 * n * n)) / (1 + c / n)
    return max(0.0, centre - half), min(1.0, centre + half)
