"""The job's plan, fixed before any record is processed, and the checks of a --resume against it.

Why a plan: everything that decides the output (the source's splits, shards and ids, the model,
scheme and face options, the recipients and the signer) is written to the journal first, so a
resumed job finishes the release it started, whatever its command line says now, and refuses a
source, key or model that changed under it rather than publish a mixed release.
"""

from __future__ import annotations

import secrets
import sys

from .. import canonical
from ..errors import FormatError, InputError
from .options import JobOptions, flag_of
from .sources import Source
from .shards import shard_name


def load_keys(opts: JobOptions):
    from ..identity import load_identity, load_recipient

    if not opts.recipients:
        raise InputError("no --recipient: give the public key (NAME.pub) of whoever may restore the records")
    recipients = [load_recipient(p) for p in opts.recipients]
    fps = [r.fingerprint for r in recipients]
    if len(set(fps)) != len(fps):
        raise InputError("the same --recipient is given twice")
    signer = load_identity(opts.signing_key)
    return recipients, signer


def face_spec(opts: JobOptions) -> dict:
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
        "detector": _with_settings(opts.detector),
        "on_no_face": opts.on_no_face,
        "cross_check": _with_settings(cross_check),
    }


def _with_settings(detector: str | None) -> str | None:
    """"haar" -> "haar:CASCADE,MIN_NEIGHBORS" as of now, so that the plan (and the manifest) say which
    Haar setting decided the output, and a --resume by a later anondata keeps it."""
    if detector == "haar":
        from ..detect import HAAR_SETTINGS

        return f"haar:{HAAR_SETTINGS}"
    return detector


def _planned_detector(detector: str | None) -> str | None:
    """A plan's detector as this anondata must run it: plans written before 2026-11-28 say a bare "haar",
    which then meant frontalface_default with minNeighbors 5 (now HAAR_SETTINGS_BEFORE)."""
    if detector == "haar":
        from ..detect import HAAR_SETTINGS_BEFORE

        return f"haar:{HAAR_SETTINGS_BEFORE}"
    return detector


def precheck(opts: JobOptions) -> None:
    """What the workers would otherwise fail on, checked once here with a clean message: the face
    options, and the model with the sampler settings, built by the actors' own code from its
    configs without loading the weights (that is the actors' job). Otherwise settings the model
    cannot take (--steps past its schedule, --sign-cell past its latent grid) stopped the job only
    as its actors started, under a traceback from each."""
    from ..faces import FaceSpec

    spec = face_spec(opts)
    FaceSpec(**{**spec, "box": tuple(spec["box"]) if spec["box"] else None})
    if opts.batch_size < 1 or (opts.model_batch is not None and opts.model_batch < 1):
        raise InputError("--batch-size must be at least 1")
    from ..backends import check_model
    from .worker import _anonymizer

    check_model(opts.model)
    _anonymizer(model=opts.model, device="cpu", steps=opts.steps, inversion_iters=opts.inversion_iters,
                sign_cell=opts.sign_cell, background=opts.background, flip_centre=opts.flip_centre,
                model_batch=opts.model_batch or 1, weights=False)


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
        "options": plan_options(opts),
        "splits": splits,
    }


def plan_options(opts: JobOptions) -> dict:
    """The options that shape the output, as the plan keeps them."""
    return {
        "model": opts.model,
        "steps": opts.steps if opts.steps is not None else -1,
        "inversion_iters": opts.inversion_iters if opts.inversion_iters is not None else -1,
        "sign_cell": opts.sign_cell,
        "background": opts.background,
        "flip_centre": opts.flip_centre,
        "faces": face_spec(opts),
        "lossless": opts.lossless,
        "shard_size": opts.shard_size,
        "limit": opts.limit or 0,
        "drop_columns": sorted(set(opts.drop_columns)),
        "keep_columns": sorted(set(opts.keep_columns)),
        "image_column": opts.image_column,
        "id_column": opts.id_column or "",
        "splits": opts.splits or [],
        "license": opts.license,
    }


def check_given_against_plan(opts: JobOptions, planned: JobOptions) -> None:
    """--resume takes every output option from the plan; one the runner gives that differs from it
    used to be ignored without a word, so a job stopped to change, say, --on-no-face keep to
    quarantine went on with keep. Refuse instead, naming each. `opts.given`: the JobOptions
    fields set on the command line; `planned`: opts after options_from_plan."""
    import dataclasses

    base = plan_options(planned)
    diffs = []
    for name in sorted(opts.given):
        mixed = plan_options(dataclasses.replace(planned, **{name: getattr(opts, name)}))
        if mixed != base:
            flag = flag_of(name)
            k = next(k for k in base if mixed[k] != base[k])
            old = base[k]
            if isinstance(old, dict):  # faces: the part that differs
                k = next(j for j in old if mixed[k][j] != old[j])
                old = old[k]
            diffs.append(f"{flag} (the plan has {k} {old!r})")
    if diffs:
        raise InputError(f"--resume finishes the job with the options of its plan, and these differ: {'; '.join(diffs)}. "
                         "Leave them out to resume, or start a new job in another --out folder")


def resume_checks(plan: dict, source: Source, recipients, signer) -> None:
    if plan["source"] != source.describe():
        raise InputError(
            f"--resume: the source does not match the interrupted job's plan ({plan['source']['location']}, "
            f"splits {plan['source']['splits']}); give the same SRC and options"
        )
    if plan["recipients"] != sorted(r.fingerprint for r in recipients):
        raise InputError("--resume: the --recipient keys differ from the interrupted job's; give the same ones")
    if plan["signer"] != signer.recipient.fingerprint:
        raise InputError("--resume: the --signing-key differs from the interrupted job's; give the same one")
    same_source_contents(plan, source)


def same_source_contents(plan: dict, source: Source) -> None:
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


def same_model_as_committed(model: str, committed: dict) -> None:
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


def options_from_plan(opts: JobOptions, plan: dict) -> JobOptions:
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
    opts.faces, opts.detector, opts.on_no_face = f["mode"], _planned_detector(f["detector"]), f["on_no_face"]
    opts.cross_check = _planned_detector(f.get("cross_check"))
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
