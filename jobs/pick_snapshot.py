"""Pick the prior snapshot to ship: one that makes faces, and of those the one that restores best.

A prior's first job is the stranger it generates; key-only restore (from the key and the
published image alone) is its second, and on 9,723 training faces the two pull apart: a sharper
prior makes more faces and restores worse (benchmarks/README.md, "Prior sharpness against
restore"). So the last snapshot is not always the one to ship. For every snapshot of a training
run this measures both:

- faces: share of --quality-n samples (20 DDIM steps, seed 0) in which an offline detector finds a
  face (benchmarks/prior_quality.py); a snapshot below --min-faces (issue 5's 90%) is never shipped.
- restore: key-only restore PSNR through uint8 on --n aligned CelebA faces over the job's face
  ellipse (benchmarks/restore_fidelity.py), median and worst face.

and tars the latest snapshot that reaches --min-faces and also restores at >= --min-db median and
>= --floor-db on its worst face. When none restores that well, it tars the one that reaches
--min-faces with the best median restore, and says so: releases restore through the lossless
residual (exact at any sharpness), and `--lossy-restore` keeps the residual for a face below
30 dB, so restore is then a cost (larger records), not a loss. When no snapshot makes faces,
nothing is tarred (exit status 1). On the CPU v-prediction run (snapshots 14,965, 16,049 and
17,173; 2026-11-28) all three make faces (100 / 100 / 98.4%), none restores at 35 / 25 (30.8 /
24.4, 33.5 / 25.4, 32.8 / 26.2 dB, median / worst of 16), and it picks 16,049, the prior shipped
since 0.3.0 (0.2.0 shipped 17,173, chosen before the rule weighed faces; model card). 0.1.0's step 14,294
made 79.7% faces and step 3,177 of the epsilon run 54.7%: neither would be picked. The worst of n faces falls as n grows (step 3,177 over the whole crop: 26.5 dB
of 16 faces, 19-21 of 64), so compare snapshots at the same --n.

    python jobs/pick_snapshot.py --run /tmp/prior --faces .gpu/faces16.parquet --device cuda \
        --detectors hog --tar $OUT/prior.tar
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import prior_quality  # noqa: E402
import restore_fidelity  # noqa: E402


def measure(snap: Path, a) -> dict:
    """Face rate and key-only restore of one snapshot."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "restore.json"
        restore_fidelity.main(["--model", str(snap), "--n", str(a.n), "--grid", a.grid, "--device", a.device,
                               "--faces", str(a.faces), "--mask", a.mask, "--json", str(out)])
        row = json.loads(out.read_text())["rows"][0]
    samples, _ = prior_quality.sample(str(snap), a.quality_n, 20, 0, 16, device=a.device)
    row["faces"] = prior_quality.detect_rates(samples, detectors=tuple(a.detectors.split(",")))["either"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="train_prior.py run folder (holds snapshots/)")
    p.add_argument("--faces", type=Path, default=restore_fidelity.SHARED, help="aligned CelebA Parquet")
    p.add_argument("--n", type=int, default=16, help="faces to restore")
    p.add_argument("--grid", default="10x4", help="the shipped sampler, STEPSxITERS")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quality-n", type=int, default=64, help="samples for the face rate")
    p.add_argument("--detectors", default="hog,haar",
                   help="face detectors for the face rate: hog (dlib), haar (OpenCV), or both (a face by either counts)")
    p.add_argument("--min-faces", type=float, default=0.90, help="share of samples with a face, to be shipped at all")
    p.add_argument("--min-db", type=float, default=35.0, help="median key-only restore PSNR to pass")
    p.add_argument("--floor-db", type=float, default=25.0, help="worst face's restore PSNR to pass")
    p.add_argument("--mask", choices=["ellipse", "full"], default="ellipse",
                   help="restore over the job's face ellipse (default) or the whole crop")
    p.add_argument("--tar", type=Path, help="write the picked snapshot folder here as a tar")
    a = p.parse_args(argv)
    snaps = sorted(d for d in (a.run / "snapshots").glob("step-*") if d.is_dir())
    if not snaps:
        sys.exit(f"no snapshots under {a.run / 'snapshots'}: run jobs/train_prior.py first")
    results = {s.name: measure(s, a) for s in snaps}

    def makes_faces(r: dict) -> bool:
        return r["faces"] >= a.min_faces

    def restores(r: dict) -> bool:
        return r["restore_db_median"] >= a.min_db and r["restore_db_min"] >= a.floor_db

    print("| snapshot | faces | restore dB median | restore dB min | makes faces | restores |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['faces']:.1%} | {r['restore_db_median']:.1f} | {r['restore_db_min']:.1f} | "
              f"{'yes' if makes_faces(r) else 'no'} | {'yes' if restores(r) else 'no'} |")
    faces = [s for s in snaps if makes_faces(results[s.name])]
    if not faces:
        print(f"no snapshot finds a face in >= {a.min_faces:.0%} of its samples: nothing to ship")
        return 1
    both = [s for s in faces if restores(results[s.name])]
    if both:
        pick = both[-1]
        print(f"picked {pick.name}: makes faces and restores")
    else:
        pick = max(reversed(faces), key=lambda s: results[s.name]["restore_db_median"])  # ties: the later
        print(f"picked {pick.name}: makes faces; none of those restores at >= {a.min_db:g} dB median and "
              f">= {a.floor_db:g} dB worst, this one best (releases restore through the lossless residual)")
    if a.tar:  # under a temporary name: a timeout while writing must not leave half a prior.tar
        part = a.tar.with_name(a.tar.name + ".part")
        with tarfile.open(part, "w") as tar:
            tar.add(pick, arcname=pick.name)
        part.replace(a.tar)
    return 0


if __name__ == "__main__":
    sys.exit(main())
