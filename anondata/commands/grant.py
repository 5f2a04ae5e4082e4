"""`anondata grant`: share the keys of chosen records with another key holder."""

from __future__ import annotations

from ._args import ExamplesFormatter, add_signer, signer


def register(sub) -> None:
    p = sub.add_parser(
        "grant",
        help="re-seal chosen records' keys to another public key (writes a grant folder)",
        description=(
            "Open the envelopes of the chosen records with your identity and seal them again to "
            "the --to keys, into a new GRANT_DIR (grant.keys.parquet + grant.json signed by your "
            "identity, which must be a recipient of the release: readers accept a grant only from one). "
            "The holder of the --to key can then restore exactly those records with "
            "`anondata restore DIR --signer RUNNER.pub --identity THEIR.key --keys GRANT_DIR`, and "
            "nothing else. The release itself is verified first and not changed."
        ),
        epilog="""examples:
  anondata grant release --signer runner.pub --identity owner.key --to auditor.pub \\
      --ids rec-17 --out grant-auditor
  anondata grant release --signer runner.pub --identity owner.key --to auditor.pub \\
      --ids-file ids.txt --out grant-auditor
""",
        formatter_class=ExamplesFormatter,
    )
    p.add_argument("dir", metavar="DIR", help="release folder (manifest.json and keys/)")
    p.add_argument("--identity", required=True, metavar="OWNER.key", help="your identity file")
    p.add_argument("--to", required=True, action="append", metavar="OTHER.pub", help="recipient public key (repeatable)")
    p.add_argument("--ids", metavar="ID,...", help="comma-separated record ids to share (this or --ids-file is required)")
    p.add_argument("--ids-file", metavar="FILE",
                   help="record ids, one per line, exactly as written (for ids with commas or spaces at either "
                        "end; blank lines and lines starting with # are skipped)")
    p.add_argument("--out", required=True, metavar="GRANT_DIR", help="new folder to write (must not exist or be empty)")
    add_signer(p)
    p.set_defaults(run=run, interrupted="nothing was written to --out")


def run(args) -> int:
    from ..envelope import grant_records
    from ..identity import load_identity, load_recipient
    from ..errors import InputError, shown
    from ..job.restore import check_ids, parse_ids
    from ..manifest import open_release, release_envelopes, write_grant

    from ..files import check_new_folder

    check_new_folder(args.out, "--out", InputError, release=args.dir)
    ident = load_identity(args.identity)
    to = [load_recipient(p) for p in args.to]
    pinned = signer(args)
    ids = parse_ids(args.ids, args.ids_file)  # the same rules as restore's --ids / --ids-file
    if ids is None:
        raise InputError("no record ids: pass --ids ID,... or --ids-file FILE")
    rel = open_release(args.dir, pinned)
    m = rel.manifest
    check_ids(m, ids)
    table = grant_records(release_envelopes(rel), ident, to, m["dataset_id"], ids)
    write_grant(args.out, table, ident, to, m["dataset_id"], rel.summary["manifest_sha256"])
    names = shown(", ".join(r.label for r in to))
    print(f"granted {table.num_rows} records to {names}: {args.out}")
    return 0
