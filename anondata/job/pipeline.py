"""The anonymize job: plan, run on Ray Data, commit shards, sign the release.

Shape: `ray.data.from_items(read tasks, one per batch of a shard)` -> `map_batches(read_shard_rows)`
(workers read their own rows) -> `map_batches(AnonymizerActor, compute=ActorPoolStrategy(size=N), num_gpus=1 or 0,
batch_size=B)` -> the driver iterates results, groups them by shard, and commits each shard
(data file, keys file, marker) as soon as all its rows are back. The same code runs on a
laptop's CPUs (num_gpus=0) and on a GPU cluster (`RAY_ADDRESS` set, one actor per GPU).
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from .. import canonical
from ..errors import AnondataError, FormatError, InputError, SetupError
from . import card as card_mod
from .journal import CRASH_ENV, Journal, WORK, crash_hook
from .shards import (
    DERIVED_ID_COLUMN,
    build_public_table,
    data_path,
    keys_path,
    output_schema,
    shard_name,
    write_parquet_atomic,
)
from .sources import Source, choose_columns, derived_id, open_source

DEFAULT_SHARD_SIZE = 1000
MAX_REASON = 1000  # the manifest's limit on a quarantine reason


@dataclass
class JobOptions:
    source: str
    out: str
    recipients: list[str]  # paths of NAME.pub files
    signing_key: str  # path of the runner's NAME.key (signs the manifest)
    image_column: str = "image"
    id_column: str | None = None
    splits: list[str] | None = None
    limit: int | None = None
    # Other columns that can hold pictures: left out of the release, or published unchanged on the
    # runner's word that they hold no faces (sources.choose_columns refuses any not named here)
    drop_columns: list[str] = field(default_factory=list)
    keep_columns: list[str] = field(default_factory=list)
    model: str = "embedded"
    steps: int | None = None
    inversion_iters: int | None = None
    sign_cell: int = 0  # 0: a sign per value (the default); N >= 1: cells of N (docs/SCHEME.md)
    background: str = "noised"  # scheme v3 (the default); "inverted": v1 / v2, to reproduce older releases
    flip_centre: str = "mean-face"  # v3: what the flip reflects around (anonymizer.FLIP_CENTRES)
    faces: str = "aligned"  # aligned | detect
    face_box: tuple[int, int, int, int] | None = None
    detector: str = "hog"
    on_no_face: str = "quarantine"
    # detect: a second detector whose extra faces quarantine the photo. "auto": the other of hog /
    # haar (fail closed by default: a face the first one misses would be published), None: off
    cross_check: str | None = "auto"
    lossless: bool = True
    gpus: int | None = None  # None: every GPU the cluster has
    workers: int | None = None  # CPU actors when there are no GPUs; None: CPUs - 1
    batch_size: int = 8  # records per actor call
    # Stop the job when the model step fails on this many records in a row (0: never; _Breaker)
    max_failures_in_a_row: int = 10
    # Crops per model call (the core pads every call to this shape and records it, so restore
    # recomputes each crop exactly as it was made). None: 1 on CPU actors, batch_size on GPUs.
    model_batch: int | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    resume: bool = False
    license: str = "other"
    progress: bool = True
    num_cpus: int | None = None  # for a local Ray instance started here
    extra: dict = field(default_factory=dict)


@dataclass
class JobResult:
    out: str
    dataset_id: str
    anonymized: int
    quarantined: int
    shards: int
    resumed_shards: int
    skipped: int = 0  # past --limit: listed in the manifest, not processed
    # (record id, reason, where) of each quarantined record, for the runner's terminal; `where`:
    # Source.where (an image folder's file), or None
    quarantine: list[tuple[str, str, str | None]] = field(default_factory=list)


# ------------------------------------------------------------------------------ planning


def _load_keys(opts: JobOptions):
    from ..identity import load_identity, load_recipient

    if not opts.recipients:
        raise InputError("no --recipient: give the public key (NAME.pub) of whoever may restore the records")
    recipients = [load_recipient(p) for p in opts.recipients]
    fps = [r.fingerprint for r in recipients]
    if len(set(fps)) != len(fps):
        raise InputError("the same --recipient is given twice")
    signer = load_identity(opts.signing_key)
    return recipients, signer


def _face_spec(opts: JobOptions) -> dict:
    if opts.faces not in ("aligned", "detect"):
        raise InputError(f"--faces must be aligned or detect, not {opts.faces!r}")
    if opts.on_no_face not in ("quarantine", "keep"):
        raise InputError(f"--on-no-face must be quarantine or keep, not {opts.on_no_face!r}")
    cross_check = opts.cross_check
    if cross_check == "auto":
        cross_check = ("haar" if opts.detector == "hog" else "hog") if opts.faces == "detect" else None
    elif cross_check == "none":
        cross_check = None
    return {
        "mode": opts.faces,
        "box": list(opts.face_box) if opts.face_box else None,
        "detector": opts.detector,
        "on_no_face": opts.on_no_face,
        "cross_check": cross_check,
    }


def _precheck(opts: JobOptions) -> None:
    """What the workers would otherwise fail on, checked once here with a clean message:
    the face options and whether the model can be found (not loaded: that is the actors' job)."""
    from ..faces import FaceSpec

    spec = _face_spec(opts)
    FaceSpec(**{**spec, "box": tuple(spec["box"]) if spec["box"] else None})
    if opts.batch_size < 1 or (opts.model_batch is not None and opts.model_batch < 1):
        raise InputError("--batch-size must be at least 1")
    from ..backends import check_model

    check_model(opts.model)


def make_plan(source: Source, opts: JobOptions, recipients, signer) -> dict:
    """Fix everything that decides the output before any record is processed."""
    from ..envelope import check_record_id

    if opts.shard_size < 1:
        raise InputError(f"--shard-size must be at least 1, not {opts.shard_size}")
    seen: dict[str, str] = {}
    splits = []
    all_ids = {}
    for s in source.splits:
        # every row, past --limit too: the manifest lists those as skipped, so their ids must be
        # valid and unique like the others, and the source's fingerprint covers them
        ids = all_ids[s.name] = source.ids(s.name, all_rows=True)
        for row, rid in enumerate(ids):
            try:
                check_record_id(rid)
            except FormatError as e:
                raise InputError(f"split {s.name!r} row {row}: {e}; fix the id column or pass --id-column") from None
            if rid in seen:
                raise InputError(
                    f"record id {rid!r} appears twice (split {seen[rid]!r} and split {s.name!r} row {row}); "
                    "ids must be unique: fix the id column or pass --id-column"
                )
            seen[rid] = s.name
        n = s.rows
        if n == 0:
            continue
        count = -(-n // opts.shard_size)
        shards = [
            {"name": shard_name(s.name, i, count), "start": i * opts.shard_size, "stop": min(n, (i + 1) * opts.shard_size)}
            for i in range(count)
        ]
        splits.append({"name": s.name, "rows": n, "shards": shards, "skipped": ids[n:]})
    return {
        "dataset_id": secrets.token_hex(16),
        "source": source.describe(),
        "source_fingerprint": source.fingerprint(all_ids),
        "recipients": sorted(r.fingerprint for r in recipients),
        "signer": signer.recipient.fingerprint,
        "options": {
            "model": opts.model,
            "steps": opts.steps if opts.steps is not None else -1,
            "inversion_iters": opts.inversion_iters if opts.inversion_iters is not None else -1,
            "sign_cell": opts.sign_cell,
            "background": opts.background,
            "flip_centre": opts.flip_centre,
            "faces": _face_spec(opts),
            "lossless": opts.lossless,
            "shard_size": opts.shard_size,
            "limit": opts.limit or 0,
            "drop_columns": sorted(set(opts.drop_columns)),
            "keep_columns": sorted(set(opts.keep_columns)),
            "image_column": opts.image_column,
            "id_column": opts.id_column or "",
            "splits": opts.splits or [],
            "license": opts.license,
        },
        "splits": splits,
    }


def _resume_checks(plan: dict, source: Source, recipients, signer) -> None:
    if plan["source"] != source.describe():
        raise InputError(
            f"--resume: the source does not match the interrupted job's plan ({plan['source']['location']}, "
            f"splits {plan['source']['splits']}); give the same SRC and options"
        )
    if plan["recipients"] != sorted(r.fingerprint for r in recipients):
        raise InputError("--resume: the --recipient keys differ from the interrupted job's; give the same ones")
    if plan["signer"] != signer.recipient.fingerprint:
        raise InputError("--resume: the --signing-key differs from the interrupted job's; give the same one")
    _same_source_contents(plan, source)


def _same_source_contents(plan: dict, source: Source) -> None:
    """describe() only sees row counts; a resumed job reads rows by position, so a renamed or
    replaced file would publish one record twice and never process another."""
    want = plan.get("source_fingerprint")
    if want is None:
        # A plan from before the fingerprint. Refusing would strand every job interrupted across
        # the upgrade, and the row counts were still checked: go on, and say what is unchecked.
        print("warning: --resume: this job was planned by an earlier anondata, which kept no fingerprint of "
              "the source's contents; make sure its files have not changed since the job started", file=sys.stderr)
        return
    have = source.fingerprint()
    changed = [] if want["columns"] == have["columns"] else ["its columns or their types"]
    for name, w in want["splits"].items():
        h = have["splits"].get(name, {})
        if w["ids"] != h.get("ids"):
            changed.append(f"split {name!r}: its record ids (values or order)")
        if w["files"] != h.get("files"):
            changed.append(f"split {name!r}: its files (names, sizes or Parquet footers)")
    if changed:
        raise InputError(
            f"--resume: the source {source.location} changed since the job started ({'; '.join(changed)}); the "
            "written shards hold its old rows, so resuming would publish some records twice and never process "
            "others: put the source back as it was, or start a new job"
        )


def _same_model_as_committed(model: str, committed: dict) -> None:
    """A release has one model, so a resumed job must finish with the weights its written shards
    used. The plan names the model ("embedded", a folder), not its weights, and an upgrade of
    anondata changes what "embedded" is: check before any work rather than fail at the end."""
    from ..backends import EARLIER_EMBEDDED, model_sha256

    theirs = {canonical.loads(c["model"].encode(), "model info")["model"]["sha256"] for c in committed.values()}
    ours = model_sha256(model)
    if theirs != {ours}:
        old = sorted(theirs - {ours})[0]
        hint = (f" (the embedded prior of anondata {EARLIER_EMBEDDED[old]}: finish the job with that version)"
                if old in EARLIER_EMBEDDED else "")
        raise InputError(
            f"--resume: the job's model {model!r} now has weights sha256 {ours[:12]}…, its written shards used "
            f"{old[:12]}…{hint}; resume with the same weights, or start a new job"
        )


def _same_marker_as_committed(opts: JobOptions, plan: dict, recipients, committed: dict) -> None:
    """Every shard's marker records the model, its settings and the device (lossless restore is
    bit-exact only on the kind of device that made a record), and the release must have one of
    each: a difference found at the end would cost the whole run and leave the job unfinishable.
    So build what this run's actors would write, with the actor itself, before any work. A job
    whose shards so far ran on CPU stays on CPU unless --gpus says otherwise (the markers pin the
    device: the plan is written before Ray is up, so it cannot know it)."""
    import torch

    from .worker import AnonymizerActor

    written = {c["model"] for c in committed.values()}
    if len(written) != 1:
        raise InputError("--resume: the written shards disagree on the model, settings or device; start a new job")
    theirs = canonical.loads(written.pop().encode(), "model info")
    ensure_ray(opts.num_cpus)
    if theirs.get("device") == "cpu" and opts.gpus is None:
        opts.gpus = 0
    device = _pool(opts)[2]
    threads = torch.get_num_threads()
    try:  # on CPU whatever the device: the string holds the device by name, and the driver may have no GPU
        actor = AnonymizerActor(**{**actor_kwargs(opts, plan, recipients, "cpu"), "model_batch": 1})
        ours = {**canonical.loads(actor.model_json.encode(), "model info"), "device": device}
    finally:
        torch.set_num_threads(threads)
    diffs = []
    if theirs.get("device") != ours["device"]:
        fix = ("resume with --gpus 0" if theirs.get("device") == "cpu"
               else "resume where the Ray cluster has GPUs (RAY_ADDRESS) and without --gpus 0")
        diffs.append(f"device: the written shards were made on {theirs.get('device')}, this run would use "
                     f"{ours['device']} ({fix})")
    if theirs.get("model") != ours["model"]:
        diffs.append(f"model: the written shards used {theirs.get('model')}, this run {ours['model']}")
    old, new = theirs.get("settings") or {}, ours["settings"]
    changed = [f"{k} {old.get(k, '(none)')} -> {new.get(k, '(none)')}" for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k)]
    if changed:
        diffs.append(f"settings: {', '.join(changed)} (the model folder's anondata.json or anondata itself "
                     "changed: put it back as it was)")
    for k in sorted(set(theirs) | set(ours)):
        if k not in ("device", "model", "settings") and theirs.get(k) != ours.get(k):
            diffs.append(f"{k}: {theirs.get(k)} -> {ours.get(k)}")
    if diffs:
        raise InputError(
            "--resume: this run would not make records like the written shards, and one release holds one model, "
            f"setting and device; nothing was processed. {'; '.join(diffs)}; or start a new job"
        )


def _options_from_plan(opts: JobOptions, plan: dict) -> JobOptions:
    """On --resume everything that shapes the output comes from the plan, not the command line."""
    o = plan["options"]
    f = o["faces"]
    opts.model = o["model"]
    opts.steps = None if o["steps"] < 0 else o["steps"]
    opts.inversion_iters = None if o["inversion_iters"] < 0 else o["inversion_iters"]
    # A plan without sign_cell is from before scheme v2 (its records are v1); -1 is how plans of
    # the first v2 release wrote "the default", which was a sign per value.
    opts.sign_cell = max(0, o.get("sign_cell", 0))
    opts.background = o.get("background", "inverted")  # a plan without it is from before scheme v3
    opts.flip_centre = o.get("flip_centre", "mean-face")
    opts.faces, opts.detector, opts.on_no_face = f["mode"], f["detector"], f["on_no_face"]
    opts.cross_check = f.get("cross_check")
    opts.face_box = tuple(f["box"]) if f["box"] else None
    opts.lossless = o["lossless"]
    opts.shard_size = o["shard_size"]
    opts.limit = o["limit"] or None
    # a plan without them is from before the check of the other columns (choose_columns)
    opts.drop_columns, opts.keep_columns = o.get("drop_columns", []), o.get("keep_columns", [])
    opts.image_column = o["image_column"]
    opts.id_column = o["id_column"] or None
    opts.splits = o["splits"] or None
    opts.license = o["license"]
    return opts


# ------------------------------------------------------------------------------ Ray


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (e.g. `auto` after `ray start --head`), else
    start a private local instance. An already initialised Ray (tests) is used as is."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    kwargs = dict(logging_level="WARNING", log_to_driver=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Ray turns token authentication on for a new local instance (good) and warns that it
        # did so on every run (noise on the runner's terminal): that one line is dropped.
        import logging

        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
            lambda rec: not rec.getMessage().startswith("Token authentication is enabled for this Ray cluster"))
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)


def _pool(opts: JobOptions) -> tuple[int, int, str]:
    """(actors, gpus per actor, device). One actor per GPU; without GPUs, CPU actors leaving
    one CPU for the read tasks."""
    import ray

    res = ray.cluster_resources()
    have_gpus = int(res.get("GPU", 0))
    gpus = have_gpus if opts.gpus is None else opts.gpus
    if gpus > have_gpus:
        raise InputError(f"--gpus {gpus}: the Ray cluster has {have_gpus} GPU(s)")
    if gpus > 0:
        return gpus, 1, "cuda"
    cpus = int(res.get("CPU", 1))
    workers = opts.workers or max(1, cpus - 1)
    return workers, 0, "cpu"


def actor_kwargs(opts: JobOptions, plan: dict, recipients, device: str) -> dict:
    """What each AnonymizerActor of this job is built with."""
    return {
        "model": opts.model,
        "device": device,
        "steps": opts.steps,
        "inversion_iters": opts.inversion_iters,
        "sign_cell": opts.sign_cell,
        "background": opts.background,
        "flip_centre": opts.flip_centre,
        "model_batch": opts.model_batch or (opts.batch_size if device == "cuda" else 1),
        "face_spec": _face_spec(opts),
        "lossless": opts.lossless,
        "recipients": [r.to_bytes() for r in recipients],
        "dataset_id": plan["dataset_id"],
    }


def _dataset(tasks: list[dict], source: Source, opts: JobOptions, plan: dict, recipients,
             batch_size: int | None = None, task_retries: int = 0):
    """batch_size: records per actor call (default opts.batch_size; the model batch stays the
    same, it is part of every record). task_retries: how often Ray re-runs a batch whose actor
    process died; a batch that still fails is dropped, not the job (see _run_shards)."""
    import ray
    import ray.data

    from .worker import AnonymizerActor, read_shard_rows

    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # ours is the tqdm bar in the driver: no "progress bars disabled" warning for turning Ray's off
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours is the tqdm bar in the driver
    for attr in ("enable_operator_progress_bars", "print_on_execution_start"):
        if hasattr(ctx, attr):
            setattr(ctx, attr, False)
    actors, gpus, device = _pool(opts)
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    ds = ds.map_batches(
        read_shard_rows, batch_size=1, batch_format="pyarrow", fn_kwargs={"source": source},
        # IO-bound: num_cpus=0 so reads never wait for the CPUs the actors hold; the pool size
        # bounds how many shards are read ahead.
        num_cpus=0, compute=ray.data.TaskPoolStrategy(size=min(len(tasks), max(2, actors))),
    )
    # Ray Data's default for actors is max_restarts=-1 with max_task_retries=-1: a record that
    # kills its worker process is retried forever. Restarts stay unbounded (each one follows a
    # crash that cost a task its retries, so they are bounded by the tasks, and a pool actor out
    # of restarts would not be replaced); the retries of each task are bounded. Ray (2.60) takes
    # these only as **ray_remote_args, deprecated without a named replacement yet: hence the filter.
    remote = {"max_restarts": -1, "max_task_retries": task_retries}
    if os.environ.get(CRASH_ENV, "").startswith("anonymize:"):  # test hook: workers read it (journal.crash_hook)
        remote["runtime_env"] = {"env_vars": {CRASH_ENV: os.environ[CRASH_ENV]}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(
            AnonymizerActor,
            # isolating (batch_size 1): one record in flight per actor, so a record that kills its
            # actor takes no queued batch-mate down with it (_run_shards)
            compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1 if batch_size == 1 else None),
            num_gpus=gpus,
            num_cpus=1 if gpus == 0 else None,
            batch_size=batch_size or opts.batch_size,
            batch_format="pyarrow",
            **remote,
            fn_constructor_kwargs=actor_kwargs(opts, plan, recipients, device),
        )
    ds.context.max_errored_blocks = -1  # a failed block is dropped; _run_shards redoes its rows
    return ds


# ------------------------------------------------------------------------------ the job


def _finished(out: Path, signing_key: str) -> JobResult:
    from ..identity import load_identity
    from ..manifest import open_release

    m = open_release(out, load_identity(signing_key).recipient, keep_envelopes=False).manifest
    Journal(out).remove()  # leftovers of a kill while the finished job was cleaning up
    c = m["counts"]
    quarantine = [(r["id"], r["reason"], None) for r in m["records"] if r["status"] == "quarantined"]
    return JobResult(str(out), m["dataset_id"], c["anonymized"], c["quarantined"], len(m["shards"]), len(m["shards"]),
                     c["skipped"], quarantine)


def _only_planless_work(out: Path, journal: Journal) -> bool:
    return [p.name for p in out.iterdir()] == [WORK] and not journal.exists()


def run_anonymize(opts: JobOptions) -> JobResult:
    out = Path(opts.out)
    journal = Journal(out)
    if opts.resume:
        if not journal.exists():
            if (out / "manifest.json").is_file():
                return _finished(out, opts.signing_key)  # killed after the release was complete: nothing to redo
            if out.exists() and _only_planless_work(out, journal):
                raise InputError(f"{out}: the job was stopped before its plan was written; run again without --resume")
            raise InputError(f"{out} has no interrupted job to resume ({WORK}/plan.json is missing)")
        plan = journal.load()
        opts = _options_from_plan(opts, plan)
    elif out.exists() and _only_planless_work(out, journal):
        journal.remove()  # killed while creating the plan: nothing was done yet
    if not opts.resume and out.exists() and any(out.iterdir()):
        hint = (
            "an interrupted job is there: pass --resume to finish it"
            if journal.exists()
            else "choose a new --out folder"
        )
        raise InputError(f"output folder {out} is not empty; {hint}")
    recipients, signer = _load_keys(opts)
    _precheck(opts)
    source = open_source(
        opts.source, image_column=opts.image_column, id_column=opts.id_column, splits=opts.splits, limit=opts.limit
    )
    if source.fs is None and Path(opts.source).is_dir():  # a folder source: every file below it is read
        inner, outer = Path(os.path.realpath(out)), Path(os.path.realpath(opts.source))
        if inner == outer or outer in inner.parents:
            raise InputError(f"--out {out} is inside the source folder {source.location}: the release's files would "
                             "be read as the source's (and it is for publishing); choose a folder outside it")
    try:
        choose_columns(source, opts.drop_columns, opts.keep_columns)
    except InputError as e:
        if opts.resume and "drop_columns" not in plan["options"]:  # its --drop-column would be ignored: not in the plan
            raise InputError(f"{e}. This job was planned by an earlier anondata, whose written shards publish such "
                             "columns unchanged: start a new job with those options") from None
        raise
    if opts.resume:
        _resume_checks(plan, source, recipients, signer)
    else:
        plan = make_plan(source, opts, recipients, signer)
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        journal.create(plan)
        try:
            return _run_job(out, journal, plan, opts, source, recipients, signer)
        except AnondataError:
            # A new job that fails before its first shard is committed (a model that does not
            # load, a detector missing on the workers, an unreadable source) leaves nothing behind:
            # the next run may then change the options, which --resume would take from the plan.
            if not journal.committed():  # --out was empty or absent before this run (checked above)
                for child in list(out.iterdir()):
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
                if created:
                    out.rmdir()
            raise
    return _run_job(out, journal, plan, opts, source, recipients, signer)


def _run_job(out: Path, journal: Journal, plan: dict, opts: JobOptions, source, recipients, signer) -> JobResult:
    committed = journal.committed()
    if opts.resume and committed:
        _same_model_as_committed(opts.model, committed)
    shard_info = {}
    tasks = []
    for s in plan["splits"]:
        for i, sh in enumerate(s["shards"]):
            shard_info[sh["name"]] = (s["name"], sh)
            if sh["name"] not in committed:
                # one read task per batch, not per shard: results (and the progress bar) then come
                # back batch by batch instead of a whole shard at a time
                for a in range(sh["start"], sh["stop"], opts.batch_size):
                    tasks.append({"split": s["name"], "shard": i, "start": a, "stop": min(a + opts.batch_size, sh["stop"])})
    total = sum(s["rows"] for s in plan["splits"])
    done = sum(len(m["records"]) for m in committed.values())
    resumed = len(committed)

    if tasks and opts.resume and committed:
        _same_marker_as_committed(opts, plan, recipients, committed)
    if tasks:
        _run_shards(tasks, source, opts, plan, recipients, journal, shard_info, total, done)
    return _finalize(out, journal, plan, signer, recipients, resumed, source)


def _run_shards(tasks, source, opts, plan, recipients, journal, shard_info, total, done) -> None:
    """Run the tasks, committing each shard as soon as all its rows are back.

    A batch whose worker process dies (a crash in native code, the OOM killer; Python errors are
    quarantined per record by the worker) must neither kill the job nor loop. Ray drops such a
    batch (max_errored_blocks); its rows are then redone one record per task, so the record that
    crashes is alone in its task (and alone on its actor: one task in flight per actor there, so
    no other record waits on an actor that it takes down) and the others come back; a record
    that still has no result after that (and a retry) is quarantined here, "worker crashed while
    anonymizing this record".
    Not "stop and --resume": resume would redo the same shard and crash on the same record again.
    Every record still gets exactly one result, and a shard is committed only once it has all of
    them, so resume is unchanged. Unless many fail in a row: then _Breaker stops the job."""
    from tqdm import tqdm

    from .worker import SETUP_FAILED

    ensure_ray(opts.num_cpus)
    breaker = _Breaker(opts.max_failures_in_a_row, journal)
    complete: list[str] = []  # shards with all their rows back, waiting for a healthy moment to commit
    schema = output_schema(source.schema, source.image_column, add_id=source.id_column is None)
    by_index = {(s["name"], i): sh["name"] for s in plan["splits"] for i, sh in enumerate(s["shards"])}
    pending: dict[str, dict[int, dict]] = {}
    finished: set[str] = set()
    models = [m["model"] for m in journal.committed().values()][:1]  # one, for rows no actor returned
    commits = 0
    bar = tqdm(total=total, initial=done, unit="rec", desc="anonymize", disable=not opts.progress,
               file=sys.stderr, dynamic_ncols=True)

    def take(rows: list[dict], last: bool = False) -> None:
        nonlocal commits
        for r in rows:
            if r["status"] == SETUP_FAILED:  # this node cannot anonymize at all: stop, do not quarantine
                raise SetupError(r["reason"])
            breaker.see(r)
            if not models:
                models.append(r["model"])
            name = by_index[(r["split"], r["shard"])]
            got = pending.setdefault(name, {})
            if r["row"] not in got:  # a retried task may deliver a row twice: keep one
                got[r["row"]] = r
                bar.update(1)
                split, sh = shard_info[name]
                if len(got) == sh["stop"] - sh["start"]:
                    complete.append(name)
        if breaker.healthy or last:
            for name in complete:
                split, sh = shard_info[name]
                _commit_shard(name, split, sh, pending.pop(name), source, schema, journal, plan, commits + 1)
                finished.add(name)
                commits += 1
                crash_hook("commit", commits)
            complete.clear()

    def missing() -> list[dict]:
        """One task per row that has no result yet."""
        out = []
        for t in tasks:
            name = by_index[(t["split"], t["shard"])]
            if name not in finished:
                got = pending.get(name, {})
                out += [{**t, "start": row, "stop": row + 1} for row in range(t["start"], t["stop"]) if row not in got]
        return out

    try:
        for batch in _results(_dataset(tasks, source, opts, plan, recipients)):
            take(batch.to_pylist())
        if left := missing():
            for batch in _results(_dataset(left, source, opts, plan, recipients, batch_size=1, task_retries=1)):
                take(batch.to_pylist())
        take([_crashed(t, source, models) for t in missing()], last=True)
    finally:
        bar.close()
    if pending:
        raise AnondataError(f"the job ended with unfinished shards ({', '.join(sorted(pending))}); run again with --resume")


class _Breaker:
    """Stops the job when the model step fails on `limit` records in a row on one worker
    (worker.FAILED: an unforeseen exception, or a crash on the record alone). Then its device or
    the installation is broken, not the records, and going on would quarantine every record it
    gets into a signed release, for good (per worker: one bad GPU among good ones would otherwise
    never fail twice in a row in the arrival order). While any worker is in such a run, finished
    shards are held back (`healthy` is false), so a stop leaves those records unwritten and
    --resume redoes them after the fix; a record that goes through on that worker (anonymized, or
    quarantined for a reason of its own) ends its run, and held shards are committed with their
    failures quarantined."""

    def __init__(self, limit: int, journal: Journal):
        self.limit, self.journal = limit, journal
        self.failed: dict[str, list[str]] = {}  # worker -> reasons of its current run of failures

    @property
    def healthy(self) -> bool:
        return not self.failed

    def see(self, row: dict) -> None:
        from .worker import FAILED

        worker = row.get("worker") or "?"
        if row["status"] != FAILED:
            self.failed.pop(worker, None)
            return
        run = self.failed.setdefault(worker, [])
        run.append(row["reason"])
        if self.limit and len(run) >= self.limit:
            again = ("run again with --resume" if self.journal.committed()
                     else "run the same command again")
            raise AnondataError(
                f"the model step failed on {len(run)} records in a row on worker {worker} (the last: {run[-1]}); "
                "that points at its device or the installation, not the records, so the job stopped instead of "
                f"quarantining them all. The records since the first of them were not written: fix the cause and "
                f"{again} (--max-failures-in-a-row 0 quarantines such records and goes on)"
            )


def _crashed(task: dict, source: Source, models: list[str]) -> dict:
    """The result of a record that crashed its worker on its own: quarantined. Its row is read
    here first: a row that cannot be read (a source error, which also drops a task) stops the job
    with that error instead, as it would have without the crash handling."""
    from .worker import FAILED, read_shard_rows

    (row,) = read_shard_rows(pa.Table.from_pylist([task]), source).to_pylist()
    rid = row["record_id"]
    if not models:
        raise AnondataError(f"the workers crashed on every record they were given (first: {rid!r}), "
                            "nothing was anonymized: check the installation and model, then run again with --resume")
    return {"split": row["split"], "shard": row["shard"], "row": row["row"], "record_id": rid, "status": FAILED,
            "reason": f"record {rid!r}: worker crashed while anonymizing this record", "image": None,
            "envelopes": None, "faces": 0, "model": models[0], "worker": "(crashed)"}


def _results(ds):
    """The result batches; a user error raised on a worker (a model that does not load, a bad
    --face-box) comes back as that AnondataError, not as a Ray traceback."""
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
    except AnondataError:
        raise
    except Exception as e:  # noqa: BLE001 - Ray wraps worker errors in its own types
        user = _user_error(e)
        if user is None:
            raise
        raise user from None


def _user_error(e: BaseException, depth: int = 0) -> AnondataError | None:
    if isinstance(e, AnondataError):
        return type(e)(str(e))
    if depth > 8 or e is None:
        return None
    for nxt in (getattr(e, "cause", None), e.__cause__, e.__context__, getattr(e, "base_exception", None)):
        if isinstance(nxt, BaseException) and nxt is not e:
            found = _user_error(nxt, depth + 1)
            if found is not None:
                return found
    text = str(e)
    for cls in (SetupError, InputError, FormatError):
        marker = f"anondata.errors.{cls.__name__}: "
        if marker in text:  # actor creation failures arrive as text only
            return cls(text.split(marker, 1)[1].strip().splitlines()[0])
    return None


def _commit_shard(name, split, sh, got: dict[int, dict], source: Source, schema: pa.Schema, journal: Journal, plan,
                  ordinal: int) -> None:
    """Data file, then keys file, then the marker: a shard without a marker is redone."""
    from ..envelope import envelope_schema, write_envelope_table

    from .worker import envelopes_from_ipc

    start, stop = sh["start"], sh["stop"]
    rows = [got[i] for i in range(start, stop)]
    base_cols = [c for c in source.schema.names if c != source.image_column]
    base = source.read(split, start, stop, base_cols) if base_cols else pa.table({})
    if source.id_column:
        ids = [str(v) for v in base.column(source.id_column).to_pylist()]
    else:
        ids = [derived_id(split, i) for i in range(start, stop)]
    models = {r["model"] for r in rows}
    if len(models) != 1:
        raise AnondataError(f"shard {name}: workers used different models or settings; use one model for the job")
    records, keep, images, envs = [], [], [], []
    for rid, r in zip(ids, rows):
        if r["record_id"] != rid:
            raise AnondataError(f"shard {name}: row {r['row']} came back as {r['record_id']!r}, expected {rid!r}; the source changed during the job")
        ok = r["status"] == "anonymized"
        keep.append(ok)
        if ok:
            images.append(r["image"])
            envs.append(envelopes_from_ipc(r["envelopes"]))
            records.append({"id": rid, "split": split, "status": "anonymized", "shard": data_path(name)})
        else:
            records.append({"id": rid, "split": split, "status": "quarantined", "reason": _reason(r["reason"])})
    table = build_public_table(base, schema, source.image_column, images, keep,
                               ids if source.id_column is None else None)
    out = journal.out
    write_parquet_atomic(table, out / data_path(name), journal.tmp(f"{name}.parquet"))
    crash_hook("data", ordinal)
    env_table = pa.concat_tables(envs) if envs else envelope_schema(plan["dataset_id"]).empty_table()
    write_envelope_table(out / keys_path(name), env_table)
    journal.commit(name, {"shard": name, "split": split, "records": records, "model": models.pop(),
                          "faces": sum(int(r["faces"] or 0) for r in rows)})


def _reason(text: str | None) -> str:
    text = " ".join((text or "could not be anonymized (no reason given)").split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"


def _remove_strays(out: Path, planned: set[str]) -> None:
    """Temp files a killed writer left in data/, keys/ or the top folder (hidden `*.tmp` names,
    never a planned file)."""
    for f in out.iterdir():
        if f.is_file() and f.name.startswith(".") and f.name.endswith(".tmp"):
            f.unlink()
    for sub in ("data", "keys"):
        d = out / sub
        if d.is_dir():
            for f in d.iterdir():
                rel = f"{sub}/{f.name}"
                if rel not in planned and f.name.startswith(".") and ".tmp" in f.name:
                    f.unlink()


def _finalize(out: Path, journal: Journal, plan: dict, signer, recipients, resumed: int, source: Source) -> JobResult:
    from ..manifest import build_manifest, write_signed_manifest

    committed = journal.committed()
    names = [sh["name"] for s in plan["splits"] for sh in s["shards"]]
    missing = [n for n in names if n not in committed]
    if missing:
        raise AnondataError(f"shards {', '.join(missing)} are not finished; run again with --resume")
    _remove_strays(out, {data_path(n) for n in names} | {keys_path(n) for n in names})
    records, quarantine = [], []
    for s in plan["splits"]:  # input order: a split's shards, then its rows past --limit
        done = [r for sh in s["shards"] for r in committed[sh["name"]]["records"]]
        quarantine += [(r["id"], r["reason"], source.where(s["name"], row))
                       for row, r in enumerate(done) if r["status"] == "quarantined"]
        records += done
        skipped = f"beyond --limit {plan['options']['limit']}: not processed, not published"
        records += [{"id": rid, "split": s["name"], "status": "skipped", "reason": skipped}
                    for rid in s.get("skipped", [])]
    models = {committed[n]["model"] for n in names}
    if len(models) != 1:
        raise AnondataError("the shards of this job were anonymized with different models or settings; start a new job")
    model = canonical.loads(models.pop().encode(), "model info")
    counts = {
        "anonymized": sum(r["status"] == "anonymized" for r in records),
        "quarantined": sum(r["status"] == "quarantined" for r in records),
        "skipped": sum(r["status"] == "skipped" for r in records),
    }
    readme = card_mod.dataset_card(plan, model, counts, license=plan["options"]["license"])
    from ..files import atomic_write

    atomic_write(out / "README.md", readme.encode(), tmp_dir=journal.tmp_dir)
    m = build_manifest(
        str(out),
        dataset_id=plan["dataset_id"],
        model=model["model"],
        settings=model["settings"],
        recipients=recipients,
        signer=signer.recipient,
        shard_paths=[data_path(n) for n in names],
        envelope_paths=[keys_path(n) for n in names],
        records=records,
        extra={
            "faces": plan["options"]["faces"],
            "lossless": plan["options"]["lossless"],
            "source_kind": plan["source"]["kind"],
            "image_column": plan["source"]["image_column"],
            "id_column": plan["source"]["id_column"] or DERIVED_ID_COLUMN,
            "device": model.get("device", "cpu"),
            "torch_threads": 1,
        },
    )
    write_signed_manifest(str(out), m, signer)
    crash_hook("manifest", 1)
    journal.remove()
    return JobResult(str(out), plan["dataset_id"], counts["anonymized"], counts["quarantined"], len(names), resumed,
                     counts["skipped"], quarantine)
