"""`anondata demo`: the whole workflow on two sample photos, offline, in about a minute.

Why these photos: they ship with the package's own dependencies (scikit-image's astronaut,
Eileen Collins, NASA, public domain; matplotlib's Grace Hopper, public domain), so the demo
needs no download and no dataset of real people beyond those two public figures.

Steps: keygen -> anonymize (the real Ray job, faces detected) -> verify -> restore -> a PNG
grid with one row per photo: original | anonymized | restored | wrong key.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

COLUMNS = ("original", "anonymized", "restored", "wrong key")


@dataclass
class DemoResult:
    out: str
    grid: str
    records: int
    exact: bool


def sample_photos() -> dict[str, bytes]:
    """name -> encoded image bytes, from scikit-image and matplotlib's bundled data."""
    from PIL import Image

    out = {}
    try:
        from skimage import data as skdata

        buf = io.BytesIO()
        Image.fromarray(skdata.astronaut()).save(buf, format="PNG")
        out["astronaut.png"] = buf.getvalue()
    except ImportError:
        pass
    try:
        from matplotlib import cbook

        with open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), "rb") as f:
            out["grace_hopper.jpg"] = f.read()
    except (ImportError, OSError, ValueError):
        pass
    if not out:
        raise InputError("the demo needs scikit-image or matplotlib for its sample photos: pip install 'anondata[dev]'")
    return out


def run_demo(out: str = "anondata-demo", model: str = "embedded", steps: int | None = None,
             inversion_iters: int | None = None, progress: bool = True, log=print) -> DemoResult:
    """The demo in OUT. One that fails or is interrupted removes what it wrote: its folder held
    the sample photos and keys, and refused the rerun as "not empty"."""
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise InputError(f"--out {root}: is a file, not a folder; choose a new folder name")
    if root.exists() and any(root.iterdir()):
        raise InputError(f"{root} is not empty; pass --out NEW_FOLDER (or remove it)")
    made = not root.exists()
    try:
        return _demo(root, model, steps, inversion_iters, progress, log)
    except BaseException:
        if made:
            shutil.rmtree(root, ignore_errors=True)
        elif root.is_dir():
            for child in list(root.iterdir()):
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() and not child.is_symlink() else child.unlink()
        raise


def _demo(root: Path, model, steps, inversion_iters, progress, log) -> DemoResult:
    from PIL import Image

    from .anonymizer import Anonymizer
    from .envelope import open_records
    from .faces import key_only_record, restore_photos
    from .identity import generate_identity, load_identity
    from .images import decode_image
    from .job.pipeline import JobOptions, run_anonymize
    from .job.restore import run_restore
    from .keystream import new_key
    from .manifest import open_release

    (root / "input").mkdir(parents=True, exist_ok=True)
    photos = sample_photos()
    for name, data in photos.items():
        (root / "input" / name).write_bytes(data)

    log("1/5 keygen: an owner identity (restores records) and a runner identity (signs the release)")
    keys = root / "keys"
    keys.mkdir()
    generate_identity(name="owner").save(keys / "owner.key", keys / "owner.pub")
    generate_identity(name="runner").save(keys / "runner.key", keys / "runner.pub")

    log(f"2/5 anonymize {len(photos)} photos with model {model!r} (faces detected)")
    release = root / "release"
    res = run_anonymize(JobOptions(
        source=str(root / "input"), out=str(release), recipients=[str(keys / "owner.pub")],
        signing_key=str(keys / "runner.key"), model=model, steps=steps, inversion_iters=inversion_iters,
        faces="detect", on_no_face="quarantine", batch_size=2, shard_size=100, progress=progress,
        license="other",
    ))
    log(f"    {res.anonymized} anonymized, {res.quarantined} quarantined")

    log("3/5 verify the signed manifest and every file hash")
    rel = open_release(release, load_identity(keys / "runner.key").recipient)  # its envelopes serve step 5
    log(f"    ok: {rel.summary['records']} records, signed by {rel.summary['signer_name']}")

    log("4/5 restore every record with the owner's key")
    restored_dir = root / "restored"
    run_restore(str(release), str(keys / "owner.key"), str(restored_dir), model=model, progress=progress,
                signer_path=str(keys / "runner.pub"))

    log("5/5 grid: original | anonymized | restored | wrong key")
    import pyarrow.parquet as pq

    m = rel.manifest
    owner = load_identity(keys / "owner.key")
    opened = open_records(rel.envelopes, owner, m["dataset_id"])
    anon = Anonymizer.from_pretrained(model, steps=m["settings"]["steps"],
                                      inversion_iters=m["settings"]["inversion_iters"], batch_size=1)
    names = sorted(photos)  # the image folder's order: ids train-000000, train-000001, ...
    pub = {r["record_id"]: r["image"]["bytes"] for s in m["shards"] for r in pq.read_table(release / s["path"]).to_pylist()}
    back = {r["record_id"]: r["image"]["bytes"]
            for p in sorted((restored_dir / "data").glob("*.parquet")) for r in pq.read_table(p).to_pylist()}
    rows, exact = [], True
    for i, name in enumerate(names):
        rid = f"train-{i:06d}"
        original = decode_image(photos[name], name)[0]
        if rid not in pub:
            continue  # quarantined (no face found): listed in the manifest, nothing to show
        anonymized = decode_image(pub[rid], rid)[0]
        restored = decode_image(back[rid], rid)[0]
        exact &= bool(np.array_equal(restored, original))
        key, record = opened[rid]
        wrong = restore_photos(anon, [anonymized], [new_key()], [key_only_record(record)], ids=[rid])[0]
        rows.append([original, anonymized, restored, wrong])
    if not rows:
        raise InputError("no face was found in the sample photos, so there is nothing to show")
    grid = _grid(rows)
    grid_path = root / "demo.png"
    Image.fromarray(grid).save(grid_path)
    log(f"    restored == original (bit-exact): {exact}")
    log(f"done: {grid_path}")
    shutil.rmtree(root / "input", ignore_errors=True)
    return DemoResult(str(root), str(grid_path), len(rows), exact)


def _grid(rows: list[list[np.ndarray]], height: int = 256, pad: int = 4, label: int = 18) -> np.ndarray:
    from PIL import Image, ImageDraw

    tiles = []
    for row in rows:
        t = []
        for a in row:
            w = max(1, round(a.shape[1] * height / a.shape[0]))
            t.append(np.asarray(Image.fromarray(a).resize((w, height), Image.LANCZOS)))
        tiles.append(t)
    widths = [max(r[c].shape[1] for r in tiles) for c in range(len(COLUMNS))]
    W = sum(widths) + pad * (len(widths) + 1)
    H = label + len(tiles) * (height + pad) + pad
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    x = pad
    for c, name in enumerate(COLUMNS):
        draw.text((x + 2, 3), name, fill="black")
        y = label
        for r in tiles:
            canvas.paste(Image.fromarray(r[c]), (x, y))
            y += height + pad
        x += widths[c] + pad
    return np.asarray(canvas)
