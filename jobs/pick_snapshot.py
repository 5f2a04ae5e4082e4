"""Pick the prior snapshot to ship: the latest whose key-only restore still passes the bar.

On 9,723 training faces a sharper prior restores worse (benchmarks/README.md, "Prior sharpness
against restore"): the last snapshot is not the best one to ship. This runs
benchmarks/restore_fidelity.py on every snapshot of a training run, prints the table, and tars
the latest snapshot whose median restore PSNR reaches --min-db and whose worst face reaches
--floor-db (and none if no snapshot does, exit status 1): a sharper snapshot first fails on a
few faces (step 4,056 of the CPU run: median 35.8 dB, worst 12.4), so the median alone is not
enough. The worst of n faces falls as n grows (shipped prior: 26.5 dB on 16 faces, 19-21 on 64),
so compare snapshots at the same --n. Face rate and colour are measured afterwards with benchmarks/prior_quality.py.

Restore is measured over the face ellipse the job uses on aligned crops (--mask ellipse), what a
release gets under the default scheme (v3, whose background path matters there); --mask full is
the whole crop, as the rule was first calibrated. Over the ellipse, with the defaults: step
3,177 of the CPU run 33.7 / 30.2 dB (median / worst of 16; flip around zero), 0.1.0's step 14,294
26.1 / 23.1, the shipped v-prediction step 17,173 32.7 / 26.3: none passes 35 / 25
(benchmarks/README.md).

    python jobs/pick_snapshot.py --run /tmp/prior --faces .gpu/faces16.parquet --device cuda --tar $OUT/prior.tar
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

import restore_fidelity  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="train_prior.py run folder (holds snapshots/)")
    p.add_argument("--faces", type=Path, default=restore_fidelity.SHARED, help="aligned CelebA Parquet")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--grid", default="10x4", help="the shipped sampler, STEPSxITERS")
    p.add_argument("--device", default="cpu")
    p.add_argument("--min-db", type=float, default=35.0, help="median key-only restore PSNR to pass")
    p.add_argument("--floor-db", type=float, default=25.0, help="worst face's restore PSNR to pass")
    p.add_argument("--mask", choices=["ellipse", "full"], default="ellipse",
                   help="restore over the job's face ellipse (default) or the whole crop")
    p.add_argument("--tar", type=Path, help="write the picked snapshot folder here as a tar")
    a = p.parse_args(argv)
    snaps = sorted(d for d in (a.run / "snapshots").glob("step-*") if d.is_dir())
    if not snaps:
        sys.exit(f"no snapshots under {a.run / 'snapshots'}: run jobs/train_prior.py first")
    results = {}

    def passes(row: dict) -> bool:
        return row["restore_db_median"] >= a.min_db and row["restore_db_min"] >= a.floor_db

    with tempfile.TemporaryDirectory() as tmp:
        for snap in snaps:
            out = Path(tmp) / f"{snap.name}.json"
            restore_fidelity.main(["--model", str(snap), "--n", str(a.n), "--grid", a.grid, "--device", a.device,
                                   "--faces", str(a.faces), "--mask", a.mask, "--json", str(out)])
            results[snap.name] = json.loads(out.read_text())["rows"][0]
    print("| snapshot | restore dB median | restore dB min | passes |")
    print("|---|---|---|---|")
    for name, r in results.items():
        ok = passes(r)
        print(f"| {name} | {r['restore_db_median']:.1f} | {r['restore_db_min']:.1f} | {'yes' if ok else 'no'} |")
    passing = [s for s in snaps if passes(results[s.name])]
    if not passing:
        print(f"no snapshot restores at >= {a.min_db} dB median and >= {a.floor_db} dB worst: nothing to ship")
        return 1
    pick = passing[-1]
    print(f"picked {pick.name}")
    if a.tar:
        with tarfile.open(a.tar, "w") as tar:
            tar.add(pick, arcname=pick.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
