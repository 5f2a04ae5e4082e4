"""`anondata publish DIR --repo USER/NAME [--private] [--include-envelopes]`."""

from __future__ import annotations


from ._args import ExamplesFormatter, add_signer, signer


def register(sub) -> None:
    p = sub.add_parser(
        "publish",
        help="upload a release's public part to the Hugging Face Hub",
        description=(
            "Verify the release, then upload exactly its public files to a Hub dataset repo: README.md, "
            "manifest.json, manifest.json.sig and the data/ shards named in the manifest. keys/ (the sealed "
            "record keys) stays local unless --include-envelopes. Other files under data/ and keys/ in the repo "
            "(an earlier release's) are deleted in the same upload. Log in first with `huggingface-cli login` "
            "or set HF_TOKEN."
        ),
        epilog="""examples:
  anondata publish release --signer runner.pub --repo you/faces-anon --dry-run   # list what would go up
  anondata publish release --signer runner.pub --repo you/faces-anon --private
""",
        formatter_class=ExamplesFormatter,
    )
    p.add_argument("dir", metavar="DIR", help="finished release folder")
    p.add_argument("--repo", required=True, metavar="USER/NAME", help="Hub dataset repository")
    p.add_argument("--private", action="store_true", help="create the repository as private; an existing public one is refused")
    p.add_argument("--include-envelopes", action="store_true",
                   help="also upload keys/ (sealed to the recipients; only they can open them)")
    p.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded, upload nothing")
    add_signer(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..job.publish import publish

    files = publish(args.dir, args.repo, signer=signer(args), private=args.private, include_envelopes=args.include_envelopes,
                    dry_run=args.dry_run)
    verb = "would upload" if args.dry_run else "uploaded"
    print(f"{verb} {len(files)} files to datasets/{args.repo}:")
    for f in files:
        print(f"  {f}")
    return 0
