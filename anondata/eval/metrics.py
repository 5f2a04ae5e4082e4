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


# float64 probe-gallery differences held at once (16 MiB). Every one at once was probes x gallery
# x 128 floats: 400 GB for a 20k-photo eval.
BLOCK = 1 << 21


def _codes(seqs, known) -> list[np.ndarray]:
    """Each sequence's values as integers, equal where the values are equal (==, as in a dict), -1
    where `known` says the value names nothing. Integer masks per block instead of object arrays."""
    table: dict = {}
    return [np.array([table.setdefault(v, len(table)) if known(v) else -1 for v in s], np.int64) for s in seqs]


def _blocks(n_p: int, n_g: int, dim: int, block: int):
    """(rows, cols) slices of the probes x gallery matrix, in row-major order, each with at most
    `block` differences (or one pair): whole rows while a row fits, else one row in column runs.
    Row-major, so the genuine distances come out in the order the all-at-once version had."""
    if n_g * dim <= block:
        step = max(1, block // max(1, n_g * dim))
        for r in range(0, n_p, step):
            yield slice(r, min(n_p, r + step)), slice(0, n_g)
    else:
        step = max(1, block // dim)
        for r in range(n_p):
            for c in range(0, n_g, step):
                yield slice(r, r + 1), slice(c, min(n_g, c + step))


class _Smallest:
    """The m smallest values of a stream, exactly, in O(m + one block) memory: the threshold at
    FAR is the k-th smallest impostor distance, and all of them do not fit in memory."""

    def __init__(self, m: int):
        self.m, self.parts, self.size, self.bound = m, [], 0, np.inf

    def add(self, v: np.ndarray) -> None:
        if not self.m:
            return
        v = v[v <= self.bound]  # m values are already at or below the bound: a larger one is not wanted
        self.parts.append(v)
        self.size += v.size
        if self.size > 2 * self.m:
            a = np.partition(np.concatenate(self.parts), self.m - 1)[:self.m]
            self.parts, self.size, self.bound = [a], a.size, a.max()

    def kth(self, k: int) -> float:
        """The k-th smallest (0-based) of everything added; k < m."""
        return np.partition(np.concatenate(self.parts), k)[k]


def reidentification(probes: np.ndarray, probe_ids, probe_keys, gallery: np.ndarray, gallery_ids, gallery_keys,
                     far: float = 1e-3, *, block: int = BLOCK) -> dict:
    """Rank-1 and TAR@FAR of `probes` against `gallery`, pairs with the same key (photo) excluded.

    probe_ids/gallery_ids: person labels, None (or NaN) where unknown; probe_keys/gallery_keys: photo
    labels (record ids). An unlabelled photo is in no pair and is no gallery candidate: two unlabelled
    photos compared equal (None == None) and counted as the same person.

    Distances are computed in blocks of at most `block` float differences (memory: a block, the
    genuine distances and the FAR share of the impostor distances); each is the same float
    expression as all at once, so every number but the impostor mean (summed per block) is too."""
    probes, gallery = np.asarray(probes, np.float64), np.asarray(gallery, np.float64)
    pid, gid = _codes([probe_ids, gallery_ids], known_label)
    pk, gk = _codes([probe_keys, gallery_keys], lambda v: True)
    n_p, n_g, dim = len(probes), len(gallery), probes.shape[1] if probes.ndim == 2 else 0

    def pairs(r, c):  # (same person, other person) masks of a block; unknown labels are -1: in no pair
        valid = (pk[r, None] != gk[None, c]) & (gid[None, c] >= 0) & (pid[r, None] >= 0)
        same = (pid[r, None] == gid[None, c]) & valid
        return same, valid & ~same

    n_imp = sum(int(pairs(r, c)[1].sum()) for r, c in _blocks(n_p, n_g, dim, block))
    k = int(math.floor(far * n_imp))
    smallest = _Smallest(k + 1 if 1 <= k < n_imp else 0)
    near_same, near_diff = np.full(n_p, np.inf), np.full(n_p, np.inf)
    has_mate = np.zeros(n_p, bool)
    gen_parts, imp_sum, imp_near = [], 0.0, 0
    for r, c in _blocks(n_p, n_g, dim, block):
        same, diff = pairs(r, c)
        d = np.sqrt(np.maximum(((probes[r, None, :] - gallery[None, c, :]) ** 2).sum(-1), 0))
        near_same[r] = np.minimum(near_same[r], np.where(same, d, np.inf).min(1, initial=np.inf))
        near_diff[r] = np.minimum(near_diff[r], np.where(diff, d, np.inf).min(1, initial=np.inf))
        has_mate[r] |= same.any(1)
        gen_parts.append(d[same])
        imp = d[diff]
        imp_sum += imp.sum()
        imp_near += int((imp <= SAME_PERSON).sum())
        smallest.add(imp)
    gen = np.concatenate(gen_parts) if gen_parts else np.zeros(0)
    # Rank-1 hit: a photo of the person is at least as near as every other person's. Why not argmin:
    # a tie went to whichever came first in the gallery, so the number depended on its order; a
    # tie counts as re-identified (the cautious reading for a sign-off).
    rank1 = (near_same <= near_diff)[has_mate]
    out = {
        "probes": int(n_p),
        "probes_with_mates": int(has_mate.sum()),
        "gallery": int(n_g),
        "genuine_pairs": int(gen.size),
        "impostor_pairs": n_imp,
        "rank1": _f(rank1.mean()) if rank1.size else None,
        "far": far,
        "threshold_at_far": None,
        "tar_at_far": None,
        "tar_at_0_6": _f((gen <= SAME_PERSON).mean()) if gen.size else None,
        "far_at_0_6": _f(imp_near / n_imp) if n_imp else None,
        "genuine_mean_distance": _f(gen.mean()) if gen.size else None,
        "impostor_mean_distance": _f(imp_sum / n_imp) if n_imp else None,
    }
    if gen.size and k >= 1:
        # Accept d <= t with t the largest threshold that accepts at most `far` of the impostors.
        # Why k >= 1: with fewer than 1/far impostor pairs the threshold is the closest impostor
        # whatever `far` is, so the number would not be TAR@FAR (it is TAR at one pair's distance,
        # FAR about 1/pairs) yet the report's re-identification check passed on it; it stays null.
        t = smallest.kth(k) if k < n_imp else np.inf
        out["threshold_at_far"] = _f(np.nextafter(t, -np.inf)) if k < n_imp else None
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


def colour_shift(orig: np.ndarray, anon: np.ndarray) -> dict | None:
    """Mean RGB and luma (Rec. 601) of `anon` minus `orig`, in 8-bit levels, over the given pixels;
    None for an empty crop (a face box entirely outside the photo), whose mean was NaN."""
    if orig.size == 0 or anon.size == 0:
        return None
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
