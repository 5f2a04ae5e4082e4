"""The resume journal: `DIR/.anondata-work/`.

Why: a job may die at any instant (kill -9, a lost node, a full disk). The journal makes the
release's state a function of files that are each either absent or complete:

- `plan.json` fixes the input plan before any record is processed: the source, the splits,
  their row counts and the shard boundaries, so every shard's final name
  (`{split}-NNNNN-of-NNNNN`) is known up front and a resumed job redoes exactly the
  shards that are missing.
- `done/{shard}.json` is the commit marker of one shard: written (temp name + rename) only
  after the shard's data file and keys file are in place. It carries the shard's record
  statuses, from which the manifest is built at the end.
- `tmp/` holds files being written; they are moved into place with `os.replace`.

A shard without a marker is redone from scratch with fresh keys, overwriting whatever a
dead attempt left. After the signed manifest is written the whole folder is removed.
"""

from __future__ import annotations

import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

from .. import canonical
from ..errors import FormatError, InputError
from ..files import atomic_write, fsync_dir, make_dirs

WORK = ".anondata-work"
PLAN_VERSION = 1


class Journal:
    def __init__(self, out_dir: str | os.PathLike):
        self.out = Path(out_dir)
        self.work = self.out / WORK
        self.plan_path = self.work / "plan.json"
        self.done_dir = self.work / "done"
        self.tmp_dir = self.work / "tmp"

    def exists(self) -> bool:
        return self.plan_path.is_file()

    def create(self, plan: dict) -> None:
        plan = {**plan, "version": PLAN_VERSION}
        make_dirs(self.done_dir)
        make_dirs(self.tmp_dir)
        atomic_write(self.plan_path, canonical.dumps(plan), tmp_dir=self.tmp_dir)

    def load(self) -> dict:
        try:
            plan = canonical.loads(self.plan_path.read_bytes(), str(self.plan_path))
        except OSError as e:
            raise InputError(f"{self.plan_path}: cannot read the job plan ({e.strerror})") from None
        if plan.get("version") != PLAN_VERSION:
            raise FormatError(f"{self.plan_path}: plan version {plan.get('version')!r}, this anondata writes {PLAN_VERSION}")
        make_dirs(self.done_dir)
        make_dirs(self.tmp_dir)
        return plan

    def committed(self) -> dict[str, dict]:
        """shard name -> marker, for every shard whose marker is complete."""
        out = {}
        if not self.done_dir.is_dir():
            return out
        for p in sorted(self.done_dir.glob("*.json")):
            try:
                out[p.stem] = canonical.loads(p.read_bytes(), str(p))
            except FormatError:
                continue  # cannot happen with atomic writes; if it does, redo the shard
        return out

    def commit(self, shard: str, marker: dict) -> None:
        atomic_write(self.done_dir / f"{shard}.json", canonical.dumps(marker), tmp_dir=self.tmp_dir)

    def tmp(self, name: str) -> Path:
        make_dirs(self.tmp_dir)
        return self.tmp_dir / name

    def remove(self) -> None:
        """Plan first: once it is gone the job counts as finished, so a kill halfway through
        removing the rest can never make a resumed job redo committed shards."""
        try:
            self.plan_path.unlink()
            fsync_dir(self.work)
        except FileNotFoundError:
            pass
        crash_hook("cleanup", 1)
        shutil.rmtree(self.work, ignore_errors=True)
        fsync_dir(self.out)


@contextmanager
def exclusive(out: Path):
    """Hold the --out folder for one anonymize command at a time (an advisory `flock` on the folder
    itself: no lock file to leave in the release, and the kernel drops it when the process dies, so
    a kill -9 leaves no stale lock for --resume to trip on).

    Why: nothing else stops two commands on one folder, a second `anonymize` started at the same
    moment or an `--resume` while the job still runs. Both then wrote the same shards with their
    own keys, and a shard's data file from one with the keys file of the other cannot be restored;
    one's failure cleanup could delete the other's files. Where the platform or file system has no
    flock, the job runs unlocked, as before."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"{out}: another anondata anonymize is writing this folder; wait for it to end (or stop it) "
                "before running --resume there, and give a new job its own --out"
            ) from None
        except OSError:  # e.g. ENOLCK on a file system without locks: run unlocked
            pass
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------- test hook (crash injection)

CRASH_ENV = "ANONDATA_TEST_CRASH_AT"


def crash_hook(point: str, count: int = 0) -> None:
    """Test hook: `ANONDATA_TEST_CRASH_AT=point:N` kills this process with SIGKILL the N-th time
    `point` is reached (points: data, keys, commit, card, manifest, cleanup). Resume tests use it to stop a
    job at exact places; it does nothing unless that variable is set. Point `anonymize:N` kills
    the worker process anonymizing source row N, every time (pipeline passes it to the workers)."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    want, _, n = spec.partition(":")
    if want == point and count == int(n or 0):
        os.kill(os.getpid(), signal.SIGKILL)
