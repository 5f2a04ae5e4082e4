"""`anondata eval DIR --source SRC [--identity KEY] [--identity-column identity] --report OUT`."""

from __future__ import annotations

import argparse
import textwrap

from ._args import add_signer, number_list, positive, signer

EPILOG = """\
what it measures:
  identity   dlib face-embedding distance original <-> anonymized (share beyond 0.6, dlib's
             same-person threshold); with --identity-column, rank-1 and TAR@FAR=0.1%
             re-identification against a gallery of the other photos of each person
  restore    (--identity) PSNR, SSIM, bit-exact share and identity of the restored faces
  wrong key  (--identity) restores with random keys and keys 1/8/64 bits off; leakage curve:
             identity distance when a share p of the sign flips is guessed right
  utility    face detection rate, 68-point landmark displacement, colour/brightness shift

output (OUT, a new folder; it shows real faces, keep it private):
  report.html  opens offline; metrics.json  every number (schemas/metrics.schema.json);
  distances.png, leakage.png, grid.png (original | anonymized | restored | wrong key)

examples:
  anondata eval release --signer runner.pub --source faces.parquet --report eval-out
  anondata eval release --signer runner.pub --source faces.parquet --identity owner.key --identity-column identity \\
      --limit 50 --restore-sample 20 --attack-sample 8 --report eval-out
"""


_bits = number_list(int, 1, 256, "--wrong-bits is a comma-separated list of bit counts in 1..256, e.g. 1,8,64")
_ps = number_list(float, 0.0, 1.0, "--leakage-p is a comma-separated list of shares in 0..1, e.g. 0.5,0.75,1")


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="measure identity removal, restore fidelity, wrong-key behaviour and utility of a release",
        # filled here: the raw formatter (for the epilog's tables) prints it as one line otherwise
        description=textwrap.fill("Compare a release with its source and write an offline HTML report and "
        "metrics.json: what a data protection officer needs to sign off a release. With --identity, records are "
        "also restored (the keys stay in memory) to measure restore fidelity and wrong-key behaviour.", 90),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", metavar="DIR", help="release folder (manifest.json, data/, and keys/ for --identity)")
    p.add_argument("--source", required=True, metavar="SRC", help="the dataset the release was made from")
    p.add_argument("--report", required=True, metavar="OUT", help="new folder for report.html, metrics.json and figures")
    add_signer(p)
    p.add_argument("--identity", default=None, metavar="NAME.key",
                   help="a recipient's identity: enables restore, wrong-key and leakage measurements")
    p.add_argument("--keys", default=None, metavar="DIR", help="with --identity: envelopes from a grant folder, or a folder holding a copy of this release's keys/ "
                        "(default: DIR/keys)")
    p.add_argument("--identity-column", default=None, metavar="COLUMN",
                   help="source column naming the person: enables re-identification (rank-1, TAR@FAR)")
    p.add_argument("--model", default=None, help="model folder if the manifest's model name is not loadable here")
    p.add_argument("--limit", type=positive, default=None, metavar="N", help="evaluate only the first N records")
    p.add_argument("--restore-sample", type=positive, default=None, metavar="N",
                   help="restore (right key, key only, random wrong key) only the first N evaluated faces (default: all)")
    p.add_argument("--attack-sample", type=positive, default=None, metavar="N",
                   help="faces for the bit-flip and leakage restores (default: all restored faces)")
    p.add_argument("--gallery-limit", type=positive, default=None, metavar="N",
                   help="at most N other source photos in the re-identification gallery (default: all)")
    p.add_argument("--wrong-bits", type=_bits, default=(1, 8, 64), metavar="K,...", help="default: 1,8,64")
    p.add_argument("--leakage-p", type=_ps, default=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0), metavar="P,...",
                   help="default: 0.5,0.6,0.7,0.8,0.9,0.95,1")
    p.add_argument("--grid", type=positive, default=8, metavar="N", help="photos in the sample grid (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the wrong keys and guesses (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one is drawn only when stderr is a terminal)")
    p.set_defaults(run=run, interrupted="nothing was written to --report")


def run(args) -> int:
    from ..errors import InputError
    from ..eval.report import write_report
    from ..eval.run import EvalOptions, evaluate_release
    from ..files import check_new_folder

    check_new_folder(args.report, "--report", InputError, release=args.dir)
    opts = EvalOptions(wrong_bits=args.wrong_bits, leakage_p=args.leakage_p, restore_sample=args.restore_sample,
                       attack_sample=args.attack_sample,
                       grid_sample=args.grid, seed=args.seed, progress=not args.no_progress)
    result = evaluate_release(args.dir, args.source, signer=signer(args), identity_path=args.identity, keys=args.keys,
                              identity_column=args.identity_column, model=args.model, limit=args.limit,
                              gallery_limit=args.gallery_limit, opts=opts)
    files = write_report(result, args.report)
    m = result.metrics
    d = m["identity"]["original_vs_anonymized"]
    line = f"{m['faces']['evaluated']} faces: {100 * d['share_beyond_0_6']:.1f}% beyond 0.6 after anonymization"
    if m["restore"]:
        line += f", restore bit-exact {100 * m['restore']['restored']['bit_exact_share']:.1f}%"
    print(line)
    g = m["info"].get("gallery")
    if g and g["limit"] is not None and g["other_photos"] < g["limit"]:
        print(f"note: the re-identification gallery holds {g['other_photos']} other photos, fewer than --gallery-limit "
              f"{g['limit']}: the source has no more with a person label")
    print(f"report: {files['html']} (shows real faces: keep it private)")
    return 0
