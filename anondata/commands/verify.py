"""`anondata verify DIR`: check a release's signature, hashes, row counts and schemas; print which
release it is (dataset id, manifest hash)."""

from __future__ import annotations

from ._args import ExamplesFormatter


def register(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="check a release: signature, file hashes, row counts, schemas",
        description=(
            "Check DIR/manifest.json's Ed25519 signature, then every shard and envelope file's "
            "size, SHA-256 and row count, the envelope tables' schema, that every envelope is sealed "
            "to exactly the manifest's recipients, and that every input record is accounted for. Without --signer the key named inside the manifest is used, which "
            "only proves the release is intact: pass the publisher's NAME.pub (obtained "
            "separately) to prove who made it. A public copy without keys/ is verified without "
            "its envelopes. On success a second line names the dataset id and manifest.json's SHA-256: "
            "the signature proves who signed, not which of their releases this is (an older one verifies "
            "too), so pin the hash to tell them apart. Exits 2 naming the first failure."
        ),
        epilog="""examples:
  anondata verify release --signer runner.pub   # made by runner (a copy of runner.pub you trust)
  anondata verify release                       # only intact: checked against the key it names
""",
        formatter_class=ExamplesFormatter,
    )
    p.add_argument("dir", metavar="DIR", help="release folder (holds manifest.json)")
    p.add_argument("--signer", metavar="NAME.pub", help="require the manifest to be signed by this key")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..errors import shown
    from ..identity import load_recipient
    from ..manifest import verify_release

    signer = load_recipient(args.signer) if args.signer else None
    s = verify_release(args.dir, signer)
    c = s["counts"]
    env = f"{s['envelope_files']} envelope files" if s["envelopes_checked"] else "envelopes not present (public copy), not checked"
    who = f"{shown(s['signer_name'])} ({s['signer']})" if s["signer_name"] else s["signer"]  # a name from the release
    trust = "" if s["signer_pinned"] else " [not pinned: pass --signer NAME.pub to check who signed]"
    print(
        f"ok: {s['shards']} shards, {env}, {s['records']} records "
        f"({c['anonymized']} anonymized, {c['quarantined']} quarantined, {c['skipped']} skipped), "
        f"signed by {who}{trust}"
    )
    # A signature proves who signed, not which of their releases this is: an older release of the
    # same key (before a rewrap that dropped a recipient, say) verifies too. These two name it.
    print(f"dataset {s['dataset_id']}, manifest.json sha256 {s['manifest_sha256']}")
    return 0
