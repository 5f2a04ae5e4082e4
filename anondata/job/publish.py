"""What `anondata publish` uploads, and the one function that talks to the Hub.

Why an explicit file list: the release folder holds private files (`keys/`, and during a job
`.anondata-work/`). Uploading with a broad pattern and a deny list fails open when a new
private file appears; here every uploaded path is named, and `upload_folder` gets exactly
those paths as `allow_patterns`.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

from ..errors import InputError
from .journal import WORK

PUBLIC_TOP = ("README.md", "manifest.json", "manifest.json.sig")
# Folders whose every file the manifest lists (verify refuses any other). The upload deletes the
# repo's other files there, in its first commit: a shard or envelope file of an earlier release
# published to the same repo (another shard count, a record since removed) would otherwise stay
# beside the new manifest, read by `load_dataset` (the card's data/{split}-*), failing verify.
MANIFEST_GOVERNED = ("data/*", "keys/*")
_REPO_RE = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}", re.ASCII)


def public_files(release: str | Path, signer, include_envelopes: bool = False) -> list[str]:
    """The exact relative paths to upload: card, manifest, signature, the manifest's shards,
    and its envelope files only with `include_envelopes`. The release is verified first, so
    a half-written or changed release is never published; `signer` (a Recipient, or None on
    purpose) pins who must have signed it: whoever can write the folder can re-sign it."""
    from ..manifest import REWRAP_STAGE, open_release

    root = Path(release)
    if (root / WORK).exists():
        raise InputError(f"{root}: a job is unfinished here ({WORK}/); finish it with anonymize --resume first")
    if (root / REWRAP_STAGE).exists():
        raise InputError(f"{root}: a key rotation is unfinished here (.rewrap/); run the same `anondata rewrap` again first")
    rel = open_release(root, signer, keep_envelopes=False)
    if include_envelopes and not rel.summary["envelopes_checked"]:
        raise InputError(f"{root}: --include-envelopes, but there is no keys/ folder")
    m = rel.manifest
    for f in PUBLIC_TOP:
        # upload_folder reads through links: a README.md linked to a key file would publish the key.
        # (Shards and envelopes are already refused as links by open_release.)
        if (root / f).is_symlink():
            raise InputError(f"{root / f}: is a symbolic link; publish uploads only regular files (a link can point "
                             "at a private file): put the file itself in the release")
    files = [f for f in PUBLIC_TOP if (root / f).is_file()]
    if "README.md" not in files:
        raise InputError(f"{root}: no README.md (dataset card); the Hub needs it")
    files += [s["path"] for s in m["shards"]]
    if include_envelopes:
        files += [e["path"] for e in m["envelopes"]]
    return files


def allow_patterns(files: list[str]) -> list[str]:
    """`upload_folder` matches allow patterns with fnmatch: escape the glob characters so each
    pattern matches its one file and nothing else."""
    out = []
    for f in files:
        pat = re.sub(r"([*?\[])", r"[\1]", f)
        out.append(pat)
    return out


def check_patterns(release: str | Path, files: list[str], patterns: list[str]) -> None:
    """Every file under the release that the patterns admit is in `files` (no more, no less)."""
    root = Path(release)
    admitted = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and any(fnmatch.fnmatch(p.relative_to(root).as_posix(), pat) for pat in patterns)
    )
    if admitted != sorted(files):
        raise InputError(f"upload patterns admit {sorted(set(admitted) ^ set(files))[:5]}: refusing to publish")


class _Refused(Exception):
    """A refusal inside `upload`'s try, not to be reported as a network failure."""


def upload(release: str | Path, repo_id: str, files: list[str], *, private: bool = False,
           token: str | None = None, message: str | None = None) -> str:
    """The network call: create the dataset repo if needed and upload exactly `files`."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    started = False
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        # create_repo leaves an existing repo's visibility as it is: --private must not upload to a public one
        public = private and getattr(api.repo_info(repo_id, repo_type="dataset"), "private", None) is not True
        if public:
            raise _Refused(f"--private: datasets/{repo_id} already exists and is public; nothing was uploaded. Make "
                           "it private on the Hub first, or publish to a new --repo")
        started = True
        info = api.upload_folder(
            repo_id=repo_id,
            repo_type="dataset",
            folder_path=str(release),
            allow_patterns=allow_patterns(files),
            delete_patterns=list(MANIFEST_GOVERNED),
            commit_message=message or "Upload anonymized release (anondata)",
        )
    except _Refused as e:
        raise InputError(str(e)) from None
    except Exception as e:  # network, auth, permissions: all reported the same way
        # huggingface_hub commits a large upload in parts (in sorted path order: the manifest after the
        # shards), so a failure midway can leave some of it on the Hub; a rerun skips what is there.
        partial = ("; part of it may be on the Hub (large uploads are committed in parts): run the same "
                   "`anondata publish` again to finish it") if started else ""
        raise InputError(
            f"upload to {repo_id} failed ({type(e).__name__}: {str(e)[:200]}){partial}; check your network and "
            "`huggingface-cli login`"
        ) from None
    return str(getattr(info, "commit_url", info))


def publish(release: str | Path, repo_id: str, *, signer, private: bool = False, include_envelopes: bool = False,
            dry_run: bool = False, token: str | None = None, uploader=upload) -> list[str]:
    """Verify, compute the file set, double-check the patterns, upload (unless dry_run)."""
    if not _REPO_RE.fullmatch(repo_id):
        raise InputError(f"--repo {repo_id!r}: expected USER/NAME")
    files = public_files(release, signer, include_envelopes)
    check_patterns(release, files, allow_patterns(files))
    if not dry_run:
        uploader(release, repo_id, files, private=private, token=token)
    return files
