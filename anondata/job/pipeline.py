"""The anonymize job: plan (plan.py), run on Ray Data, commit shards and sign the release (commit.py).

Shape: `ray.data.from_items(read tasks, one per batch of a shard)` -> `map_batches(read_shard_rows)`
(workers read their own rows) -> `map_batches(AnonymizerActor, compute=ActorPoolStrategy(size=N), num_gpus=1 or 0,
batch_size=B)` -> the driver iterates results, groups them by shard, and commits each shard
(data file, keys file, marker) as soon as all its rows are back. The same code runs on a
laptop's CPUs (num_gpus=0) and on a GPU cluster (`RAY_ADDRESS` set, one actor per GPU).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import warnings
from pathlib import Path

import pyarrow as pa

from .. import canonical
from ..errors import AnondataError, FormatError, InputError, SetupError
from ..files import make_dirs, missing_dirs, remove_empty_dirs, within
from .columns import choose_columns
from .commit import commit_shard, finalize
from .journal import CRASH_ENV, Journal, WORK, crash_hook, exclusive
from .options import JobOptions, JobResult  # noqa: F401 - the job's API, here too
from .plan import (
    check_given_against_plan,
    face_spec,
    load_keys,
    make_plan,
    options_from_plan,
    precheck,
    resume_checks,
    same_model_as_committed,
)
from .shards import output_schema
from .sources import Source, open_source


def _same_marker_as_committed(opts: JobOptions, plan: dict, recipients, committed: dict) -> None:
    """Every shard's marker records the model, its settings and the device (lossless restore is
    bit-exact only on the kind of device that made a record), and the release must have one of
    each: a difference found at the end would cost the whole run and leave the job unfinishable.
    So build what this run's actors would write, by the actor's own code, before any work; without
    loading the weights (worker.actor_model_json), which for a large model would be a long load on
    a driver that may have no GPU. A job whose shards so far ran on CPU stays on CPU unless --gpus
    says otherwise (the markers pin the device: the plan is written before Ray is up, so it cannot
    know it)."""
    from .worker import actor_model_json

    written = {c["model"] for c in committed.values()}
    if len(written) != 1:
        raise InputError("--resume: the written shards disagree on the model, settings or device; start a new job")
    theirs = canonical.loads(written.pop().encode(), "model info")
    ensure_ray(opts.num_cpus)
    if theirs.get("device") == "cpu" and opts.gpus is None:
        opts.gpus = 0
    device = _pool(opts)[2]
    ours = canonical.loads(actor_model_json(**actor_kwargs(opts, plan, recipients, device)).encode(), "model info")
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


# ------------------------------------------------------------------------------ Ray


_STARTED = False  # ensure_ray initialised Ray in this process: run_anonymize shuts it down


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (e.g. `auto` after `ray start --head`), else
    start a private local instance. An already initialised Ray (tests) is used as is."""
    global _STARTED
    import signal
    import threading

    import ray

    if ray.is_initialized():
        return
    # ray.init replaces the SIGTERM handler (with sys.exit(15), after a C++ stack dump): the CLI's
    # handler, which ends the command like Ctrl-C (anondata.cli.Terminated), is put back after it.
    # A Ctrl-C is held until ray.init returns (a few seconds): one that stopped it halfway left
    # Ray's agent processes running for a minute after the command, or crashed it at exit.
    main_thread = threading.current_thread() is threading.main_thread()
    on_term = signal.getsignal(signal.SIGTERM) if main_thread else None
    held: list[int] = []
    on_int = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum)) if main_thread else None
    try:
        _init_ray(num_cpus)
    except SystemExit as e:  # Ray's handler got a SIGTERM during ray.init: the CLI's decides
        if e.code == signal.SIGTERM and callable(on_term):
            on_term(signal.SIGTERM, None)
        raise
    finally:
        if callable(on_term):
            signal.signal(signal.SIGTERM, on_term)
        if main_thread:
            signal.signal(signal.SIGINT, on_int if on_int is not None else signal.default_int_handler)
    _STARTED = True
    if held:
        raise KeyboardInterrupt


def shutdown_ray() -> None:
    """Shut down the Ray that ensure_ray started, with Ctrl-C and SIGTERM held off meanwhile (a few
    seconds). Left to Ray's exit handler, a Ctrl-C during it (a second one, or the first landing
    as the job ended) stopped it halfway with a traceback and left Ray's agent processes running
    after the command had exited."""
    global _STARTED
    if not _STARTED:
        return
    import signal
    import threading

    import ray

    _STARTED = False
    if threading.current_thread() is not threading.main_thread():
        ray.shutdown()
        return
    held = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ray.shutdown()
    finally:
        for s, handler in held.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _init_ray(num_cpus: int | None) -> None:
    import ray

    address = os.environ.get("RAY_ADDRESS")
    kwargs = dict(logging_level="WARNING", log_to_driver=True)
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as e:  # RAY_ADDRESS=auto with no cluster on this machine
            raise SetupError(f"RAY_ADDRESS={address}: {e} {_NO_CLUSTER_FIX}") from None
    else:
        # Ray turns token authentication on for a new local instance (good) and warns that it
        # did so on every run (noise on the runner's terminal): that one line is dropped.
        import logging

        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
            lambda rec: not rec.getMessage().startswith("Token authentication is enabled for this Ray cluster"))
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)


_NO_CLUSTER_FIX = "Start the cluster (`ray start --head`) or fix the address, or unset RAY_ADDRESS to run on this machine"


def _check_reachable(address: str) -> None:
    """A HOST:PORT where nothing listens fails here, in seconds: ray.init retries such an address
    for about 13 minutes (20 tries of ~40 s, a C++ warning every few seconds) before it gives up."""
    import socket

    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():  # auto, local, ray://: Ray resolves those
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as e:
        raise SetupError(f"RAY_ADDRESS={address}: no Ray cluster answers there ({e.strerror or e}). "
                         f"{_NO_CLUSTER_FIX}") from None


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
        "face_spec": face_spec(opts),
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
    actors = min(actors, len(tasks))  # each actor loads the model: none for an actor that gets no task
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
    try:
        return _locked(opts)
    finally:
        shutdown_ray()


def _locked(opts: JobOptions) -> JobResult:
    """The job, holding --out's lock (journal.exclusive) from before its emptiness is checked to
    after the manifest is signed. The folder is made first, to be locked; a run that made it and
    fails leaves none behind (nor the parents it made)."""
    out = Path(opts.out)
    if out.exists() and not out.is_dir():  # else mkdir's "File exists", which does not say it is a file
        raise InputError(f"--out {out}: is a file, not a folder; choose a new folder name")
    made = missing_dirs(out)
    if made and opts.resume:
        return _run_anonymize(opts)  # nothing to resume: says so
    make_dirs(out)  # fsynced in its parent: else a power cut could lose the finished release
    held = False
    try:
        with exclusive(out):
            held = True
            return _run_anonymize(opts)
    finally:
        if held:
            remove_empty_dirs(made)


def _run_anonymize(opts: JobOptions) -> JobResult:
    out = Path(opts.out)
    journal = Journal(out)
    if opts.resume:
        if not journal.exists():
            if (out / "manifest.json").is_file():
                return _finished(out, opts.signing_key)  # killed after the release was complete: nothing to redo
            if out.exists() and _only_planless_work(out, journal):
                raise InputError(f"{out}: the job was stopped before its plan was written; run again without --resume")
            if out.is_dir() and not any(out.iterdir()):  # a job killed while planning leaves --out made and empty
                raise InputError(f"{out} is empty: no job got as far as planning there, so there is nothing to "
                                 "resume; run again without --resume")
            raise InputError(f"{out} has no interrupted job to resume ({WORK}/plan.json is missing)")
        plan = journal.load()
        planned = options_from_plan(dataclasses.replace(opts), plan)
        check_given_against_plan(opts, planned)
        opts = planned
    elif out.exists() and _only_planless_work(out, journal):
        journal.remove()  # killed while creating the plan: nothing was done yet
    if not opts.resume and out.exists() and any(out.iterdir()):
        # --resume takes every output option from the job's plan: someone who stopped a job to
        # change an option (--on-no-face, --faces) and followed a bare "pass --resume" got the old one
        hint = (
            "an interrupted job is there: pass --resume to finish it with the options it was started with "
            f"(--resume refuses changed ones; to start over with other options, remove {out} or choose a new --out)"
            if journal.exists()
            else "choose a new --out folder"
        )
        raise InputError(f"output folder {out} is not empty; {hint}")
    recipients, signer = load_keys(opts)
    precheck(opts)
    source = open_source(
        opts.source, image_column=opts.image_column, id_column=opts.id_column, splits=opts.splits, limit=opts.limit
    )
    # a folder source: every file below it is read
    if source.fs is None and Path(opts.source).is_dir() and within(out, opts.source):
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
        resume_checks(plan, source, recipients, signer)
    else:
        plan = make_plan(source, opts, recipients, signer)
        journal.create(plan)  # in --out, which _locked made
        try:
            return _run_job(out, journal, plan, opts, source, recipients, signer)
        except AnondataError:
            # A new job that fails before its first shard is committed (a model that does not
            # load, a detector missing on the workers, an unreadable source) leaves nothing behind:
            # the next run may then change the options, which --resume would take from the plan.
            if not journal.committed():  # --out was empty or absent before this run (checked above)
                for child in list(out.iterdir()):  # and _locked removes it if this run made it
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            raise
    return _run_job(out, journal, plan, opts, source, recipients, signer)


def _run_job(out: Path, journal: Journal, plan: dict, opts: JobOptions, source, recipients, signer) -> JobResult:
    committed = journal.committed()
    if opts.resume and committed:
        same_model_as_committed(opts.model, committed)
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
    return finalize(out, journal, plan, signer, recipients, resumed, source)


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
    bar = tqdm(total=total, initial=done, unit="rec", desc="anonymize", disable=None if opts.progress else True,  # None: off unless stderr is a terminal
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
            if name in finished:  # a retried task's second copy of a row, after its shard was committed
                continue
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
                commit_shard(name, split, sh, pending.pop(name), source, schema, journal, plan, commits + 1)
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

