"""Restore fidelity through uint8 storage: a table over steps x inversion iterations.

For each setting: median and worst restore PSNR (key-only, from the stored uint8 image),
median wrong-key PSNR, restore-record bytes (key-only and lossless) against the original's PNG
bytes, and seconds per image for anonymize + restore on this machine.

Faces: aligned CelebA crops from ../shared/data/celeba-ids-dev.parquet when present
(crop (25,57,153,185), resized to the model's resolution), else the public-domain sample images.

    python benchmarks/restore_fidelity.py --model embedded --n 16 --grid 10x0,10x4,20x4,20x8
    python benchmarks/restore_fidelity.py --model tiny       # the 32px test model
    python benchmarks/restore_fidelity.py --sign-cell 2      # one sign per 2x2 cell
    python benchmarks/restore_fidelity.py --mask ellipse --background inverted   # a face ellipse, v1's path

--mask full (the default) anonymizes the whole crop, which has no background, so the background
path does not matter there; --mask ellipse is the face ellipse the job uses on aligned crops.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from anondata import Anonymizer
from anondata.anonymizer import RESTORE_FLOOR_DB, masked_psnr
from anondata.faces import aligned_mask
from anondata.testing import TINY32_DIR, sample_images

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "celeba-ids-dev.parquet"


def faces(resolution: int, n: int, path: Path = SHARED) -> tuple[np.ndarray, str]:
    if path.is_file():
        import pyarrow.parquet as pq

        rows = pq.read_table(path, columns=["image"]).slice(0, n).column("image").to_pylist()
        imgs = [Image.open(io.BytesIO(r["bytes"])).convert("RGB").crop((25, 57, 153, 185)) for r in rows]
        src = f"{path.stem} (first {len(imgs)})"
    else:
        imgs = [Image.fromarray(im) for im in sample_images()][:n]
        src = "sample images"
    arr = np.stack([np.asarray(im.resize((resolution, resolution), Image.BICUBIC)) for im in imgs])
    return arr, src


def psnr(a: np.ndarray, b: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per image, over its mask (outside it restore is exact by construction)."""
    return np.array([masked_psnr(x, y, m) for x, y, m in zip(a, b, masks)])


def png_bytes(img: np.ndarray) -> int:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=True)
    return buf.tell()


def median_interval(values, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the median: how far a median over this many faces can be trusted
    (16 faces moved it 1-2 dB between neighbouring settings)."""
    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    medians = [np.median(rng.choice(v, len(v))) for _ in range(resamples)]
    return tuple(float(q) for q in np.percentile(medians, [2.5, 97.5]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="embedded | tiny | a model folder")
    p.add_argument("--n", type=int, default=8, help="faces")
    p.add_argument("--grid", default="10x0,10x4,20x0,20x4,20x8", help="STEPSxITERS,...")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (TF32 off, so float32 means float32)")
    p.add_argument("--faces", type=Path, default=SHARED, help="Parquet of aligned CelebA photos (column image)")
    p.add_argument("--sign-cell", type=int, default=None, help="sign cell: 0 = a sign per value (the default), N >= 1 = cells of N")
    p.add_argument("--background", choices=["noised", "inverted"], default="noised",
                   help="background path: noised (scheme v3, the default) or inverted (v1/v2)")
    p.add_argument("--mask", choices=["full", "ellipse"], default="full",
                   help="full crop (no background) or the job's aligned face ellipse; PSNR is over the mask")
    p.add_argument("--seed", type=int, default=0,
                   help="record and wrong keys (fixed, so settings and snapshots compare on the same keys; "
                        "key-only restore varies by a few dB from key to key)")
    p.add_argument("--json", help="write the rows here too")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model = str(TINY32_DIR) if a.model == "tiny" else a.model
    rows = []
    x = None
    print(f"model={a.model} dtype={a.dtype} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"sign_cell={'default' if a.sign_cell is None else a.sign_cell} background={a.background} mask={a.mask}")
    print("| steps | iters | restore dB median | restore dB min | wrong-key dB median | record B (key-only) | record B (lossless) | PNG B | s/img anonymize+restore |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cell in a.grid.split(","):
        steps, iters = (int(v) for v in cell.split("x"))
        anon = Anonymizer.from_pretrained(model, steps=steps, inversion_iters=iters, dtype=a.dtype,
                                          device=a.device, sign_cell=a.sign_cell, background=a.background)
        if x is None:
            x, src = faces(anon.resolution, a.n, a.faces)
            print(f"faces: {len(x)} from {src}, {anon.resolution}px")
            masks = np.broadcast_to(aligned_mask(anon.resolution) if a.mask == "ellipse"
                                    else np.ones((anon.resolution,) * 2, bool), (len(x),) + (anon.resolution,) * 2)
        rng = np.random.default_rng(a.seed)
        keys = [rng.bytes(32) for _ in x]
        wrong_keys = [rng.bytes(32) for _ in x]
        t0 = time.perf_counter()
        y, recs = anon.anonymize(x, keys, masks)
        restored = anon.restore(y, keys, recs)
        secs = (time.perf_counter() - t0) / len(x)
        wrong = anon.restore(y, wrong_keys, recs)
        _, lrecs = anon.anonymize(x, keys, masks, lossless=True)
        each = psnr(restored, x, masks)
        row = {
            "steps": steps, "iters": iters,
            "restore_db_median": float(np.median(each)), "restore_db_min": float(each.min()),
            "restore_db_each": [round(float(v), 2) for v in each],
            "wrong_db_median": float(np.median(psnr(wrong, x, masks))),
            "record_bytes": float(np.mean([len(r.to_bytes()) for r in recs])),
            "record_bytes_lossless": float(np.mean([len(r.to_bytes()) for r in lrecs])),
            "png_bytes": float(np.mean([png_bytes(im) for im in x])),
            "seconds_per_image": secs,
        }
        rows.append(row)
        print("| {steps} | {iters} | {restore_db_median:.1f} | {restore_db_min:.1f} | {wrong_db_median:.1f} | "
              "{record_bytes:.0f} | {record_bytes_lossless:.0f} | {png_bytes:.0f} | {seconds_per_image:.2f} |".format(**row))
        sys.stdout.flush()
    for row in rows:
        low = sum(v < RESTORE_FLOOR_DB for v in row["restore_db_each"])
        lo, hi = median_interval(row["restore_db_each"])
        print(f"{row['steps']}x{row['iters']}: {low} of {len(x)} faces restore below {RESTORE_FLOOR_DB:g} dB "
              "(with --lossy-restore they keep the residual); "
              f"95% bootstrap interval of the median {lo:.1f}-{hi:.1f} dB")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "sign_cell": anon.sign_cell, "background": a.background,
                                              "mask": a.mask, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
