"""Reading and writing the files of a release so that a reader never sees half of one.

Why one module: releases, journals, identities and grants all need the same two guarantees,
a bounded read with a clear error (a key file or manifest is never slurped whole if it is
huge) and a write that leaves either the old file or the whole new one, durably.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import FormatError


def read_bounded(path, what: str, limit: int, error: type[Exception] = FormatError) -> bytes:
    """The bytes of `path`, refusing more than `limit`; every failure is one `error` naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise error(f"{path}: no such {what} file") from None
    except OSError as e:
        raise error(f"{path}: cannot read the {what} file ({e.strerror})") from None
    if len(data) > limit:
        raise error(f"{path}: too large for {'an' if what[:1] in 'aeiou' else 'a'} {what} file (over {limit} bytes)")
    return data


def temp_for(final: Path, folder=None, *, directory: bool = False, tag: str = ""):
    """mkstemp (or mkdtemp) for `final`, in `folder` (default: beside it). An OSError names `final`,
    the path the user gave: in a folder it cannot write, the error named the hidden temp file
    (".alice.key.m49wutdo.tmp"), a name no one typed."""
    final = Path(final)
    kw = dict(prefix=f".{final.name}.{tag}", suffix=".tmp", dir=folder if folder is not None else final.parent)
    try:
        return tempfile.mkdtemp(**kw) if directory else tempfile.mkstemp(**kw)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(final)) from None


def atomic_write(path, data: bytes, *, private: bool = False, tmp_dir=None) -> None:
    """Write to a temp name (in `tmp_dir`, default beside `path`, same file system), fsync, rename,
    fsync the folder. `private` files (envelopes) get mode 0600, others 0644."""
    path = Path(path)
    tmp_dir = Path(tmp_dir) if tmp_dir else path.parent
    make_dirs(tmp_dir)
    make_dirs(path.parent)
    fd, tmp = temp_for(path, tmp_dir)
    try:
        if not private and hasattr(os, "fchmod"):
            os.fchmod(fd, 0o644)  # mkstemp made it 0600; umask is process-global, so not read here
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path) -> None:
    """Make a rename in `path` durable (best effort: not every platform can open a folder)."""
    _fsync(path)


def _fsync(path) -> None:
    """fsync a file or folder, best effort: some file systems refuse it, and the data is written."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def missing_dirs(path) -> list[Path]:
    """`path` and those of its parents that do not exist, innermost first: what make_dirs(path)
    would make, and what remove_empty_dirs takes away again after a failure."""
    path = Path(path).absolute()
    return [p for p in (path, *path.parents) if not p.exists()]


def remove_empty_dirs(dirs: list[Path]) -> None:
    """Remove `dirs` (innermost first, as missing_dirs lists them) while they are empty: a failed
    command takes back the folders it made, never one something else has filled since."""
    for p in dirs:
        try:
            if p.is_dir():
                p.rmdir()
        except OSError:
            break


def make_dirs(path) -> Path:
    """mkdir -p that lasts: fsync the parent of every folder it makes, outermost first. A folder's
    entry lives in its parent, so until that is fsynced a power cut can lose the new folder with
    everything fsynced inside it (a whole release, after the job reported success)."""
    path = Path(path)
    made = missing_dirs(path)
    path.mkdir(parents=True, exist_ok=True)
    for p in reversed(made):
        fsync_dir(p.parent)
    return path


def within(path, folder) -> bool:
    """Whether `path` is `folder` or lies below it, after `..` and links."""
    inner, outer = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return inner == outer or outer in inner.parents


def check_new_folder(path, what: str, error: type[Exception] = FormatError, release=None) -> Path:
    """Refuse an output folder `new_folder` cannot fill: one that holds files, or a path that is a
    file (which was reported as "folder is not empty", sending the user looking for a folder).
    `release`: the release it is made from, whose folder is for publishing: restored faces, keys
    granted to someone or a report's grid of real faces must not land inside it."""
    p = Path(path)
    if release is not None and within(p, release):
        raise error(f"{what} {path}: inside the release folder {release}, which is for publishing; "
                    "choose a folder outside it")
    if p.exists() and not p.is_dir():
        raise error(f"{what} {path}: is a file, not a folder; choose a new folder name")
    # a file on the way (--out notes.txt/restored) failed later as mkdir's "File exists"
    above = next((a for a in p.absolute().parents if a.exists()), None)
    if above is not None and not above.is_dir():
        raise error(f"{what} {path}: {above} is a file, not a folder; choose another place")
    if p.is_dir() and any(p.iterdir()):
        raise error(f"{what} {path}: folder is not empty; choose a new one")
    return p


def fsync_tree(root) -> None:
    """fsync every file and folder under `root`, deepest first (best effort, as fsync_dir), before a
    rename that publishes it: the rename must not become durable before what it shows (restore
    writes its Parquet shards without an fsync of their own, so a power cut could leave a
    complete-looking folder of empty files; train_prior's snapshots, written by save_pretrained)."""
    for here, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(os.path.join(here, name))
        fsync_dir(here)


def _host_tag() -> str:
    """This machine's name as a file-name part: work folders on a shared file system are only
    judged by the host whose processes made them."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:64] or "host"


def _remove_dead_work_folders(final: Path) -> None:
    """A command killed outright (SIGKILL, power cut) never ran new_folder's cleanup: its hidden
    work folder stayed beside `final`, holding what it had written (a restore's original faces).
    The next command for the same `final` removes those of this host whose process is gone."""
    prefix = f".{final.name}.{_host_tag()}."
    for p in final.parent.glob(glob.escape(prefix) + "*.tmp"):
        pid = p.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or not p.is_dir() or p.is_symlink():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (or another user's): not ours to remove
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (PermissionError, OverflowError):
            continue


@contextmanager
def new_folder(final):
    """Yield a hidden sibling folder to fill; on success rename it to `final` (missing or empty),
    on any failure delete it: an interrupted command leaves no half-written output folder (and
    one killed outright is cleaned up by the next for the same folder)."""
    final = Path(final)
    made = missing_dirs(final.parent)  # they go too on a failure (--out a/b/c left a/b behind)
    make_dirs(final.parent)
    _remove_dead_work_folders(final)
    work = Path(temp_for(final, directory=True, tag=f"{_host_tag()}.{os.getpid()}-"))
    try:
        yield work
        fsync_tree(work)
        os.replace(work, final)  # onto a missing or empty folder: one rename
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        remove_empty_dirs(made)
        raise
    fsync_dir(final.parent)
