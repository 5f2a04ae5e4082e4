"""`anondata anonymize SRC --out DIR --recipient OWNER.pub --signing-key RUNNER.key`."""

from __future__ import annotations

import argparse
import sys
import textwrap

from ..detect import parse_haar_settings
from ..errors import InputError, shown
from ._args import count, positive

EPILOG = """\
sources:
  a Parquet file, or a folder of them (the Hub layout data/{split}-NNNNN-of-NNNNN.parquet),
  a folder of image files, a datasets save_to_disk folder, or a Hub dataset id (USER/NAME).

output (DIR):
  data/{split}-NNNNN-of-NNNNN.parquet   every input column but --drop-column ones; the image column
                                        anonymized (PNG)
  keys/{split}-NNNNN-of-NNNNN.keys.parquet   record keys sealed to the recipients (private)
  README.md, manifest.json, manifest.json.sig
  Records that cannot be anonymized are quarantined: left out, listed in the manifest.
  Records past --limit are listed in the manifest as skipped.

other columns:
  only --image-column is anonymized; every other column is published as it is. A source with
  another column that can hold pictures (binary data at any depth: a second Image column, raw
  bytes, a list or struct of images; text holding base64 images or data: URLs) is refused until
  each is named: --drop-column NAME leaves it out of the release, --keep-column NAME publishes it
  unchanged (you state it holds no faces).

cluster:
  runs on Ray Data. With RAY_ADDRESS set (e.g. RAY_ADDRESS=auto after `ray start --head`)
  it joins that cluster, one actor per GPU; otherwise it starts Ray on this machine.

examples:
  anondata anonymize faces/ --out release --recipient owner.pub --signing-key runner.key
  anondata anonymize data.parquet --out release --recipient owner.pub --signing-key runner.key \\
      --faces detect --gpus 4 --batch-size 32
  anondata anonymize data.parquet --out release --recipient owner.pub --signing-key runner.key --resume
"""


def _box(text: str) -> tuple[int, int, int, int]:
    try:
        parts = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("--face-box is X0,Y0,X1,Y1 in pixels, e.g. 25,57,153,185") from None
    if len(parts) != 4 or parts[0] >= parts[2] or parts[1] >= parts[3] or min(parts) < 0:
        raise argparse.ArgumentTypeError("--face-box is X0,Y0,X1,Y1 with X0 < X1 and Y0 < Y1, e.g. 25,57,153,185")
    return parts  # type: ignore[return-value]


def register(sub) -> None:
    p = sub.add_parser(
        "anonymize",
        help="anonymize every record of a face dataset into a signed release",
        # filled here: the raw formatter (for the epilog's tables) prints it as one line otherwise
        description=textwrap.fill("Anonymize every record of a face dataset and write a signed release: public "
        "shards with anonymized faces, the record keys sealed to the recipients, a dataset card and a signed "
        "manifest.", 90),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SRC", help="Parquet file/folder, image folder, save_to_disk folder or Hub id")
    p.add_argument("--out", required=True, metavar="DIR", help="release folder (must be new or empty unless --resume)")
    p.add_argument("--recipient", action="append", required=True, metavar="NAME.pub",
                   help="public key that may restore records (repeat for several)")
    p.add_argument("--signing-key", required=True, metavar="NAME.key", help="identity that signs the manifest")
    g = p.add_argument_group("input")
    g.add_argument("--image-column", default="image", help="column with the images (default: image)")
    g.add_argument("--id-column", default=None,
                   help="column with unique record ids (default: record_id when present, else {split}-{row})")
    g.add_argument("--split", default=None, metavar="NAME[,NAME]",
                   help="only these splits; for a source with one unnamed split, its name (default: train)")
    g.add_argument("--limit", type=positive, default=None, metavar="N",
                   help="only the first N records of each split (the manifest lists the rest as skipped)")
    g.add_argument("--drop-column", action="append", default=[], metavar="NAME",
                   help="leave this column out of the release (repeat for several); needed for any other "
                        "column that can hold pictures, which would otherwise be published as it is")
    g.add_argument("--keep-column", action="append", default=[], metavar="NAME",
                   help="publish this column unchanged although it can hold pictures: you state it holds no "
                        "faces (repeat for several)")
    g = p.add_argument_group("anonymization")
    g.add_argument("--model", default="embedded", help="'embedded', a local diffusers folder, or a Hub id (default: embedded)")
    g.add_argument("--steps", type=positive, default=None, help="sampler steps (default: 10)")
    g.add_argument("--inversion-iters", type=count, default=None,
                   help="fixed-point inversion iterations (default 4; on the embedded prior 8 restore a face "
                        "from the key alone at 34.4 dB median against 32.5 (64 CelebA faces; the 35 dB goal is "
                        "not met), at 100 model calls per transform against 60)")
    g.add_argument("--sign-cell", type=count, default=0, metavar="N",
                   help="the key flips one sign per N x N cell of the model's grid, the same in every channel, "
                        "so key-only restore holds up on a sharp prior (CelebA, anondata 0.1.0's embedded prior, face box: "
                        "31.5 dB at 2 against 27.1 per value, both around zero), at a price in identity (dlib: 94%% of faces "
                        "beyond 0.6 at 2, against 100%%). Default 0: a sign per value, which hides most; restore is exact through "
                        "the lossless residual either way (docs/SCHEME.md, 'Sign cells'; docs/EVAL.md)")
    g.add_argument("--background", choices=["noised", "inverted"], default="noised",
                   help="the background's path through the noise levels: noised (scheme v3, the default) or "
                        "inverted (DDIM inversion, schemes v1/v2; only to reproduce an older release: its faces "
                        "come out orange and oversaturated; docs/SCHEME.md, 'The background path')")
    g.add_argument("--flip-centre", choices=["mean-face", "zero"], default="mean-face",
                   help="what the sign flip reflects around (scheme v3): the model's public mean face (the "
                        "default: strangers get skin tones; CelebA, embedded prior: 96-100%% of faces beyond dlib's 0.6, colour "
                        "shift within 3 levels) or zero (grey strangers that hid a little more on 0.1.0's prior: "
                        "100%%, -27 levels of red); "
                        "ignored with --background inverted; docs/SCHEME.md, 'The flip's centre'")
    g.add_argument("--faces", choices=["aligned", "detect"], default="aligned",
                   help="aligned: each image is one aligned face (or --face-box); detect: find faces in photos")
    g.add_argument("--face-box", type=_box, default=None, metavar="X0,Y0,X1,Y1", help="face box for aligned images")
    haar = "OpenCV's {} cascade, minNeighbors {}".format(*parse_haar_settings(None))
    g.add_argument("--detector", choices=["hog", "haar"], default="hog",
                   help=f"face detector for --faces detect: hog (dlib HOG, default) or haar ({haar}: finds smaller "
                        "faces, and more non-faces)")
    g.add_argument("--on-no-face", choices=["quarantine", "keep"], default="quarantine",
                   help="a photo with no detected face: quarantine it (default) or publish it unchanged")
    g.add_argument("--cross-check", choices=["auto", "none", "hog", "haar", "mmod"], default="auto",
                   help="with --faces detect: a second detector; a photo where it finds a face the first missed is "
                        "quarantined, never published (fail closed). auto (default): haar for --detector hog, hog "
                        f"for haar ({haar}). Haar also flags non-faces "
                        "(28%% of wild CelebA photos quarantined, mostly false alarms): review the quarantine. none "
                        "publishes photos with a missed face: unsafe")
    g.add_argument("--lossy-restore", action="store_true",
                   help="omit the lossless residual: smaller keys, restore is close but not bit-exact (a face "
                        "whose key-only restore would be below 30 dB keeps its residual anyway)")
    g.add_argument("--license", default="other", help="licence for the dataset card (default: other)")
    g = p.add_argument_group("execution")
    g.add_argument("--gpus", type=count, default=None, help="GPUs to use, one actor each, never more actors than batches of work (default: all in the cluster)")
    g.add_argument("--workers", type=positive, default=None, help="CPU actors when no GPU is used, never more than batches of work (default: CPUs - 1)")
    g.add_argument("--batch-size", type=positive, default=8, help="records per actor call (default: 8)")
    g.add_argument("--shard-size", type=positive, default=1000, help="records per output shard (default: 1000)")
    g.add_argument("--max-failures-in-a-row", type=count, default=10, metavar="N",
                   help="stop the job when the model step fails on N records in a row on one worker with an "
                        "error that is not the record's (a CUDA error, a crash): the device or installation is "
                        "broken, and those records are left unwritten for --resume instead of quarantined "
                        "(default: 10; 0: never stop, quarantine them)")
    g.add_argument("--resume", action="store_true",
                   help="finish an interrupted job in DIR (same SRC, --recipient and --signing-key; the other "
                        "output options are taken from the job's plan, and one given that differs from it is "
                        "refused); finished shards are kept")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (one is drawn only when stderr is a terminal)")
    p.set_defaults(run=run, interrupted="finished shards are kept: run the same command with --resume to finish the job")
    _PARSER.append(p)


_PARSER: list = []  # the subcommand's parser, for _given


def _given(args) -> frozenset:
    """The JobOptions fields named on the command line: --resume refuses those that differ from
    the plan. argparse cannot tell an option given with its default value from one left out, so
    parse what was typed again into a namespace where every option is None (argparse then applies
    no default): what is no longer None was typed, matched (abbreviations, --flag=value) by
    argparse itself. No option's value parses to None."""
    from dataclasses import fields

    from ..job.options import IRREGULAR_FLAGS, JobOptions

    argv = getattr(args, "argv", None)
    if not _PARSER or not argv or args.command not in argv:
        return frozenset()
    blank = argparse.Namespace(**{k: None for k in vars(args) if k not in ("command", "run", "argv")})
    typed, _ = _PARSER[0].parse_known_args(argv[argv.index(args.command) + 1:], blank)
    field_of = {flag[2:].replace("-", "_"): name for name, flag in IRREGULAR_FLAGS.items()}  # dest -> field
    out = {field_of.get(k, k) for k, v in vars(typed).items() if v is not None}
    return frozenset(out & {f.name for f in fields(JobOptions)})


def run(args) -> int:
    from ..job.pipeline import JobOptions, run_anonymize

    splits = [s.strip() for s in args.split.split(",")] if args.split else None
    if splits is not None and not all(splits):
        raise InputError("--split: empty split name")
    opts = JobOptions(
        source=args.source, out=args.out, recipients=args.recipient, signing_key=args.signing_key,
        image_column=args.image_column, id_column=args.id_column, splits=splits, limit=args.limit,
        drop_columns=args.drop_column, keep_columns=args.keep_column,
        model=args.model, steps=args.steps, inversion_iters=args.inversion_iters,
        sign_cell=args.sign_cell, background=args.background, flip_centre=args.flip_centre, faces=args.faces,
        face_box=args.face_box, detector=args.detector, on_no_face=args.on_no_face,
        cross_check=args.cross_check,
        lossless=not args.lossy_restore, gpus=args.gpus, workers=args.workers, batch_size=args.batch_size,
        shard_size=args.shard_size, max_failures_in_a_row=args.max_failures_in_a_row, resume=args.resume,
        license=args.license, progress=not args.no_progress, given=_given(args),
    )
    res = run_anonymize(opts)
    print(
        f"{res.out}: {res.anonymized} records anonymized, {res.quarantined} quarantined, "
        f"{res.shards} shards" + (f" ({res.resumed_shards} kept from the interrupted run)" if res.resumed_shards else "")
        + (f", {res.skipped} skipped (past --limit)" if res.skipped else ""),
        file=sys.stdout,
    )
    if res.quarantined:
        print(f"quarantined ({res.quarantined}; the reasons are also in {res.out}/manifest.json, records with status "
              "quarantined):", file=sys.stderr)
        for rid, reason, where in res.quarantine[:SHOW_QUARANTINED]:
            print(shown(f"  {where}: {reason}" if where else f"  {reason}"), file=sys.stderr)
        if res.quarantined > SHOW_QUARANTINED:
            print(f"  … and {res.quarantined - SHOW_QUARANTINED} more (manifest.json)", file=sys.stderr)
    return 0


SHOW_QUARANTINED = 20  # on the terminal; the manifest lists every one
