"""`anondata restore DIR --identity KEY [--ids ID,... | --ids-file F] [--keys GRANT_DIR] --out OUT`."""

from __future__ import annotations


from ._args import ExamplesFormatter, add_signer, signer


def register(sub) -> None:
    p = sub.add_parser(
        "restore",
        help="bring chosen records of a release back to their original faces",
        description=(
            "Verify the release, open the chosen records' envelopes with your identity and write the "
            "restored records as a dataset in the release's layout (OUT/data/{split}-NNNNN-of-NNNNN.parquet, "
            "loadable with datasets.load_dataset(OUT)). Records your identity has no envelope for, "
            "unknown ids and quarantined records are refused by id. Without --ids, every record your "
            "identity can open is restored. The output holds original faces: keep it private."
        ),
        epilog="""examples:
  anondata restore release --signer runner.pub --identity owner.key --ids rec-17,rec-42 --out restored
  anondata restore release --signer runner.pub --identity auditor.key --keys grant-auditor \\
      --ids rec-17 --out audit
  anondata restore release --signer runner.pub --identity owner.key --ids-file ids.txt --png --out restored
""",
        formatter_class=ExamplesFormatter,
    )
    p.add_argument("dir", metavar="DIR", help="release folder (manifest.json, data/, and keys/ unless --keys)")
    p.add_argument("--identity", required=True, metavar="NAME.key", help="your identity (a recipient of the envelopes)")
    p.add_argument("--ids", default=None, metavar="ID,...", help="comma-separated record ids (default, without --ids-file: every record --identity can open)")
    p.add_argument("--ids-file", default=None, metavar="FILE",
                   help="record ids, one per line, exactly as written (for ids with commas or spaces at either "
                        "end; blank lines and lines starting with # are skipped)")
    p.add_argument("--keys", default=None, metavar="DIR",
                   help="envelopes from a grant folder, or a folder holding a copy of this release's keys/, each file "
                        "checked against its manifest (default: DIR/keys)")
    p.add_argument("--out", required=True, metavar="OUT", help="new folder for the restored records")
    p.add_argument("--png", action="store_true",
                   help="also write loose PNG files OUT/png/{split}/{id}.png (a short hash is added to ids with "
                        "characters unsafe in file names, or that differ from another only in case)")
    p.add_argument("--model", default=None, help="model folder or id if the manifest's name is not loadable here")
    add_signer(p)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: the device the release was anonymized on (lossless restore is exact only there)")
    p.add_argument("--key-only", action="store_true",
                   help="restore from the keys alone, ignoring the lossless residual: close to the originals, not "
                        "bit-exact; for when the lossless check fails because the device or a library version "
                        "differs from the ones that anonymized the release")
    p.add_argument("--batch-size", type=int, default=8, help="records per restore step (default: 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one is drawn only when stderr is a terminal)")
    p.set_defaults(run=run, interrupted="nothing was written to --out")


def run(args) -> int:
    from ..errors import InputError
    from ..job.restore import parse_ids, run_restore

    if args.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    ids = parse_ids(args.ids, args.ids_file)
    signer(args)  # --signer or --any-signer, before any work
    res = run_restore(
        args.dir, args.identity, args.out, ids=ids, keys=args.keys, png=args.png, model=args.model,
        signer_path=args.signer, any_signer=args.any_signer, device=args.device, batch_size=args.batch_size, progress=not args.no_progress,
        key_only=args.key_only,
    )
    how = " from the keys alone (not bit-exact)" if args.key_only else ""
    print(f"{res.out}: {res.restored} records restored{how} into {res.shards} shards (original faces: keep private)")
    return 0
