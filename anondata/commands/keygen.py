"""`anondata keygen NAME`: a new identity (NAME.key, secret) and its public key (NAME.pub)."""

from __future__ import annotations

from pathlib import Path

from ._args import ExamplesFormatter


def register(sub) -> None:
    p = sub.add_parser(
        "keygen",
        help="create an identity: NAME.key (secret, mode 0600) and NAME.pub (share it)",
        description=(
            "Create an identity. NAME.key holds an HPKE private key (opens the envelopes sealed "
            "to you) and an Ed25519 signing key (signs releases and grants); it is written with "
            "mode 0600 and is refused later if its mode grants any permission for group or others "
            "(chmod 600 fixes it). NAME.pub is the public half: give it to anyone who should seal records to you or check your signatures. "
            "Existing files are never overwritten."
        ),
        epilog="""examples:
  anondata keygen owner          # owner.key + owner.pub: the data owner, who restores records
  anondata keygen keys/runner    # keys/runner.key + keys/runner.pub: signs releases
  anondata keygen auditor --pq   # a post-quantum hybrid identity
""",
        formatter_class=ExamplesFormatter,
    )
    p.add_argument("name", metavar="NAME", help="path prefix: writes NAME.key and NAME.pub")
    p.add_argument(
        "--pq",
        action="store_true",
        help="post-quantum hybrid recipient (ML-KEM-768 + X25519): envelopes ~1.1 KB larger each",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    from ..errors import InputError
    from ..identity import generate_identity

    prefix = Path(args.name)
    label = prefix.name
    if args.name.endswith(("/", "\\")) or prefix.is_dir():
        raise InputError(f"{args.name!r} is a folder: give a name inside it, like {str(prefix / 'alice')!r}")
    if label.endswith((".key", ".pub")):
        label = label[:-4]
    if not label or label in (".", ".."):  # after the suffix: `.key` names nothing either
        raise InputError(f"{args.name!r} is not a usable NAME: give a file name prefix like `alice`")
    prefix = prefix.with_name(label)
    ident = generate_identity(pq=args.pq, name=label[:128])
    key_path, pub_path = prefix.with_name(label + ".key"), prefix.with_name(label + ".pub")
    ident.save(key_path, pub_path)
    print(f"wrote {key_path} (secret, mode 0600: back it up, never share it)")
    print(f"wrote {pub_path} (public)")
    print(f"{ident.kem} identity {label}, fingerprint {ident.fingerprint}")
    return 0
