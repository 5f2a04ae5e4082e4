"""Kill -9 the job process at several points, then --resume: every input record exactly once,
manifest consistent, verify passes, restore still exact.

The job runs as a subprocess (`python -m anondata.cli anonymize`) that joins the session's Ray
instance through RAY_ADDRESS. Exact points use the test hook ANONDATA_TEST_CRASH_AT
(`point:N` -> SIGKILL itself the N-th time it reaches `point`); one case kills it from outside
at an arbitrary moment."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from anondata.images import decode_image
from conftest import FAST, ROOT, subprocess_env, write_face_parquet

N, CORRUPT, SHARD = 8, {5}, 2


def _cmd(src, out, identities, model, *extra):
    return [
        sys.executable, "-m", "anondata.cli", "anonymize", str(src), "--out", str(out),
        "--recipient", identities["owner"][1], "--signing-key", identities["runner"][0], "--model", model,
        "--steps", str(FAST["steps"]), "--inversion-iters", str(FAST["inversion_iters"]),
        "--shard-size", str(SHARD), "--batch-size", "1", "--no-progress", *extra,
    ]


def check_exactly_once(out, rows) -> dict:
    """verify passes; every input id is in exactly one place: a public shard or the quarantine list."""
    from anondata.manifest import read_manifest, verify_release

    verify_release(out)
    m = read_manifest(out)
    assert not (out / ".anondata-work").exists()
    public = [r["record_id"] for p in sorted((out / "data").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    quarantined = [r["id"] for r in m["records"] if r["status"] == "quarantined"]
    want = [r["record_id"] for r in rows]
    assert len(public) == len(set(public)) and not set(public) & set(quarantined)
    assert sorted(public + quarantined) == sorted(want)
    assert [r["id"] for r in m["records"]] == want
    assert quarantined == [want[i] for i in sorted(CORRUPT)]
    assert m["counts"]["total"] == len(rows)
    return m


def _signal_after_first_commit(proc: subprocess.Popen, out, sig: int) -> None:
    """Signal the job as soon as its first shard is committed, somewhere inside the next one: a
    pause here let a fast run finish first (3 shards of 2 records are left), and the test then
    failed on the exit code, not on the job."""
    done = out / ".anondata-work" / "done"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (done.is_dir() and any(done.iterdir())):
        time.sleep(0.05)
    proc.send_signal(sig)


@pytest.mark.parametrize("point", ["data:1", "keys:2", "commit:2", "card:1", "manifest:1", "cleanup:1", "external"])
def test_kill9_then_resume(point, ray_address, identities, tiny_model, tmp_path):
    src = tmp_path / "faces.parquet"
    rows = write_face_parquet(src, N, corrupt=CORRUPT)
    out = tmp_path / "out"
    env = subprocess_env(RAY_ADDRESS=ray_address)
    if point != "external":
        env["ANONDATA_TEST_CRASH_AT"] = point
    proc = subprocess.Popen(_cmd(src, out, identities, tiny_model), env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if point == "external":
        _signal_after_first_commit(proc, out, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    if point == "cleanup:1":  # killed while removing the journal: the release is already complete
        assert not (out / ".anondata-work" / "plan.json").exists() and (out / ".anondata-work").is_dir()
        res = subprocess.run(_cmd(src, out, identities, tiny_model, "--resume"),
                             env=subprocess_env(RAY_ADDRESS=ray_address), cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        check_exactly_once(out, rows)
        return
    assert (out / ".anondata-work" / "plan.json").is_file()
    committed = sorted(p.stem for p in (out / ".anondata-work" / "done").glob("*.json"))
    if point == "commit:2":
        assert len(committed) == 2
    if point == "manifest:1":
        assert (out / "manifest.json").is_file() and len(committed) == N // SHARD
    if point == "keys:2":  # the second shard's data and keys files are written, its marker is not: redone
        assert len(committed) == 1 and len(list((out / "keys").glob("*.keys.parquet"))) == 2
    if point == "card:1":  # every shard and the card are written, the manifest is not
        assert len(committed) == N // SHARD and (out / "README.md").is_file() and not (out / "manifest.json").exists()

    # Without --resume the folder is refused, with a pointer to --resume.
    again = subprocess.run(_cmd(src, out, identities, tiny_model), env=subprocess_env(RAY_ADDRESS=ray_address),
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr
    before = {n: (out / "data" / f"{n}.parquet").read_bytes() for n in committed}
    res = subprocess.run(_cmd(src, out, identities, tiny_model, "--resume"), env=subprocess_env(RAY_ADDRESS=ray_address),
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    check_exactly_once(out, rows)
    for n, data in before.items():  # committed shards are kept as they were, not redone
        assert (out / "data" / f"{n}.parquet").read_bytes() == data

    if point == "commit:2":  # keys from before and after the crash both still restore exactly
        from anondata.job.restore import run_restore

        ids = [rows[0]["record_id"], rows[N - 1]["record_id"]]
        run_restore(str(out), identities["owner"][0], str(tmp_path / "r"), ids=ids, model=tiny_model, signer_path=identities["runner"][1], progress=False)
        got = [r for p in sorted((tmp_path / "r" / "data").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
        by_id = {r["record_id"]: r for r in rows}
        for g in got:
            want = decode_image(by_id[g["record_id"]]["image"]["bytes"], "x")[0]
            assert np.array_equal(decode_image(g["image"]["bytes"], "x")[0], want)
        assert len(got) == 2


def test_sigterm_ends_the_job_like_ctrl_c_then_resume(ray_address, identities, tiny_model, tmp_path):
    """SIGTERM mid-job: one line and exit 143, not the C++ stack dump of Ray's signal handler and
    exit 15 (ray.init replaced the CLI's handler); --resume then finishes it."""
    src = tmp_path / "faces.parquet"
    rows = write_face_parquet(src, N, corrupt=CORRUPT)
    out = tmp_path / "out"
    proc = subprocess.Popen(_cmd(src, out, identities, tiny_model), env=subprocess_env(RAY_ADDRESS=ray_address),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _signal_after_first_commit(proc, out, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("anondata anonymize: terminated; ") and "--resume" in err and "SIGTERM received" not in err, err
    res = subprocess.run(_cmd(src, out, identities, tiny_model, "--resume"), env=subprocess_env(RAY_ADDRESS=ray_address),
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    check_exactly_once(out, rows)


def _planned_job(identities, tiny_model, tmp_path):
    """A job whose plan is written and no shard run yet (as if killed right after planning):
    -> (options, plan, journal). Resume's refusals happen before any work, so no Ray is needed."""
    from anondata.identity import load_identity, load_recipient
    from anondata.job.journal import Journal
    from anondata.job.pipeline import JobOptions
    from anondata.job.plan import make_plan
    from anondata.job.sources import open_source

    write_face_parquet(tmp_path / "a.parquet", 4)
    opts = JobOptions(source=str(tmp_path / "a.parquet"), out=str(tmp_path / "out"), recipients=[identities["owner"][1]],
                      signing_key=identities["runner"][0], model=tiny_model, shard_size=2, progress=False)
    plan = make_plan(open_source(opts.source), opts, [load_recipient(identities["owner"][1])],
                     load_identity(identities["runner"][0]))
    journal = Journal(opts.out)
    journal.create(plan)
    return opts, plan, journal


def test_resume_of_a_job_killed_while_planning_says_to_run_without_it(identities, tiny_model, tmp_path):
    """A kill in the seconds before the plan is written (source, keys and model checks) leaves --out
    made and empty, or holding only a planless work folder; the stress run (kill at a random
    time, then --resume) met it in 3 of 8 rounds. --resume then names the fix, and that fix works."""
    from anondata.errors import InputError
    from anondata.job.journal import Journal
    from anondata.job.pipeline import JobOptions, run_anonymize

    opts, _plan, journal = _planned_job(identities, tiny_model, tmp_path)
    journal.plan_path.unlink()  # killed while writing the plan: only .anondata-work/{done,tmp}
    resume = JobOptions(**{**opts.__dict__, "resume": True})
    with pytest.raises(InputError, match="stopped before its plan was written; run again without --resume"):
        run_anonymize(resume)
    shutil.rmtree(journal.work)  # killed before that: --out made, still empty
    with pytest.raises(InputError, match="is empty: .*nothing to resume; run again without --resume"):
        run_anonymize(resume)
    assert Path(opts.out).is_dir() and not any(Path(opts.out).iterdir())  # the refusal leaves it as it was
    (Path(opts.out) / "notes.txt").write_text("mine")  # a folder with other files: not told to start a job there
    with pytest.raises(InputError, match="no interrupted job to resume") as e:
        run_anonymize(resume)
    assert "without --resume" not in str(e.value)
    assert not Journal(opts.out).exists()


def test_new_folders_of_a_job_are_fsynced_in_their_parents(tmp_path, monkeypatch):
    """A folder's entry lives in its parent: --out (and the parents the job made), data/, keys/ and
    .anondata-work/ were made and never fsynced there, so a power cut soon after "success" could
    lose the whole release, and one mid-job a shard whose marker survived. Each is fsynced in its
    parent once it exists (the job itself stubbed: this is about the folders)."""
    import pyarrow as pa

    from anondata import files
    from anondata.job import pipeline
    from anondata.job.journal import Journal
    from anondata.job.pipeline import JobOptions
    from anondata.job.shards import write_parquet_atomic

    synced = []  # (folder, its entries when it was fsynced)
    monkeypatch.setattr(files, "fsync_dir", lambda p: synced.append((Path(p).absolute(), {c.name for c in Path(p).iterdir()})))
    out = tmp_path / "a" / "b" / "out"

    def job(opts):
        journal = Journal(opts.out)
        journal.create({"plan": 1})
        write_parquet_atomic(pa.table({"x": [1]}), out / "data" / "s.parquet", journal.tmp("s.parquet"))
        files.atomic_write(out / "keys" / "s.keys.parquet", b"k", private=True)  # as envelope.write_envelope_table
        return "done"

    monkeypatch.setattr(pipeline, "_run_anonymize", job)
    assert pipeline._locked(JobOptions(source="src", out=str(out), recipients=[], signing_key="k")) == "done"
    for folder in (tmp_path / "a", tmp_path / "a" / "b", out, out / "data", out / "keys", out / ".anondata-work",
                   out / ".anondata-work" / "done", out / ".anondata-work" / "tmp"):
        assert any(p == folder.parent and folder.name in names for p, names in synced), (folder, synced)


def test_a_folder_renamed_into_place_is_fsynced_in_its_parent(tmp_path, monkeypatch):
    """files.new_folder (grants, restore output, eval reports) renamed its work folder into place
    and returned: until the parent is fsynced, a power cut can undo the rename."""
    from anondata import files

    synced = []
    monkeypatch.setattr(files, "fsync_dir", lambda p: synced.append((Path(p), {c.name for c in Path(p).iterdir()})))
    with files.new_folder(tmp_path / "grant") as work:
        (work / "f").write_bytes(b"x")
    assert (tmp_path, {"grant"}) in synced


def test_what_a_new_folder_holds_is_durable_before_its_rename(tmp_path, monkeypatch):
    """Restore writes its Parquet shards without an fsync of their own: new_folder fsyncs every
    file and folder it holds before the rename that shows them, or a power cut could leave a
    complete-looking restore folder of empty files."""
    import os

    from anondata import files

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(files.os, "replace", lambda a, b: (events.append(("rename", str(a))), real_replace(a, b))[1])
    with files.new_folder(tmp_path / "restored") as work:
        (work / "data").mkdir()
        (work / "data" / "train.parquet").write_bytes(b"rows")
        (work / "README.md").write_bytes(b"card")
        work_name = str(work)
    rename = events.index(("rename", work_name))
    synced = {p for kind, p in events[:rename] if kind == "fsync"}
    assert {f"{work_name}/data/train.parquet", f"{work_name}/README.md", f"{work_name}/data", work_name} <= synced


def test_an_unfinished_job_is_not_verified_as_a_release(identities, tiny_model, tmp_path):
    """verify, restore, grant and eval on an interrupted job's folder point at --resume, not at a
    missing manifest signature (or at a manifest the job will rewrite), as publish already did."""
    from anondata.errors import FormatError
    from anondata.manifest import verify_release

    opts, _plan, _journal = _planned_job(identities, tiny_model, tmp_path)
    with pytest.raises(FormatError, match="unfinished anonymize job.*--resume"):
        verify_release(opts.out)


def test_a_new_run_on_an_interrupted_job_says_resume_keeps_its_options(identities, tiny_model, tmp_path):
    """Stopped to change an option, then told only "pass --resume", a user got the old option: the
    refusal says --resume keeps the job's options and how to start over with others."""
    from anondata.errors import InputError
    from anondata.job.pipeline import JobOptions, run_anonymize

    opts, _plan, _journal = _planned_job(identities, tiny_model, tmp_path)
    with pytest.raises(InputError, match="--resume.*options it was started with.*to start over with other options, "
                                         "remove"):
        run_anonymize(JobOptions(**{**opts.__dict__, "on_no_face": "keep"}))


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_a_second_command_on_a_folder_a_job_is_writing_is_refused(identities, tiny_model, tmp_path):
    """`--resume` while the job still runs, or a second job started into the same --out at the same
    moment, wrote the same shards with other keys (a data file of one with the keys of the other
    cannot be restored). A running job holds a flock on its --out (here: held by this test, as
    another process would), and every other anonymize there stops before touching anything."""
    import fcntl

    from anondata.errors import InputError
    from anondata.job.pipeline import JobOptions, run_anonymize

    opts, _plan, _journal = _planned_job(identities, tiny_model, tmp_path)
    plan_bytes = (tmp_path / "out" / ".anondata-work" / "plan.json").read_bytes()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    fds = [os.open(d, os.O_RDONLY) for d in (tmp_path / "out", fresh)]
    try:
        for fd in fds:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(InputError, match="another anondata anonymize is writing this folder"):
            run_anonymize(_resumed(opts))
        with pytest.raises(InputError, match="another anondata anonymize is writing this folder"):
            run_anonymize(JobOptions(**{**opts.__dict__, "out": str(fresh)}))
    finally:
        for fd in fds:
            os.close(fd)
    assert (tmp_path / "out" / ".anondata-work" / "plan.json").read_bytes() == plan_bytes
    assert list(fresh.iterdir()) == []
    # released with its holder: the job can go on (stopped here by a check that comes after the lock)
    with pytest.raises(InputError, match="--recipient"):
        run_anonymize(_resumed(opts, recipients=[identities["stranger"][1]]))
    # the folder is made before it is locked: a refused new job leaves neither it nor its new parents
    with pytest.raises(InputError, match="--model /no/such"):
        run_anonymize(JobOptions(**{**opts.__dict__, "out": str(tmp_path / "new" / "deeper" / "o"), "model": "/no/such"}))
    assert not (tmp_path / "new").exists()


def _resumed(opts, **changes):
    from anondata.job.pipeline import JobOptions

    return JobOptions(**{**opts.__dict__, **changes, "resume": True})


def test_resume_checks_it_is_the_same_job(identities, tiny_model, tmp_path):
    """--resume refuses another source or other keys (no Ray needed: checked before any work)."""
    from anondata.errors import InputError
    from anondata.job.pipeline import run_anonymize

    opts, _plan, _journal = _planned_job(identities, tiny_model, tmp_path)
    write_face_parquet(tmp_path / "b.parquet", 5)
    with pytest.raises(InputError, match="source does not match"):
        run_anonymize(_resumed(opts, source=str(tmp_path / "b.parquet")))
    with pytest.raises(InputError, match="--recipient"):
        run_anonymize(_resumed(opts, recipients=[identities["stranger"][1]]))
    assert os.path.isfile(tmp_path / "out" / ".anondata-work" / "plan.json")


def test_resume_refuses_other_weights_than_the_written_shards(identities, tiny_model, tmp_path):
    """The plan names the model ("embedded", a folder), not its weights; an upgrade of anondata
    changes what "embedded" is. Resume checks before any work (no Ray needed) and, for an
    embedded prior an earlier anondata shipped, names the version that finishes the job."""
    from anondata import canonical
    from anondata.backends import EARLIER_EMBEDDED, model_sha256
    from anondata.errors import InputError
    from anondata.job.pipeline import run_anonymize

    opts, plan, journal = _planned_job(identities, tiny_model, tmp_path)
    first = plan["splits"][0]["shards"][0]["name"]

    def written_with(sha):
        info = {"model": {"name": "embedded", "sha256": sha, "revision": ""}, "settings": {}, "device": "cpu"}
        journal.commit(first, {"shard": first, "split": "train", "records": [], "faces": 0,
                               "model": canonical.dumps(info).decode()})

    old = next(iter(EARLIER_EMBEDDED))
    written_with(old)
    with pytest.raises(InputError, match=f"anondata {EARLIER_EMBEDDED[old]}: finish the job with that version"):
        run_anonymize(_resumed(opts))
    written_with("ab" * 32)
    with pytest.raises(InputError, match=f"now has weights sha256 {model_sha256(tiny_model)[:12]}") as e:
        run_anonymize(_resumed(opts))
    assert "abababababab" in str(e.value) and "anondata 0" not in str(e.value)


def test_resume_refuses_a_source_whose_files_changed(identities, tiny_model, tmp_path, capsys):
    """The audit's case: one image renamed between the killed run and --resume shifts the rows
    of an image folder (one photo published twice, another never processed) while the row
    count stays the same. Refused before any work; a plan from before the fingerprint is
    resumed with a warning."""
    from anondata.errors import InputError
    from anondata.identity import load_identity, load_recipient
    from anondata.job.journal import Journal
    from anondata.job.pipeline import JobOptions, run_anonymize
    from anondata.job.plan import make_plan, same_source_contents
    from anondata.job.sources import open_source
    from conftest import encode, synthetic_faces

    d = tmp_path / "pics"
    d.mkdir()
    for n, a in zip("abcd", synthetic_faces(4)):
        (d / f"{n}.png").write_bytes(encode(a))
    opts = JobOptions(source=str(d), out=str(tmp_path / "out"), recipients=[identities["owner"][1]],
                      signing_key=identities["runner"][0], model=tiny_model, shard_size=2, progress=False)
    plan = make_plan(open_source(opts.source), opts, [load_recipient(identities["owner"][1])],
                     load_identity(identities["runner"][0]))
    Journal(opts.out).create(plan)
    (d / "a.png").rename(d / "e.png")
    with pytest.raises(InputError, match="changed since the job started.*split 'train': its files"):
        run_anonymize(_resumed(opts))
    old = {k: v for k, v in plan.items() if k != "source_fingerprint"}
    same_source_contents(old, open_source(str(d)))
    assert "no fingerprint" in capsys.readouterr().err


def test_resume_checks_the_device_and_settings_of_the_written_shards(ray_address, identities, tiny_model, tmp_path,
                                                                      monkeypatch):
    """Each marker records model, settings and device, and the release must have one of each. A
    resume that would differ (another device, a changed anondata.json) used to do all the work
    and then never finish; now it stops before any record, naming what differs, and a job whose
    shards ran on CPU stays on CPU on a cluster with GPUs."""
    import ray

    from anondata import canonical
    from anondata.errors import InputError
    from anondata.identity import load_recipient
    from anondata.job.pipeline import _same_marker_as_committed, run_anonymize
    from anondata.job.worker import AnonymizerActor

    opts, plan, journal = _planned_job(identities, tiny_model, tmp_path)
    first = plan["splits"][0]["shards"][0]["name"]
    actor = AnonymizerActor(model=tiny_model, device="cpu", steps=None, inversion_iters=None, sign_cell=0,
                            background="noised", flip_centre="mean-face", model_batch=1, face_spec=plan["options"]["faces"],
                            lossless=True, recipients=[], dataset_id=plan["dataset_id"])
    real = canonical.loads(actor.model_json.encode(), "m")

    def written_with(**changes):
        journal.commit(first, {"shard": first, "split": "train", "records": [], "faces": 0,
                               "model": canonical.dumps({**real, **changes}).decode()})

    written_with(device="cuda")
    with pytest.raises(InputError, match="nothing was processed.*made on cuda, this run would use cpu.*GPUs"):
        run_anonymize(_resumed(opts))
    written_with(settings={**real["settings"], "face_mean": "1,2,3"})
    with pytest.raises(InputError, match="settings: face_mean 1,2,3 -> "):
        run_anonymize(_resumed(opts))
    assert [p.name for p in journal.done_dir.iterdir()] == [f"{first}.json"]  # no shard was run

    written_with()
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    recipients = [load_recipient(identities["owner"][1])]
    pinned = _resumed(opts)
    _same_marker_as_committed(pinned, plan, recipients, journal.committed())
    assert pinned.gpus == 0  # the GPU is there, but the written shards ran on CPU
    with pytest.raises(InputError, match="made on cpu, this run would use cuda \\(resume with --gpus 0\\)"):
        _same_marker_as_committed(_resumed(opts, gpus=1), plan, recipients, journal.committed())


def test_the_jobs_own_ray_is_shut_down_by_the_job_deaf_to_ctrl_c(monkeypatch):
    """A Ray that ensure_ray started is shut down when run_anonymize ends (here by Ctrl-C), with
    Ctrl-C ignored meanwhile. Left to Ray's exit handler, a Ctrl-C during that shutdown printed a
    traceback and left Ray's agent processes running after the command had exited."""
    import ray

    from anondata.job import pipeline

    calls = []

    def fake_shutdown():
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C while Ray shuts down
        time.sleep(0.2)
        calls.append(signal.getsignal(signal.SIGINT))

    def interrupted(opts):
        pipeline._STARTED = True  # as after ensure_ray started a private instance
        raise KeyboardInterrupt

    monkeypatch.setattr(ray, "shutdown", fake_shutdown)
    monkeypatch.setattr(pipeline, "_locked", interrupted)  # the job, whatever it was doing
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_anonymize(None)
    assert calls == [signal.SIG_IGN] and not pipeline._STARTED
    assert signal.getsignal(signal.SIGINT) is before
    pipeline.shutdown_ray()  # nothing started: nothing to shut down
    assert len(calls) == 1


def test_ctrl_c_while_ray_starts_is_held_until_it_has_started(monkeypatch):
    """Ctrl-C stopping ray.init halfway left Ray's agent processes running for a minute after the
    command (or crashed it at exit); it is held until ray.init returns, then the job stops and
    shuts that Ray down."""
    import ray

    from anondata.job import pipeline

    done = []

    def init(num_cpus):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        done.append(num_cpus)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(pipeline, "_init_ray", init)
    monkeypatch.setattr(pipeline, "_STARTED", False)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        pipeline.ensure_ray(3)
    assert done == [3] and pipeline._STARTED and signal.getsignal(signal.SIGINT) is before


def test_resume_refuses_options_that_differ_from_the_plan(identities, tiny_model, tmp_path, monkeypatch, capsys):
    """--resume takes every output option from the plan, so one given on its command line was
    ignored without a word: a job stopped to change --on-no-face keep to quarantine went on with
    keep. Options that differ from the plan are refused, by name; the plan's own values and
    options that do not shape the output pass."""
    from anondata import cli
    from anondata.job import pipeline

    src, out = tmp_path / "faces.parquet", tmp_path / "out"
    write_face_parquet(src, 2)

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_run_job", interrupted)  # stopped right after its plan was written
    base = ["anonymize", str(src), "--out", str(out), "--recipient", identities["owner"][1],
            "--signing-key", identities["runner"][0], "--model", tiny_model, "--no-progress"]
    assert cli.main(base + ["--on-no-face", "keep"]) == 130 and (out / ".anondata-work" / "plan.json").is_file()
    capsys.readouterr()
    assert cli.main(base + ["--resume", "--on-no-face", "quarantine", "--steps=3", "--lossy"]) == 2  # abbreviated too
    err = capsys.readouterr().err
    assert ("--lossy-restore (the plan has lossless True); --on-no-face (the plan has on_no_face 'keep'); "
            "--steps (the plan has steps -1)") in err and err.count("\n") == 1, err
    assert cli.main(base + ["--resume", "--on-no-face", "keep", "--batch-size", "2", "--faces", "aligned"]) == 130


def test_the_work_folder_of_a_command_killed_outright_is_removed_by_the_next(tmp_path):
    """new_folder deletes its work folder on any exception, but a SIGKILL or power cut runs no
    cleanup: a killed restore left `.restored.*.tmp` holding original faces beside --out, and
    nothing ever removed it. The next new_folder for that folder removes those of dead processes
    (and leaves a live one's alone)."""
    from anondata import files

    child = subprocess.run([sys.executable, "-c", f"""
import os, signal
from anondata import files
with files.new_folder({str(tmp_path / 'restored')!r}) as work:
    (work / "face.png").write_bytes(b"an original face")
    os.kill(os.getpid(), signal.SIGKILL)
"""], env=subprocess_env(), capture_output=True)
    assert child.returncode == -signal.SIGKILL
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".restored.")]
    assert len(left) == 1 and (left[0] / "face.png").is_file()
    alive = tmp_path / f".restored.{files._host_tag()}.{os.getpid()}-other.tmp"  # a command still running
    alive.mkdir()
    with files.new_folder(tmp_path / "restored") as work:
        assert not left[0].exists() and alive.is_dir()
        (work / "f").write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "restored"]


def test_a_failed_new_folder_removes_the_parents_it_made(tmp_path):
    """`restore --out a/b/restored` that failed removed its work folder but left a/b behind."""
    from anondata import files

    with pytest.raises(RuntimeError):
        with files.new_folder(tmp_path / "a" / "b" / "restored") as work:
            (work / "face.png").write_bytes(b"x")
            raise RuntimeError("restore failed")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "mine").write_bytes(b"the user's")
    with pytest.raises(RuntimeError):
        with files.new_folder(tmp_path / "a" / "b" / "restored"):
            raise RuntimeError("restore failed")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["mine"]  # only what it made goes
