"""`anondata grant`: share the keys of chosen records with another key holder."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "grant",
        help="re-seal chosen records' keys to another public key (writes a grant folder)",
        description=(
            "Open the envelopes of the chosen records with your identity and seal them again to "
            "the --to keys, into a new GRANT_DIR (grant.keys.parquet + grant.json signed by your "
            "identity). The holder of the --to key can then restore exactly those records with "
            "`anondata restore DIR --identity THEIR.key --keys GRANT_DIR`, and nothing else. "
            "The release itself is verified first and not changed."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", metavar="DIR", help="release folder (manifest.json and keys/)")
    p.add_argument("--identity", required=True, metavar="OWNER.key", help="your identity file")
    p.add_argument("--to", required=True, action="append", metavar="OTHER.pub", help="recipient public key (repeatable)")
    p.add_argument("--ids", metavar="ID,...", help="comma-separated record ids to share")
    p.add_argument("--ids-file", metavar="FILE", help="file with one record id per line (for ids with commas)")
    p.add_argument("--out", required=True, metavar="GRANT_DIR", help="new folder to write (must not exist or be empty)")
    p.add_argument("--signer", metavar="NAME.pub", help="require the release manifest to be signed by this key")
    p.set_defaults(run=run)


def parse_ids(args) -> list[str]:
    from ..errors import InputError

    ids: list[str] = []
    if args.ids:
        ids += [i for i in args.ids.split(",") if i]
    if args.ids_file:
        try:
            with open(args.ids_file, encoding="utf-8") as f:
                ids += [line.rstrip("\r\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--ids-file {args.ids_file}: cannot read ({e})") from None
    if not ids:
        raise InputError("no record ids: pass --ids ID,... or --ids-file FILE")
    return list(dict.fromkeys(ids))


def run(args) -> int:
    from ..envelope import grant_records
    from ..identity import load_identity, load_recipient
    from ..manifest import load_envelopes, read_manifest, verify_release, write_grant

    ident = load_identity(args.identity)
    to = [load_recipient(p) for p in args.to]
    signer = load_recipient(args.signer) if args.signer else None
    ids = parse_ids(args)
    summary = verify_release(args.dir, signer)
    m = read_manifest(args.dir)
    tables = load_envelopes(args.dir, signer)
    table = grant_records(tables, ident, to, m["dataset_id"], ids)
    write_grant(args.out, table, ident, to, m["dataset_id"], summary["manifest_sha256"])
    names = ", ".join(r.label for r in to)
    print(f"granted {table.num_rows} records to {names}: {args.out}")
    return 0
