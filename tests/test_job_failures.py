"""Fail closed when anonymizing goes wrong in ways the library does not foresee: an unexpected
exception quarantines that record only; a record that kills its worker process is quarantined
and the job finishes (no endless restarts); a node that cannot load its detector stops the job
before any record is processed, and so does a device that fails on record after record, instead
of quarantining every record into a signed release."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from anondata.errors import SetupError
from conftest import FAST, damage_first_data_page, encode, synthetic_faces, write_face_parquet


def _actor(model, identities, **spec):
    from anondata.identity import load_recipient
    from anondata.job.worker import AnonymizerActor

    face_spec = {"mode": "aligned", "box": None, "detector": "hog", "on_no_face": "quarantine", "cross_check": None,
                 **spec}
    return AnonymizerActor(model=model, device="cpu", steps=2, inversion_iters=1, sign_cell=0, background="noised",
                           flip_centre="mean-face", model_batch=1, face_spec=face_spec, lossless=True,
                           recipients=[load_recipient(identities["owner"][1]).to_bytes()], dataset_id="ab" * 16)


def _batch(images, ids):
    from anondata.job.worker import ROW_SCHEMA

    n = len(ids)
    return pa.table({"split": ["train"] * n, "shard": [0] * n, "row": list(range(n)), "record_id": ids,
                     "image": [encode(a) for a in images], "error": [None] * n}, schema=ROW_SCHEMA)


def test_unexpected_exception_quarantines_only_that_record(tiny_model, identities, monkeypatch):
    """A RuntimeError (CUDA out of memory, a library bug) used to escape the worker and kill the
    job with a traceback. Now that record is quarantined, named, with the exception's type and a
    short message that carries no path or key-like text; Ctrl-C still stops."""
    from anondata import faces
    from anondata.job.worker import process_rows

    imgs = synthetic_faces(3, seed=3)
    real = faces.anonymize_photos

    def flaky(anon, images, keys, spec, **kw):
        if any(np.array_equal(im, imgs[1]) for im in images):
            raise RuntimeError(f"CUDA out of memory. Tried to allocate 2.00 GiB; see /home/someone/secret.log {'ab' * 32}")
        return real(anon, images, keys, spec, **kw)

    actor = _actor(tiny_model, identities)
    monkeypatch.setattr(faces, "anonymize_photos", flaky)
    out = process_rows(actor, _batch(imgs, ["r0", "r1", "r2"])).to_pylist()
    assert [r["status"] for r in out] == ["anonymized", "failed", "anonymized"]  # FAILED: quarantined, and counted
    assert out[1]["image"] is None and out[1]["envelopes"] is None
    reason = out[1]["reason"]
    assert reason.startswith("record 'r1': could not be anonymized: RuntimeError: CUDA out of memory. Tried to allocate")
    assert "/home" not in reason and "secret" not in reason and "abab" not in reason

    # The record's own key, in each form a library message could carry it: a reason is public.
    import base64

    for form in (repr, lambda k: repr(bytearray(k)), bytes.hex, lambda k: base64.b64encode(k).decode(),
                 lambda k: base64.urlsafe_b64encode(k).decode().rstrip("=")):
        seen = []

        def leaky(anon, images, keys, spec, form=form, seen=seen, **kw):
            if any(np.array_equal(im, imgs[1]) for im in images):
                seen.append(keys[[np.array_equal(im, imgs[1]) for im in images].index(True)])
                raise ValueError(f"bad value {form(seen[-1])} at step 3")
            return real(anon, images, keys, spec, **kw)

        monkeypatch.setattr(faces, "anonymize_photos", leaky)
        out = process_rows(actor, _batch(imgs, ["r0", "r1", "r2"])).to_pylist()
        reason, (k,) = out[1]["reason"], set(seen)
        assert out[1]["status"] == "failed" and reason.startswith("record 'r1': could not be anonymized: ValueError: bad value")
        shown = (repr(k)[2:-1], k.hex(), base64.b64encode(k).decode(), base64.urlsafe_b64encode(k).decode())
        assert not any(f[i:i + 8] in reason for f in shown for i in range(len(f) - 7)), reason  # no 8 characters of it

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(faces, "anonymize_photos", interrupted)
    with pytest.raises(KeyboardInterrupt):
        process_rows(actor, _batch(imgs[:1], ["r0"]))


def test_detector_setup_error_is_not_a_per_record_quarantine(tiny_model, identities, monkeypatch, tmp_path):
    """A detector that cannot load (no dlib on the node, no YuNet weights) used to quarantine
    every record. The actor now loads its detectors up front and fails; one that fails later
    marks its batch SETUP_FAILED, and the driver stops the job with the message."""
    from anondata import detect
    from anondata.job import pipeline
    from anondata.job.worker import RESULT_SCHEMA, SETUP_FAILED, process_rows

    with pytest.raises(SetupError, match="detector 'yunet' needs its ONNX weights"):
        _actor(tiny_model, identities, mode="detect", detector="yunet", cross_check=None)
    actor = _actor(tiny_model, identities, mode="detect", detector="hog", cross_check="haar")

    def no_dlib(name):
        raise SetupError("detector needs dlib, which is not installed; install the face extras")

    monkeypatch.setattr(detect, "get_detector", no_dlib)
    out = process_rows(actor, _batch(synthetic_faces(2), ["r0", "r1"])).to_pylist()
    assert {r["status"] for r in out} == {SETUP_FAILED} and "needs dlib" in out[0]["reason"]

    # the driver: such a batch stops the job, no shard is committed and nothing is signed
    from anondata.job.pipeline import JobOptions, run_anonymize

    monkeypatch.setattr(pipeline, "ensure_ray", lambda *a: None)
    monkeypatch.setattr(pipeline, "_dataset", lambda *a, **kw: None)
    monkeypatch.setattr(pipeline, "_results", lambda ds: iter([pa.Table.from_pylist(out, schema=RESULT_SCHEMA)]))
    write_face_parquet(tmp_path / "f.parquet", 2)
    with pytest.raises(SetupError, match="needs dlib"):
        run_anonymize(JobOptions(source=str(tmp_path / "f.parquet"), out=str(tmp_path / "out"),
                                 recipients=[identities["owner"][1]], signing_key=identities["runner"][0],
                                 model=tiny_model, progress=False, **FAST))
    assert not (tmp_path / "out").exists()  # nothing committed: nothing left for a --resume to be stuck on


def test_job_with_unloadable_detector_stops_before_any_record(ray_address, identities, tiny_model, tmp_path):
    from anondata.job.pipeline import JobOptions, run_anonymize

    write_face_parquet(tmp_path / "f.parquet", 2)
    with pytest.raises(SetupError, match="detector 'yunet' needs its ONNX weights"):
        run_anonymize(JobOptions(source=str(tmp_path / "f.parquet"), out=str(tmp_path / "out"),
                                 recipients=[identities["owner"][1]], signing_key=identities["runner"][0],
                                 model=tiny_model, faces="detect", detector="yunet", cross_check="none",
                                 progress=False, **FAST))
    assert not (tmp_path / "out").exists()  # nothing committed: nothing left for a --resume to be stuck on


@pytest.mark.parametrize("setting, message", [({"sign_cell": 99}, "sign_cell must be an integer in 0..32"),
                                              ({"steps": 1000}, "steps must be below the model's 1000")])
def test_settings_the_model_cannot_take_are_refused_before_any_worker_starts(identities, tiny_model, tmp_path,
                                                                              monkeypatch, setting, message):
    """They were found by each actor as it built the model: the job stopped only after Ray had
    started, under a traceback from every actor."""
    from anondata.errors import InputError
    from anondata.job import pipeline
    from anondata.job.pipeline import JobOptions, run_anonymize

    def no_ray(*a, **k):
        raise AssertionError("Ray was started for a job its settings had to refuse")

    monkeypatch.setattr(pipeline, "ensure_ray", no_ray)
    write_face_parquet(tmp_path / "f.parquet", 2)
    with pytest.raises(InputError, match=message):
        run_anonymize(JobOptions(source=str(tmp_path / "f.parquet"), out=str(tmp_path / "out"),
                                 recipients=[identities["owner"][1]], signing_key=identities["runner"][0],
                                 model=tiny_model, progress=False, **{**FAST, **setting}))
    assert not (tmp_path / "out").exists()


def test_new_job_on_a_damaged_source_fails_cleanly_and_leaves_no_folder(ray_address, identities, tiny_model, tmp_path):
    from anondata.errors import InputError
    from anondata.job.pipeline import JobOptions, run_anonymize

    write_face_parquet(tmp_path / "f.parquet", 2)
    damage_first_data_page(tmp_path / "f.parquet")
    (tmp_path / "out").mkdir()  # an empty folder the user made stays, empty
    with pytest.raises(InputError, match="rows 0-1 cannot be read"):
        run_anonymize(JobOptions(source=str(tmp_path / "f.parquet"), out=str(tmp_path / "out"),
                                 recipients=[identities["owner"][1]], signing_key=identities["runner"][0],
                                 model=tiny_model, progress=False, **FAST))
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.timeout(600)  # before the fix Ray restarted the worker and retried the record forever
def test_record_that_kills_its_worker_is_quarantined_and_the_job_finishes(ray_address, identities, tiny_model, tmp_path,
                                                                          monkeypatch):
    """Row 1 kills the worker process every time it is anonymized (SIGKILL, like a crash in native
    code). Ray used to restart the actor and retry forever; now the job finishes, row 1 is
    quarantined as a crash, its batch-mate row 0 and the rest are anonymized, once each."""
    from anondata.job.journal import CRASH_ENV
    from anondata.job.pipeline import JobOptions, run_anonymize
    from anondata.manifest import read_manifest, verify_release

    write_face_parquet(tmp_path / "f.parquet", 4)
    monkeypatch.setenv(CRASH_ENV, "anonymize:1")
    res = run_anonymize(JobOptions(source=str(tmp_path / "f.parquet"), out=str(tmp_path / "out"),
                                   recipients=[identities["owner"][1]], signing_key=identities["runner"][0],
                                   model=tiny_model, shard_size=2, batch_size=2, progress=False, **FAST))
    assert (res.anonymized, res.quarantined) == (3, 1)
    verify_release(tmp_path / "out")
    records = read_manifest(tmp_path / "out")["records"]
    assert [r["id"] for r in records] == ["rec-000", "rec-001", "rec-002", "rec-003"]
    assert [r["status"] for r in records] == ["anonymized", "quarantined", "anonymized", "anonymized"]
    assert records[1]["reason"] == "record 'rec-001': worker crashed while anonymizing this record"


def _driver_without_ray(monkeypatch, failing: set[str], workers: int = 1):
    """Run the job's driver with no Ray: each task's rows go through a real actor in this
    process (`workers` of them, in turn); the model step raises a CUDA-like RuntimeError on the
    records in `failing`."""
    from anondata import faces
    from anondata.job import pipeline
    from anondata.job.worker import AnonymizerActor, process_rows, read_shard_rows

    real, state = faces.anonymize_photos, {"fail": False}

    def device(anon, images, keys, spec, **kw):
        if state["fail"]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(anon, images, keys, spec, **kw)

    def dataset(tasks, source, opts, plan, recipients, batch_size=None, task_retries=0):
        actors = [AnonymizerActor(**pipeline.actor_kwargs(opts, plan, recipients, "cpu")) for _ in range(workers)]
        for i, actor in enumerate(actors):
            actor.worker = f"gpu-node-{i}"
        for i, t in enumerate(tasks):
            rows = read_shard_rows(pa.Table.from_pylist([t]), source)
            state["fail"] = set(rows.column("record_id").to_pylist()) <= failing
            yield process_rows(actors[i % workers], rows)

    monkeypatch.setattr(faces, "anonymize_photos", device)
    monkeypatch.setattr(pipeline, "ensure_ray", lambda *a: None)
    monkeypatch.setattr(pipeline, "_pool", lambda opts: (1, 0, "cpu"))
    monkeypatch.setattr(pipeline, "_dataset", dataset)
    monkeypatch.setattr(pipeline, "_results", lambda ds: ds)


def test_failures_in_a_row_stop_the_job_and_resume_redoes_them(tiny_model, identities, monkeypatch, tmp_path):
    """A device that fails on record after record (every call a CUDA error) used to quarantine
    every record into a signed release, for good. Three in a row now stop the job; the shards
    they are in are not committed, so --resume after the fix anonymizes them."""
    from anondata.errors import AnondataError
    from anondata.job.journal import Journal
    from anondata.job.pipeline import JobOptions, run_anonymize
    from anondata.manifest import read_manifest

    write_face_parquet(tmp_path / "f.parquet", 5)
    failing = {"rec-001", "rec-002", "rec-003"}
    _driver_without_ray(monkeypatch, failing)
    opts = dict(source=str(tmp_path / "f.parquet"), out=str(tmp_path / "out"), recipients=[identities["owner"][1]],
                signing_key=identities["runner"][0], model=tiny_model, shard_size=1, batch_size=1,
                max_failures_in_a_row=3, progress=False, **FAST)
    with pytest.raises(AnondataError, match=r"failed on 3 records in a row on worker gpu-node-0 \(the last: record 'rec-003': could not be "
                                            r"anonymized: RuntimeError: CUDA error.*run again with --resume"):
        run_anonymize(JobOptions(**opts))
    assert sorted(Journal(tmp_path / "out").committed()) == ["train-00000-of-00005"]  # rec-000 only
    assert not (tmp_path / "out" / "manifest.json").exists()

    failing.clear()  # the device is fixed
    res = run_anonymize(JobOptions(**opts, resume=True))
    assert (res.anonymized, res.quarantined, res.resumed_shards) == (5, 0, 1)
    assert [r["status"] for r in read_manifest(tmp_path / "out")["records"]] == ["anonymized"] * 5


@pytest.mark.parametrize("limit", [3, 0])
def test_failures_short_of_the_limit_are_quarantined(tiny_model, identities, monkeypatch, tmp_path, limit):
    """Two failures then a success (limit 3), or failures with the breaker off (0): the job
    finishes, each failed record quarantined with its reason, the others anonymized."""
    from anondata.job.pipeline import JobOptions, run_anonymize
    from anondata.manifest import read_manifest

    write_face_parquet(tmp_path / "f.parquet", 4)
    failing = {"rec-001", "rec-002"} if limit else {"rec-000", "rec-001", "rec-002", "rec-003"}
    _driver_without_ray(monkeypatch, failing)
    res = run_anonymize(JobOptions(source=str(tmp_path / "f.parquet"), out=str(tmp_path / "out"),
                                   recipients=[identities["owner"][1]], signing_key=identities["runner"][0],
                                   model=tiny_model, shard_size=1, batch_size=1, max_failures_in_a_row=limit,
                                   progress=False, **FAST))
    records = read_manifest(tmp_path / "out")["records"]
    assert [r["status"] == "quarantined" for r in records] == [r["id"] in failing for r in records]
    assert (res.anonymized, res.quarantined) == (4 - len(failing), len(failing))
    assert all("RuntimeError: CUDA error" in r["reason"] for r in records if r["id"] in failing)


def test_a_new_job_stopped_by_failures_leaves_nothing(tiny_model, identities, monkeypatch, tmp_path):
    from anondata.errors import AnondataError
    from anondata.job.pipeline import JobOptions, run_anonymize

    write_face_parquet(tmp_path / "f.parquet", 3)
    _driver_without_ray(monkeypatch, {"rec-000", "rec-001", "rec-002"})
    with pytest.raises(AnondataError, match="in a row .* run the same command again"):
        run_anonymize(JobOptions(source=str(tmp_path / "f.parquet"), out=str(tmp_path / "out"),
                                 recipients=[identities["owner"][1]], signing_key=identities["runner"][0],
                                 model=tiny_model, shard_size=2, batch_size=1, max_failures_in_a_row=2,
                                 progress=False, **FAST))
    assert not (tmp_path / "out").exists()


def test_one_bad_gpu_among_good_ones_stops_the_job(tiny_model, identities, monkeypatch, tmp_path):
    """Two workers take records in turn and the second one's device fails on each: in arrival
    order failures never come twice in a row, yet that worker fails three in a row: the job stops
    and names it, instead of quarantining half of the dataset for good."""
    from anondata.errors import AnondataError
    from anondata.job.pipeline import JobOptions, run_anonymize

    write_face_parquet(tmp_path / "f.parquet", 7)
    _driver_without_ray(monkeypatch, {"rec-001", "rec-003", "rec-005"}, workers=2)
    with pytest.raises(AnondataError, match="failed on 3 records in a row on worker gpu-node-1 .*'rec-005'"):
        run_anonymize(JobOptions(source=str(tmp_path / "f.parquet"), out=str(tmp_path / "out"),
                                 recipients=[identities["owner"][1]], signing_key=identities["runner"][0],
                                 model=tiny_model, shard_size=1, batch_size=1, max_failures_in_a_row=3,
                                 progress=False, **FAST))


def test_a_row_delivered_again_after_its_shard_was_committed_is_ignored(tiny_model, identities, monkeypatch, tmp_path):
    """Ray may deliver a retried task's rows twice, the second copy with another key and image.
    One that came after its shard had been committed opened a new entry for that shard: never
    complete (the job ended, every shard written, with "unfinished shards ...; run again with
    --resume"), or, for a shard of one row, complete again, and the shard was written a second
    time over its marker (a kill between its data and keys files left images whose envelopes are
    gone)."""
    from anondata.job import pipeline
    from anondata.job.pipeline import JobOptions, run_anonymize
    from anondata.manifest import read_manifest

    write_face_parquet(tmp_path / "f.parquet", 3)
    _driver_without_ray(monkeypatch, set())
    dataset, commit, commits = pipeline._dataset, pipeline.commit_shard, []

    def again(*a, **kw):
        batches = list(dataset(*a, **kw))
        yield from batches + [batches[0], batches[-1]]  # rows 0 and 2 again, after their shards' commits

    def counted(name, *a, **kw):
        commits.append(name)
        return commit(name, *a, **kw)

    monkeypatch.setattr(pipeline, "_dataset", again)
    monkeypatch.setattr(pipeline, "commit_shard", counted)
    res = run_anonymize(JobOptions(source=str(tmp_path / "f.parquet"), out=str(tmp_path / "out"),
                                   recipients=[identities["owner"][1]], signing_key=identities["runner"][0],
                                   model=tiny_model, shard_size=2, batch_size=1, progress=False, **FAST))
    assert (res.anonymized, res.quarantined, res.shards) == (3, 0, 2)
    assert commits == ["train-00000-of-00002", "train-00001-of-00002"]  # each once
    assert [r["status"] for r in read_manifest(tmp_path / "out")["records"]] == ["anonymized"] * 3


def test_the_actor_pool_is_no_larger_than_its_tasks(identities, tiny_model, monkeypatch):
    """Each actor loads the model. The pass that redoes the rows of a crashed batch one by one
    (often one row), a short --resume or a small source on a many-GPU cluster started an actor
    for every GPU or CPU anyway: model loads for nothing, and Ray Data's warning that the pool's
    minimum size 'won't fully utilize' its inputs on the runner's terminal."""
    import types

    import ray.data

    from anondata.identity import load_recipient
    from anondata.job import pipeline
    from anondata.job.pipeline import JobOptions

    sizes = []

    class Dataset:
        context = types.SimpleNamespace()

        def map_batches(self, fn, **kw):
            return self

    real = ray.data.ActorPoolStrategy
    monkeypatch.setattr(ray.data, "from_items", lambda items, **kw: Dataset())
    monkeypatch.setattr(ray.data, "ActorPoolStrategy", lambda **kw: sizes.append(kw["size"]) or real(**kw))
    monkeypatch.setattr(pipeline, "_pool", lambda opts: (4, 1, "cuda"))
    opts = JobOptions(source="-", out="-", recipients=[], signing_key="-", model=tiny_model)
    plan, recipients = {"dataset_id": "ab" * 16}, [load_recipient(identities["owner"][1])]
    task = {"split": "train", "shard": 0, "start": 0, "stop": 1}
    for n in (1, 3, 4, 9):
        pipeline._dataset([task] * n, None, opts, plan, recipients)
    assert sizes == [1, 3, 4, 4]
