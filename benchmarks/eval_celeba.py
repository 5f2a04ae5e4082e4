"""The CelebA evaluation behind docs/EVAL.md: anonymize a subset with the job, then `anondata eval`.

Everything it writes (the subset, the keys, the release, the report with its face grids) goes
under --work (default runs/eval, which git ignores): CelebA is research-only and its faces never
enter the repo.

    python benchmarks/eval_celeba.py --work runs/eval --identities 10 --per-identity 5 \\
        --restore-sample 20 --attack-sample 6 --gallery-limit 1200

Steps (each skipped when its output exists, so an interrupted run continues):
1. WORK/subset.parquet: the first --per-identity photos of the --identities lowest identity numbers
   of ../shared/data/celeba-ids-dev.parquet (aligned 178x218 JPEGs).
2. WORK/model: a copy of --model (the embedded prior is being retrained; the release binds the
   weights' sha256, so restore must find the same ones later).
3. WORK/owner.key/.pub, WORK/release: `anondata anonymize --face-box 25,57,153,185` (the CelebA
   128 px framing), lossless.
4. WORK/report-N: `anondata eval` against the full celeba-ids-dev.parquet (the gallery is the other
   photos), with the owner key; prints the headline numbers.

With --runs N (N > 1) steps 3-4 run N times, each a key draw of its own in WORK/draw-K (new owner
key, new release of the same subset, so new random record keys), and WORK/spread.json gives the
mean, min and max of the key-dependent numbers over the draws. Why: on 50 faces which stranger
each key draws moves the shares by a face or two (2% each), so one release's number is one draw,
not the method's figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "celeba-ids-dev.parquet"


def run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    print("$", " ".join(cmd), flush=True)
    with open(log, "a") as fh:
        p = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if p.returncode:
        sys.exit(f"failed ({p.returncode}); see {log}")


def subset(src: Path, out: Path, identities: int, per_identity: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(src)
    ids = t.column("identity").to_pylist()
    chosen = sorted(set(ids))[:identities]
    rows = [i for who in chosen for i in [k for k, v in enumerate(ids) if v == who][:per_identity]]
    pq.write_table(t.take(pa.array(rows)), out)
    print(f"{out}: {len(rows)} photos of {len(chosen)} people")


def headline(m: dict) -> dict:
    reid = m["identity"]["reidentification"] or {}
    out = {
        "faces": m["faces"]["evaluated"],
        "people": m["faces"]["identities"],
        "restored_faces": m["faces"]["restore_sample"],
        "attack_faces": m["faces"]["attack_sample"],
        "distance_anonymized_mean": m["identity"]["original_vs_anonymized"]["mean"],
        "share_beyond_0_6_anonymized": m["identity"]["original_vs_anonymized"]["share_beyond_0_6"],
        "reid": {k: {"rank1": v["rank1"], "tar_at_far_0_1pct": v["tar_at_far"]} for k, v in reid.items()},
        "utility": {k: m["utility"][k] for k in ("detection_rate_original", "detection_rate_anonymized")},
        "landmark_displacement_mean": m["utility"]["landmark_displacement"]["mean"],
        "colour_shift_mean": m["utility"]["colour_shift_mean"],
        "seconds": m["timing"]["seconds"],
    }
    if m["restore"]:
        r = m["restore"]
        out["restore"] = {k: {"bit_exact": r[k]["bit_exact_share"], "psnr_face_mean": r[k]["psnr_face"]["mean"],
                              "ssim_face_mean": r[k]["ssim_face"]["mean"],
                              "distance_mean": r[k]["identity_distance"]["mean"]} for k in ("restored", "key_only")}
        w = m["wrong_key"]
        out["wrong_key"] = {"random": w["random"]["identity_distance"]["share_beyond_0_6"],
                            **{f"bits_{b['bits']}": b["identity_distance"]["share_beyond_0_6"] for b in w["bits"]}}
        out["leakage"] = {f"{x['p']:g}": [x["identity_distance"]["mean"], x["identity_distance"]["share_beyond_0_6"]]
                          for x in m["leakage"]}
    return out


# The headline numbers that depend on the record keys (anonymized and wrong-key faces, the
# restores of a sample, the leakage guesses): the ones --runs reports a spread for.
KEYED = {
    "share_beyond_0_6_anonymized": ("share_beyond_0_6_anonymized",),
    "distance_anonymized_mean": ("distance_anonymized_mean",),
    "rank1_anonymized": ("reid", "anonymized", "rank1"),
    "tar_at_far_0_1pct_anonymized": ("reid", "anonymized", "tar_at_far_0_1pct"),
    "detection_rate_anonymized": ("utility", "detection_rate_anonymized"),
    "landmark_displacement_mean": ("landmark_displacement_mean",),
    "colour_shift_red": ("colour_shift_mean", "r"),
    "colour_shift_luma": ("colour_shift_mean", "luma"),
    "key_only_psnr_face_mean": ("restore", "key_only", "psnr_face_mean"),
    "restore_bit_exact": ("restore", "restored", "bit_exact"),
    "wrong_key_random_beyond_0_6": ("wrong_key", "random"),
}


def spread(heads: list[dict]) -> dict:
    """Mean, min and max of each KEYED number over runs (one headline() each), with the values in
    run order; a number missing or null in a run is left out and `runs` says how many had it."""
    out = {}
    for name, path in KEYED.items():
        vals = []
        for h in heads:
            v = h
            for k in path:
                v = v.get(k) if isinstance(v, dict) else None
            if isinstance(v, (int, float)):
                vals.append(float(v))
        out[name] = ({"runs": len(vals), "mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals),
                      "values": vals} if vals else {"runs": 0, "mean": None, "min": None, "max": None, "values": []})
    return out


def release_and_eval(a, work: Path, draw: Path, src: Path, log: Path) -> dict:
    """Steps 3-4 in `draw` (keys, release, report) on WORK's subset and model copy."""
    py = [sys.executable, "-m", "anondata.cli"]
    draw.mkdir(parents=True, exist_ok=True)
    if not (draw / "owner.key").exists():
        run(py + ["keygen", str(draw / "owner")], log)
    if not (draw / "release" / "manifest.json").exists():
        resume = ["--resume"] if (draw / "release").exists() else []
        run(py + ["anonymize", str(work / "subset.parquet"), "--out", str(draw / "release"),
                  "--recipient", str(draw / "owner.pub"), "--signing-key", str(draw / "owner.key"),
                  "--face-box", "25,57,153,185", "--model", str(work / "model"), "--workers", "1",
                  "--batch-size", "4", "--shard-size", "50", *resume,
                  *([] if a.sign_cell is None else ["--sign-cell", str(a.sign_cell)]),
                  *([] if a.background is None else ["--background", a.background]),
                  *([] if a.flip_centre is None else ["--flip-centre", a.flip_centre])], log)
    report = Path(a.report) if a.report else next(draw / f"report-{i}" for i in range(1, 1000)
                                                    if not (draw / f"report-{i}").exists())
    run(py + ["eval", str(draw / "release"), "--signer", str(draw / "owner.pub"), "--source", str(src),
              "--identity", str(draw / "owner.key"),
              "--identity-column", "identity", "--model", str(work / "model"),
              "--restore-sample", str(a.restore_sample), "--attack-sample", str(a.attack_sample),
              "--gallery-limit", str(a.gallery_limit), "--report", str(report)], log)
    return headline(json.loads((report / "metrics.json").read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "eval"),
                    help="output folder; it holds real faces, keep it private (default: runs/eval in the checkout, "
                         "git-ignored)")
    ap.add_argument("--source", default=str(DATA))
    ap.add_argument("--model", default=str(ROOT / "anondata" / "models" / "embedded"))
    ap.add_argument("--identities", type=int, default=10)
    ap.add_argument("--per-identity", type=int, default=5)
    ap.add_argument("--restore-sample", type=int, default=20)
    ap.add_argument("--attack-sample", type=int, default=6)
    ap.add_argument("--gallery-limit", type=int, default=1200)
    ap.add_argument("--report", default=None, help="report folder (default WORK/report-N, a new N)")
    ap.add_argument("--sign-cell", type=int, default=None, help="anonymize --sign-cell (default: the job's)")
    ap.add_argument("--background", choices=["noised", "inverted"], default=None,
                    help="anonymize --background (default: the job's)")
    ap.add_argument("--flip-centre", choices=["mean-face", "zero"], default=None,
                    help="anonymize --flip-centre (default: the job's)")
    ap.add_argument("--runs", type=int, default=1,
                    help="key draws: N > 1 releases and evaluates the subset N times, each with new keys in "
                         "WORK/draw-K, and writes the spread of the key-dependent numbers to WORK/spread.json")
    a = ap.parse_args()
    if a.runs < 1:
        sys.exit("--runs must be at least 1")
    if a.runs > 1 and a.report:
        sys.exit("--report names one folder; with --runs each draw writes its own (WORK/draw-K/report-N)")
    src = Path(a.source)
    if not src.is_file():
        sys.exit(f"{src} is not here (CelebA dev data): nothing to evaluate")
    work = Path(a.work)
    if work.resolve().is_relative_to(ROOT):
        sys.exit("--work must be outside the repository: the report shows CelebA faces")
    work.mkdir(parents=True, exist_ok=True)
    log = work / "eval_celeba.log"
    if not (work / "subset.parquet").exists():
        subset(src, work / "subset.parquet", a.identities, a.per_identity)
    if not (work / "model").exists():
        shutil.copytree(a.model, work / "model")
    if a.runs == 1:
        print(json.dumps(release_and_eval(a, work, work, src, log), indent=1))
        return
    heads = []
    for k in range(1, a.runs + 1):
        heads.append(release_and_eval(a, work, work / f"draw-{k}", src, log))
        print(f"draw {k}:", json.dumps(heads[-1]), flush=True)
    out = {"runs": a.runs, "faces": heads[0]["faces"], "spread": spread(heads)}
    (work / "spread.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))

if __name__ == "__main__":
    main()
