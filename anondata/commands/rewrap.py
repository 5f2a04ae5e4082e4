"""`anondata rewrap`: re-seal every envelope of a release to new keys (key rotation)."""

from __future__ import annotations


from ._args import ExamplesFormatter, add_signer, signer


def register(sub) -> None:
    p = sub.add_parser(
        "rewrap",
        help="key rotation: re-seal all envelopes to new public keys; shards are untouched",
        description=(
            "Open every envelope of DIR with --identity and seal it again to exactly the --to "
            "keys (every previous recipient, including --identity, loses access unless listed). "
            "Only keys/*.keys.parquet change; the shards are not touched. The manifest's "
            "envelope hashes and recipients are updated and it is re-signed with --signing-key "
            "(default: --identity's signing key; pass the new key when rotating away from a "
            "compromised one, then verify with --signer NEW.pub). --signer pins the key that signed "
            "DIR as it is now; rerunning after an interruption, the rerun's --signing-key instead. "
            "Republish manifest.json and manifest.json.sig afterwards."
        ),
        epilog="""examples:
  anondata rewrap release --signer runner.pub --identity owner.key --to new-owner.pub   # re-signed by owner.key
  anondata rewrap release --signer runner.pub --identity owner.key --to new-owner.pub \\
      --signing-key new-owner.key   # re-signed by the new key: verify with --signer new-owner.pub
""",
        formatter_class=ExamplesFormatter,
    )
    p.add_argument("dir", metavar="DIR", help="release folder (manifest.json and keys/)")
    p.add_argument("--identity", required=True, metavar="OLD.key", help="identity that can open the envelopes now")
    p.add_argument("--to", required=True, action="append", metavar="NEW.pub", help="new recipient (repeatable)")
    p.add_argument("--signing-key", metavar="NAME.key", help="identity that re-signs the manifest (default: --identity)")
    add_signer(p)
    p.set_defaults(run=run, interrupted="run the same command again to complete the rewrap")


def run(args) -> int:
    from pathlib import Path

    from ..envelope import envelope_table_bytes, recipients_per_record, rewrap_table
    from ..errors import KeyError_
    from ..files import atomic_write
    from ..identity import load_identity, load_recipient
    from ..manifest import (
        _recipient_ref,
        file_entry,
        MANIFEST,
        REWRAP_STAGE,
        SIGNATURE,
        manifest_bytes,
        open_release,
        validate_manifest,
        verify_release,
    )
    from ..job.journal import crash_hook

    ident = load_identity(args.identity)
    to = [load_recipient(p) for p in args.to]
    signing = load_identity(args.signing_key) if args.signing_key else ident
    pinned = signer(args)
    root = Path(args.dir)
    rolled = roll_forward(root)
    if rolled:
        print("completed an interrupted rewrap (its staged files are now in place)")
    # A completed earlier run of this command re-signed the manifest with its --signing-key.
    rel = open_release(root, signing.recipient if rolled else pinned)
    if rel.envelopes is None:
        raise KeyError_(f"{root}: no keys/ folder: rewrap needs the private copy of the release")
    m = rel.manifest
    dataset_id = m["dataset_id"]
    target = frozenset(r.fingerprint for r in to)
    if len(target) != len(to):
        raise KeyError_("the same --to key is listed twice")

    new_files: dict[str, bytes] = {}
    changed = 0
    for e, table in zip(m["envelopes"], rel.envelopes):
        per_record = recipients_per_record(table)
        if all(s == target for s in per_record) and ident.fingerprint not in target:
            continue  # already rewrapped by an interrupted earlier run
        new = rewrap_table(table, ident, to, dataset_id)
        new_files[e["path"]] = envelope_table_bytes(new, e["path"])
        changed += new.num_rows

    if not new_files:
        # Every envelope is already sealed to exactly --to, and --identity is not among them: a
        # rerun of a finished rewrap, or an identity that lost access. Re-signing would only
        # hand the manifest to --signing-key for nothing.
        if rolled:
            return 0
        raise KeyError_(f"nothing to rewrap: every envelope of {root} is already sealed to exactly the --to keys, "
                        f"and {ident.recipient.label} is not one of them")

    # Stage every new file, the signed manifest's signature last; then rename them into place.
    stage = root / REWRAP_STAGE  # outside data/ and keys/, which verify requires to hold only listed files
    for rel, data in new_files.items():
        atomic_write(stage / rel, data, private=True)
    m["envelopes"] = [
        file_entry(root, e["path"], "envelopes", staged=f"{REWRAP_STAGE}/{e['path']}" if e["path"] in new_files else None)
        for e in m["envelopes"]
    ]
    m["recipients"] = [_recipient_ref(r) for r in to]
    m["signer"] = signing.recipient.to_json()
    validate_manifest(m)
    data = manifest_bytes(m)
    atomic_write(stage / MANIFEST, data)
    atomic_write(stage / SIGNATURE, signing.sign(data))
    crash_hook("rewrap-staged")
    roll_forward(root)
    verify_release(root, signing.recipient)
    print(
        f"rewrapped {changed} records in {len(new_files)} envelope files to "
        f"{', '.join(r.label for r in to)}; manifest re-signed by {signing.recipient.label}"
    )
    return 0


def roll_forward(root) -> bool:
    """Finish or discard what an interrupted rewrap staged in DIR/.rewrap/. Staging is complete
    once the staged signature exists (it is written last): then every staged file is renamed into
    place, the signature last (copied, so the stage keeps its mark of completeness until the
    stage itself is renamed away), and True is returned. Before that nothing was renamed, so the
    stage is deleted and the release is as it was."""
    import os
    import shutil
    from pathlib import Path

    from ..errors import FormatError, KeyError_
    from ..files import atomic_write, fsync_dir, read_bounded
    from ..manifest import MANIFEST, MAX_MANIFEST, REWRAP_STAGE, SIGNATURE, parse_manifest

    stage = Path(root) / REWRAP_STAGE
    done = Path(root) / f"{REWRAP_STAGE}.done"  # a finished stage, being removed
    if done.exists():
        shutil.rmtree(done)
    if not stage.is_dir():
        return False
    if not (stage / SIGNATURE).is_file():
        shutil.rmtree(stage)
        return False
    m_path = stage / MANIFEST if (stage / MANIFEST).is_file() else Path(root) / MANIFEST
    try:
        listed = {e["path"] for e in parse_manifest(read_bounded(m_path, "staged manifest", MAX_MANIFEST), str(m_path))["envelopes"]}
    except FormatError as e:
        raise KeyError_(f"{e}: the interrupted rewrap's stage is damaged; remove {stage} and run the rewrap again") from None
    # Every file at any depth: envelope paths may have folders (keys/a/b.keys.parquet), and a
    # top-level glob saw the folder `keys/a` as an unlisted file, so such a rewrap never finished.
    staged = sorted(p.relative_to(stage).as_posix() for p in (stage / "keys").rglob("*") if not p.is_dir())
    for rel in staged:
        if rel not in listed:
            raise KeyError_(f"{stage / rel}: a staged file the staged manifest does not list; remove {stage} and run again")
        os.replace(stage / rel, Path(root) / rel)
    # Each rename durable before the next step, and all before the stage goes: a power cut must not
    # bring back an old envelope file (sealed to OLD.key only) with nothing left to finish from.
    for folder in sorted({(Path(root) / rel).parent for rel in staged}):
        fsync_dir(folder)
    if (stage / MANIFEST).is_file():
        os.replace(stage / MANIFEST, Path(root) / MANIFEST)
    # A copy, then the stage renamed away in one step: had the signature been moved out and the
    # stage then deleted, a kill in between left a stage without a signature, which the rerun took
    # for an unfinished staging and dropped, then failed on the finished release.
    atomic_write(Path(root) / SIGNATURE, read_bounded(stage / SIGNATURE, "staged signature", 1024))
    os.replace(stage, done)
    fsync_dir(root)
    shutil.rmtree(done)
    return True
