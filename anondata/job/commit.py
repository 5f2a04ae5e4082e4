"""Committing a shard (data file, keys file, marker) and finishing the release (card, signed manifest).

Why the driver does it: a shard is committed as a unit and the resume journal must see its three
steps in order; the release is signed only once every planned shard is committed.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from .. import canonical
from ..errors import AnondataError
from ..manifest import MAX_REASON
from . import card as card_mod
from .journal import Journal, crash_hook
from .options import JobResult
from .shards import DERIVED_ID_COLUMN, build_public_table, data_path, keys_path, write_parquet_atomic
from .sources import Source, derived_id


def commit_shard(name, split, sh, got: dict[int, dict], source: Source, schema: pa.Schema, journal: Journal, plan,
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
    crash_hook("keys", ordinal)
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


def finalize(out: Path, journal: Journal, plan: dict, signer, recipients, resumed: int, source: Source) -> JobResult:
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
    crash_hook("card", 1)
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
