"""The evaluation: originals vs their release (and, with the keys, vs restores and wrong-key restores).

`evaluate` works on photos in memory, so it does not care where they came from; `evaluate_release`
reads a release folder and its source (and opens the envelopes with an identity) and calls it.

Cost: dlib embeddings are milliseconds per face; every restore is one run of the diffusion
transform per face (seconds on a CPU), so the wrong-key experiments with several keys per face can
be limited to a sample (`EvalOptions.attack_sample`). Torch runs with one thread, as the anonymize
job's workers do: lossless restore is bit-exact only with the same arithmetic.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from .. import __version__
from ..errors import AnondataError, InputError
from . import attacks, identity as ident, metrics as M
from .identity import Box
FORMAT = "anondata-eval"


@dataclass
class EvalOptions:
    wrong_bits: tuple[int, ...] = (1, 8, 64)
    leakage_p: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
    restore_sample: int | None = None  # faces restored with the key and a random key (None: all)
    attack_sample: int | None = None  # of those, faces for the bit-flip and leakage runs (None: all)
    grid_sample: int = 8  # photos shown in the report's grid
    far: float = 1e-3
    seed: int = 0  # wrong keys and guesses: an evaluation is repeatable, the keys are not record keys
    progress: bool = True


@dataclass
class EvalInput:
    ids: list[str]
    originals: list[np.ndarray]
    anonymized: list[np.ndarray]
    fallback_boxes: list[Box | None] | None = None  # where the face is if HOG finds none (aligned box)
    identities: list | None = None  # person label per photo (enables re-identification)
    keys: list[bytes] | None = None  # record keys (enables restore, wrong key, leakage)
    records: list[bytes] | None = None  # photo restore records, same order
    gallery: Iterable[tuple[str, object, np.ndarray]] | None = None  # (id, person, photo): other photos
    gallery_size: int = 0  # for the progress bar
    gallery_box: Box | None = None
    info: dict = field(default_factory=dict)  # dataset/model/settings for the report


@dataclass
class EvalResult:
    metrics: dict
    per_face: list[dict]  # numbers per evaluated photo (histograms)
    grid: list[dict]  # {"id", "box", "original", "anonymized", "restored", "wrong_key"} for the sample


def _check(inp: EvalInput) -> int:
    n = len(inp.ids)
    if n == 0:
        raise InputError("nothing to evaluate: no anonymized records")
    for name in ("originals", "anonymized"):
        if len(getattr(inp, name)) != n:
            raise InputError(f"eval: {name} has {len(getattr(inp, name))} photos for {n} ids")
    for i, (o, a) in enumerate(zip(inp.originals, inp.anonymized)):
        if o.shape != a.shape:
            raise InputError(f"record {inp.ids[i]!r}: anonymized photo is {a.shape[1]}x{a.shape[0]}, the source's "
                             f"{o.shape[1]}x{o.shape[0]}: is --source the dataset this release was made from?")
    # Anonymize leaves every pixel outside the faces as it was (an aligned crop: the corners, half
    # of it), so a record sharing none with its "original" was made from another image: a --source
    # of the same size and ids (`{split}-{row}` ids match any dataset of that length) was compared
    # with no error, and its strangers' distances measured nothing. Most records, not one: a
    # photo the face fills may keep none.
    unrelated = [inp.ids[i] for i, (o, a) in enumerate(zip(inp.originals, inp.anonymized))
                 if np.all(o == a, axis=-1).mean() < 0.01]
    if len(unrelated) > n // 2:
        raise InputError(f"{len(unrelated)} of {n} anonymized records share no pixels with their source image "
                         f"(first: {', '.join(map(repr, unrelated[:3]))}), while anonymize keeps everything outside "
                         "the faces: --source is not the dataset this release was made from")
    if (inp.keys is None) != (inp.records is None) or (inp.keys is not None and not len(inp.keys) == len(inp.records) == n):
        raise InputError("eval: keys and records must both be given, one per photo")
    if inp.identities is not None and len(inp.identities) != n:
        raise InputError("eval: one identity label per photo")
    return n


def evaluate(anon, inp: EvalInput, opts: EvalOptions | None = None) -> EvalResult:
    """Every metric the keys and labels allow. `anon`: the release's Anonymizer (None without keys)."""
    import torch
    from tqdm import tqdm

    opts = opts or EvalOptions()
    n = _check(inp)
    t0 = time.time()
    keyed = inp.keys is not None
    if keyed and anon is None:
        raise InputError("eval: restoring needs the release's model")
    rng = np.random.default_rng(opts.seed)
    n_r = n if opts.restore_sample is None else min(n, opts.restore_sample)
    attack_idx = list(range(n_r if opts.attack_sample is None else min(n_r, opts.attack_sample)))
    p_guess = [p for p in opts.leakage_p if p < 1.0]
    restores = n_r * 3 + len(attack_idx) * (len(opts.wrong_bits) + len(p_guess)) if keyed else 0
    bar = tqdm(total=n + restores + inp.gallery_size, unit="step", desc="eval", disable=None if opts.progress else True,  # None: off unless stderr is a terminal
               file=sys.stderr, dynamic_ncols=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    transforms = 0
    try:
        faces, E, boxes = [], {}, []
        # 1. boxes, embeddings and utility on originals vs anonymized (no key needed)
        for i in range(n):
            o, a = inp.originals[i], inp.anonymized[i]
            fb = inp.fallback_boxes[i] if inp.fallback_boxes else None
            box, found = ident.face_box(o, fb)
            boxes.append(box)
            lo, la = ident.landmarks68(o, box), ident.landmarks68(a, box)
            faces.append({
                "id": inp.ids[i],
                "detected_original": found,
                "detected_anonymized": bool(ident.detect(a)),
                "landmark_displacement": M.landmark_displacement(lo, la),
                "colour_shift": M.colour_shift(M.crop(o, box), M.crop(a, box)),
                "changed_pixels": float(np.any(o != a, axis=-1).mean()),
            })
            E.setdefault("original", []).append(ident.embed(o, box))
            E.setdefault("anonymized", []).append(ident.embed(a, box))
            bar.update(1)
        shifts = [f["colour_shift"] for f in faces if f["colour_shift"] is not None]
        if not shifts:  # the colour means are numbers in metrics.json: say why there are none
            h, w = inp.originals[0].shape[:2]
            raise InputError(f"eval: no face box has a pixel inside its photo (record {inp.ids[0]!r}: box "
                             f"{list(boxes[0])}, photo {w}x{h}): give fallback boxes that lie in the photos")
        d_anon = M.distances(E["original"], E["anonymized"])
        for f, d in zip(faces, d_anon):
            f["distance_anonymized"] = float(d)

        grid_n = min(n_r if keyed else n, opts.grid_sample)
        grid = [{"id": inp.ids[i], "box": boxes[i], "original": inp.originals[i], "anonymized": inp.anonymized[i]}
                for i in range(grid_n)]

        restore_m = wrong_m = leak_m = None
        if keyed:
            from ..faces import restore_photos

            def restore(a_img, key, rec, rid, model=anon):
                nonlocal transforms
                out = restore_photos(model, [a_img], [key], [rec], ids=[rid])[0]
                transforms += 1
                bar.update(1)
                return out

            def score(i, img, name):
                e = ident.embed(img, boxes[i])
                E.setdefault(name, []).append(e)
                o = M.crop(inp.originals[i], boxes[i])
                c = M.crop(img, boxes[i])
                return {"distance": float(np.linalg.norm(e - E["original"][i])), "psnr": M.psnr(o, c),
                        "ssim": M.ssim(o, c), "exact": bool(np.array_equal(img, inp.originals[i]))}

            lossless_failures = []
            for i in range(n_r):
                rid, a_img, key, rec = inp.ids[i], inp.anonymized[i], inp.keys[i], inp.records[i]
                stripped = attacks.key_only(rec)
                try:
                    r_img = restore(a_img, key, rec, rid)
                except AnondataError as e:  # lossless hash mismatch: reported, the key-only result is scored
                    lossless_failures.append(f"{rid}: {e}")
                    r_img = None
                if stripped != rec or r_img is None:
                    k_img = restore(a_img, key, stripped, rid)
                else:  # a lossy release: the release restore is the key-only restore
                    k_img = r_img
                    bar.update(1)
                if r_img is None:
                    r_img = k_img
                w_img = restore(a_img, attacks.random_key(rng), stripped, rid)
                faces[i]["restored"] = score(i, r_img, "restored")
                faces[i]["key_only"] = score(i, k_img, "key_only")
                faces[i]["wrong_key"] = score(i, w_img, "wrong_key")
                if i < grid_n:
                    grid[i].update(restored=r_img, wrong_key=w_img)
            for i in attack_idx:
                rid, a_img, key = inp.ids[i], inp.anonymized[i], inp.keys[i]
                stripped = attacks.key_only(inp.records[i])
                faces[i]["bits"] = {}
                for k in opts.wrong_bits:
                    img = restore(a_img, attacks.flip_bits(key, k, rng), stripped, rid)
                    faces[i]["bits"][str(k)] = score(i, img, f"bits{k}")
                faces[i]["leakage"] = {}
                for p in opts.leakage_p:
                    if p >= 1.0:
                        faces[i]["leakage"][_pkey(p)] = faces[i]["key_only"]
                        continue
                    img = restore(a_img, key, stripped, rid, model=attacks.GuessAnonymizer(anon, p, opts.seed))
                    faces[i]["leakage"][_pkey(p)] = score(i, img, f"p{p}")

            def block(name, sub=None):
                rows = [f[name] if sub is None else f[name][sub] for f in faces if name in f]
                return {
                    "n": len(rows),
                    "identity_distance": M.distance_stats([r["distance"] for r in rows]),
                    "psnr_face": M.summary([r["psnr"] for r in rows]),
                    "ssim_face": M.summary([r["ssim"] for r in rows]),
                    "bit_exact_share": float(np.mean([r["exact"] for r in rows])) if rows else None,
                }

            restore_m = {"restored": block("restored"), "key_only": block("key_only"),
                         "lossless_failures": lossless_failures}
            wrong_m = {"random": block("wrong_key"),
                       "bits": [{"bits": k, **block("bits", str(k))} for k in opts.wrong_bits]}
            leak_m = [{"p": float(p), **block("leakage", _pkey(p))} for p in opts.leakage_p]

        # 2. re-identification against other photos of each person
        reid = None
        if inp.identities is not None:
            g_emb, g_ids, g_keys = [], [], []
            for gid, person, img in inp.gallery or []:
                box, _ = ident.face_box(img, inp.gallery_box)
                g_emb.append(ident.embed(img, box))
                g_ids.append(person)
                g_keys.append(gid)
                bar.update(1)
            g_emb += list(E["original"])
            g_ids += list(inp.identities)
            g_keys += list(inp.ids)
            g = np.stack(g_emb)
            reid = {}
            for name in ("original", "anonymized", "restored", "key_only", "wrong_key"):
                if name in E:
                    k = len(E[name])  # the restored variants cover the first restore_sample faces
                    reid[name] = M.reidentification(np.stack(E[name]), inp.identities[:k], inp.ids[:k], g, g_ids,
                                                     g_keys, far=opts.far)
    finally:
        torch.set_num_threads(threads)
        bar.close()

    metrics = {
        "format": FORMAT,
        "version": 1,
        "tool": {"name": "anondata", "version": __version__},
        "info": inp.info,
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items() if k != "progress"},
        "faces": {
            "evaluated": n,
            "detected_on_original": int(sum(f["detected_original"] for f in faces)),
            "identities": len({v for v in inp.identities if M.known_label(v)}) or None
            if inp.identities is not None else None,
            "restore_sample": n_r if keyed else 0,
            "attack_sample": len(attack_idx) if keyed else 0,
        },
        "identity": {
            "threshold": ident.SAME_PERSON,
            "original_vs_anonymized": M.distance_stats(d_anon),
            "reidentification": reid,
        },
        "restore": restore_m,
        "wrong_key": wrong_m,
        "leakage": leak_m,
        "utility": {
            "detector": "dlib HOG, 1 upsampling",
            "detection_rate_original": float(np.mean([f["detected_original"] for f in faces])),
            "detection_rate_anonymized": float(np.mean([f["detected_anonymized"] for f in faces])),
            "landmark_predictor": "dlib 68-point (iBUG 300-W), normalised by the original's outer-eye-corner distance",
            "landmark_displacement": M.summary([f["landmark_displacement"] for f in faces]),
            # over the faces with a pixel in the photo (an empty crop has no colour shift)
            "colour_shift_mean": {c: float(np.mean([x[c] for x in shifts])) for c in ("r", "g", "b", "luma")},
            "colour_shift_mean_abs": {c: float(np.mean([abs(x[c]) for x in shifts])) for c in ("r", "g", "b", "luma")},
            "changed_pixel_share": M.summary([f["changed_pixels"] for f in faces]),
        },
        "timing": {"seconds": round(time.time() - t0, 1), "restore_transforms": transforms},
        "per_face": [_face_row(f) for f in faces],
    }
    return EvalResult(metrics, faces, grid)


def _face_row(f: dict) -> dict:
    """The per-photo numbers kept in metrics.json (record ids only, no pixels)."""
    row = {"id": f["id"], "detected_original": f["detected_original"], "detected_anonymized": f["detected_anonymized"],
           "distance_anonymized": f["distance_anonymized"], "landmark_displacement": f["landmark_displacement"]}
    for k in ("restored", "key_only", "wrong_key"):
        row[f"distance_{k}"] = f[k]["distance"] if k in f else None
    return row


def _pkey(p: float) -> str:
    return f"{p:g}"


# ------------------------------------------------------------------------------ release folders


def _decode(cell, rid: str) -> np.ndarray:
    from ..images import decode_image

    data = cell["bytes"] if isinstance(cell, dict) else cell
    if data is None:
        raise InputError(f"record {rid!r}: the image cell is empty")
    return decode_image(bytes(data), rid)[0]


def _verified_note(summary: dict) -> str:
    """The report's "release check" line: what open_release proved. Who signed is proven only
    against a pinned key (--signer); the report is what a reviewer signs off on, so it says which."""
    who = f"{summary['signer_name']} ({summary['signer']})" if summary["signer_name"] else summary["signer"]
    if summary["signer_pinned"]:
        return f"signature and file hashes checked; signed by the pinned signer {who}"
    return f"signature and file hashes checked (signer not pinned: signed by {who}, not checked against a known key)"


def evaluate_release(release: str, source: str, *, signer, identity_path: str | None = None, keys: str | None = None,
                     identity_column: str | None = None, model: str | None = None, limit: int | None = None,
                     gallery_limit: int | None = None, opts: EvalOptions | None = None) -> EvalResult:
    """Evaluate release folder `release` against `source`; with `identity_path` also restore.
    `signer`: the Recipient that must have signed the release, or None on purpose."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..job.sources import image_bytes, open_source
    from ..manifest import open_release

    if keys is not None and identity_path is None:
        # only the identity opens the envelopes: ignored, --keys gave a report without any restore
        raise InputError("--keys goes with --identity (the identity that opens those envelopes): add --identity "
                         "NAME.key, or leave out --keys")
    root = Path(release)
    rel = open_release(root, signer, keep_envelopes=identity_path is not None and keys is None)
    m = rel.manifest
    extra = m.get("extra", {})
    image_column = extra.get("image_column", "image")
    id_column = extra.get("id_column", "record_id")
    wanted = [r["id"] for r in m["records"] if r["status"] == "anonymized"]
    if limit is not None:
        wanted = wanted[:limit]
    if not wanted:
        raise InputError(f"{release}: the release has no anonymized records")
    want = set(wanted)

    anonymized: dict[str, np.ndarray] = {}
    for sh in m["shards"]:
        t = pq.read_table(root / sh["path"], columns=[id_column, image_column])
        for rid, cell in zip(t.column(0).to_pylist(), t.column(1).to_pylist()):
            if str(rid) in want:
                anonymized[str(rid)] = _decode(cell, str(rid))

    src = open_source(source, image_column=image_column)
    if id_column in src.schema.names and src.id_column != id_column:
        src = open_source(source, image_column=image_column, id_column=id_column)
    if identity_column is not None and identity_column not in src.schema.names:
        raise InputError(f"--identity-column {identity_column!r} is not a column of {source} "
                         f"(columns: {', '.join(src.schema.names)})")
    if identity_column is not None and pa.types.is_nested(src.schema.field(identity_column).type):
        # labels are compared and collected in sets: a struct (the image column) or list cell is no
        # person label, and ended in a TypeError traceback
        raise InputError(f"--identity-column {identity_column!r} holds {src.schema.field(identity_column).type} "
                         "values, not person labels (names or numbers): name the column that says who is pictured")
    originals: dict[str, np.ndarray] = {}
    persons: dict[str, object] = {}
    gallery_rows: list[tuple[str, object, bytes]] = []  # (id, person, encoded image)
    cols = [image_column] + ([identity_column] if identity_column else [])
    for s in src.splits:
        ids = src.ids(s.name)
        for start in range(0, len(ids), 1000):
            rows = src.read(s.name, start, start + 1000, cols)
            cells = rows.column(0).to_pylist()
            labels = rows.column(1).to_pylist() if identity_column else [None] * len(cells)
            for j, (cell, label) in enumerate(zip(cells, labels)):
                rid = ids[start + j]
                if rid not in want and (label is None or not identity_column):
                    continue
                data, err = image_bytes(src, cell)
                if rid in want:
                    if data is None:
                        raise InputError(f"source record {rid!r}: {err}")
                    originals[rid] = _decode(data, rid)
                    persons[rid] = label
                elif data is not None:
                    gallery_rows.append((rid, label, data))
    missing = [r for r in wanted if r not in originals]
    if missing:
        raise InputError(f"record(s) {', '.join(map(repr, missing[:5]))} of the release are not in {source}: "
                         "give the source the release was made from")
    if identity_column:
        mine = set(persons.values())
        gallery_rows.sort(key=lambda g: g[1] not in mine)  # the probes' people first (stable)
        if gallery_limit is not None:
            gallery_rows = gallery_rows[:gallery_limit]

    def gallery():
        for rid, person, data in gallery_rows:
            try:
                yield rid, person, _decode(data, rid)
            except InputError:
                continue  # an unreadable gallery photo is not evidence either way

    face_box = extra.get("faces", {}).get("box")
    box = tuple(face_box) if face_box else None
    rec_keys = rec_records = None
    anon = None
    if identity_path is not None:
        from ..envelope import open_records
        from ..identity import load_identity
        from ..job.restore import load_release_model
        from ..manifest import release_envelopes

        opened = open_records(release_envelopes(rel, keys), load_identity(identity_path), m["dataset_id"], wanted)
        rec_keys = [opened[r][0] for r in wanted]
        rec_records = [opened[r][1] for r in wanted]
        anon = load_release_model(m, model)
    inp = EvalInput(
        ids=wanted,
        originals=[originals[r] for r in wanted],
        anonymized=[anonymized[r] for r in wanted],
        fallback_boxes=[box] * len(wanted),
        identities=[persons[r] for r in wanted] if identity_column else None,
        keys=rec_keys,
        records=rec_records,
        gallery=gallery() if identity_column else None,
        gallery_size=len(gallery_rows) if identity_column else 0,
        gallery_box=box,
        info={
            "release": str(root),
            "release_verified": _verified_note(rel.summary),
            "source": str(source),
            "dataset_id": m["dataset_id"],
            "records_in_release": m["counts"]["anonymized"],
            "quarantined_in_release": m["counts"]["quarantined"],
            "identity_column": identity_column,
            "faces": extra.get("faces"),
            "lossless": extra.get("lossless"),
            "model": m["model"],
            "settings": m["settings"],
            # what the gallery holds against what was asked: a --gallery-limit the source cannot
            # fill was silent, and the report's "gallery" column alone does not say it fell short
            "gallery": {"other_photos": len(gallery_rows), "limit": gallery_limit} if identity_column else None,
        },
    )
    return evaluate(anon, inp, opts)
