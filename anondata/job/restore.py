"""The restore job: chosen records of a release back to their original faces.

Why it checks so much before touching pixels: restore is what the owner (or a grantee) runs on
a release that may have travelled. The manifest's signature and every hash are verified, ids
the release does not have or quarantined are refused by name, and ids this identity holds no
envelope for are refused by name (by `open_records`), before any model is loaded.

Output: OUT/data/{split}-NNNNN-of-NNNNN.parquet with the release's columns and shard names
(only shards that hold restored records), a README.md with Hub YAML so `load_dataset(OUT)`
works, and with `png=True` loose files OUT/png/{split}/{record_id}.png as well.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import FormatError, InputError, IntegrityError, LosslessMismatch
from ..files import atomic_write, check_new_folder, new_folder
from .shards import ROW_GROUP_SIZE, image_array

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
# In an identity file (NAME.key) or another tool's private key: such a file passed as --ids-file
# (both options take a file) became unknown ids, and the error printed it, secrets included.
_KEY_MARKERS = ('"kem_secret"', '"sign_secret"', "PRIVATE KEY-----")


@dataclass
class RestoreResult:
    out: str
    restored: int
    shards: int


def parse_ids(ids: str | None, ids_file: str | None) -> list[str] | None:
    """--ids A,B,C (each trimmed: handy on a command line) and/or --ids-file: one id per line,
    exactly as written, since an id may have a comma or spaces at either end (docs/FORMAT.md);
    only blank lines and lines starting with # (comments; such an id goes in --ids) are skipped."""
    out: list[str] = []
    if ids:
        out += [i.strip() for i in ids.split(",") if i.strip()]
    if ids_file:
        try:
            text = Path(ids_file).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--ids-file {ids_file}: cannot read it ({e})") from None
        out += [ln.removesuffix("\r") for ln in text.split("\n") if ln.strip() and not ln.startswith("#")]
    if any(marker in i for i in out for marker in _KEY_MARKERS):  # never echoed back as an unknown id
        where = f"--ids-file {ids_file}" if ids_file else "--ids"
        raise InputError(f"{where}: holds a private key, not record ids; pass the key as --identity and the ids "
                         "one per line in --ids-file (or as --ids ID,...)")
    if (ids is not None or ids_file is not None) and not out:  # --ids "" (an empty variable) is not "all"
        raise InputError("no record ids given (--ids / --ids-file are empty)")
    if not out:
        return None
    return list(dict.fromkeys(out))


def check_ids(m: dict, ids: list[str]) -> None:
    """Refuse, by id, ids the manifest does not have or did not anonymize: the real cause, before
    any envelope is opened (which would only say "no envelope")."""
    by_id = {r["id"]: r for r in m["records"]}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        stripped = {k.strip(): k for k in by_id}
        near = [stripped[i.strip()] for i in unknown if i.strip() in stripped]
        hint = f" (did you mean {near[0]!r}? ids are compared exactly)" if near else ""
        raise InputError(f"record id(s) not in this release: {', '.join(map(repr, unknown[:10]))}{hint}")
    absent = [i for i in ids if by_id[i]["status"] != "anonymized"]
    if absent:  # each with its own status and reason: a mix of quarantined and skipped is common
        more = f"; and {len(absent) - 10} more" if len(absent) > 10 else ""
        raise InputError(
            "record(s) not published in this release: "
            + "; ".join(f"{i!r} was {by_id[i]['status']} ({_short(by_id[i]['reason'])})" for i in absent[:10]) + more
        )


def _short(reason: str, n: int = 160) -> str:
    return reason if len(reason) <= n else reason[: n - 1] + "…"


def png_name(record_id: str, tagged: bool = False) -> str:
    """A file name for a record id: safe characters kept, others replaced, plus a short hash
    whenever anything was replaced (or `tagged`), so two ids never share a file."""
    safe = _SAFE.sub("_", record_id)[:150]
    if tagged or safe != record_id or safe.startswith("."):
        safe = f"{safe.lstrip('.') or 'id'}-{hashlib.sha256(record_id.encode()).hexdigest()[:8]}"
    return f"{safe}.png"


def png_names(ids: list[str]) -> dict[str, str]:
    """png_name of each id, tagged where two names differ only in case: a case-insensitive file
    system (macOS's and Windows' defaults) would write both to one file, the second over the first."""
    plain = {rid: png_name(rid) for rid in ids}
    folded = Counter(n.casefold() for n in plain.values())
    return {rid: png_name(rid, tagged=True) if folded[n.casefold()] > 1 else n for rid, n in plain.items()}


def run_restore(release: str, identity_path: str, out: str, *, ids: list[str] | None = None,
                keys: str | None = None, png: bool = False, model: str | None = None,
                signer_path: str | None = None, any_signer: bool = False, device: str | None = None,
                batch_size: int = 8, progress: bool = True, key_only: bool = False) -> RestoreResult:
    """Restore chosen records. `signer_path` (the .pub that must have signed the release) is
    required unless `any_signer`: see `anondata.manifest.open_release`. `key_only`: ignore the
    lossless residual and restore from the key alone (close, not bit-exact): the way out when the
    lossless check fails on another device or library version, which would otherwise leave the
    owner with nothing."""
    from ..envelope import open_records
    from ..identity import load_identity, load_recipient
    from ..manifest import open_release, release_envelopes

    root = Path(release)
    out_dir = check_new_folder(out, "--out", InputError, release=root)
    if not signer_path and not any_signer:
        raise InputError("restore needs the release's signer: pass --signer NAME.pub (or --any-signer)")
    identity = load_identity(identity_path)
    signer = load_recipient(signer_path) if signer_path else None
    rel = open_release(root, signer, keep_envelopes=keys is None)
    m = rel.manifest
    dataset_id = m["dataset_id"]
    by_id = {r["id"]: r for r in m["records"]}
    if ids is not None:
        check_ids(m, ids)
    tables = release_envelopes(rel, keys)
    opened = open_records(tables, identity, dataset_id, ids)  # refuses ids without an envelope, by id
    if not opened:
        raise InputError(f"{identity_path} cannot open any record of this release (it is not a recipient)")
    wanted = ids if ids is not None else [r["id"] for r in m["records"] if r["id"] in opened]

    extra = m.get("extra", {})
    image_column = extra.get("image_column", "image")
    id_column = extra.get("id_column", "record_id")
    per_shard: dict[int, list[str]] = {}
    for rid in wanted:
        per_shard.setdefault(by_id[rid]["shard"], []).append(rid)

    # Each crop is recomputed at the batch shape recorded in its restore record, and lossless
    # records snap the ±1 drift of another thread count or device: no need to copy the actors' setup.
    anon = load_release_model(m, model, _device(device, extra.get("device", "cpu")))
    if key_only:
        opened = {r: (k, _key_only(rec, r)) for r, (k, rec) in opened.items()}
    # Restored into a hidden sibling folder, renamed into place at the end: a failure (a record
    # that does not restore, a kill) leaves no half-restored --out folder of original faces.
    with new_folder(out_dir) as work:
        try:
            n = _restore_rows(root, m, work, per_shard, wanted, by_id, opened, anon, image_column, id_column,
                              png, batch_size, progress, dataset_id, key_only)
        except LosslessMismatch as e:
            raise LosslessMismatch(f"{e}; nothing was restored. If the key is right and only the device or a "
                                 "library version differs, pass --key-only for the restore from the key alone "
                                 "(close, not bit-exact)") from None
    return RestoreResult(str(out_dir), n, len(per_shard))


def _key_only(record: bytes, rid: str) -> bytes:
    """The record without its lossless parts (`--key-only`); a damaged one is named by its id."""
    from ..faces import key_only_record

    try:
        return key_only_record(record)
    except FormatError as e:
        raise FormatError(f"record {rid!r}: {e}") from None


def _restore_rows(root, m, out_dir, per_shard, wanted, by_id, opened, anon, image_column, id_column,
                  png, batch_size, progress, dataset_id, key_only=False) -> int:
    from ..faces import restore_photos
    from ..images import decode_image, encode_image
    from tqdm import tqdm

    splits: set[str] = set()
    names = png_names(wanted) if png else {}
    bar = tqdm(total=len(wanted), unit="rec", desc="restore", disable=None if progress else True, file=sys.stderr)  # None: off unless a terminal
    try:
        for shard_idx in sorted(per_shard):
            rel = m["shards"][shard_idx]["path"]
            table = pq.read_table(root / rel)
            want = set(per_shard[shard_idx])
            col = [str(v) for v in table.column(id_column).to_pylist()]
            rows = shard_rows(col, want, rel)
            sub = table.take(pa.array(rows, pa.int64()))
            restored: list[bytes] = []
            cells = sub.column(image_column).to_pylist()
            rids = [col[i] for i in rows]
            for lo in range(0, len(rids), batch_size):
                chunk = rids[lo:lo + batch_size]
                imgs = []
                for rid, cell in zip(chunk, cells[lo:lo + batch_size]):
                    data = cell["bytes"] if isinstance(cell, dict) else cell
                    imgs.append(decode_image(data, rid)[0])
                outs = restore_photos(anon, imgs, [opened[r][0] for r in chunk], [opened[r][1] for r in chunk], ids=chunk)
                for rid, arr in zip(chunk, outs):
                    b = encode_image(arr)
                    restored.append(b)
                    if png:
                        split = by_id[rid]["split"]
                        atomic_write(out_dir / "png" / split / names[rid], b)
                bar.update(len(chunk))
            idx = sub.schema.get_field_index(image_column)
            sub = sub.set_column(idx, sub.schema.field(idx), image_array(restored, sub.schema.field(idx).type))
            dest = out_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.parent / f".{dest.name}.tmp"
            pq.write_table(sub, tmp, row_group_size=ROW_GROUP_SIZE)
            tmp.replace(dest)
            splits.add(by_id[rids[0]]["split"])
    finally:
        bar.close()
    _write_card(out_dir, sorted(splits), dataset_id, len(wanted), key_only)
    return len(wanted)


def shard_rows(ids: list[str], want: set[str], shard: str) -> list[int]:
    """The rows of the wanted records in a shard, each exactly once. The manifest says the shard
    holds them, but verify checks only its row count: without this, a record missing from the
    shard (or there twice) was skipped (or restored twice) under a "restored N records" line."""
    rows = [i for i, v in enumerate(ids) if v in want]
    found = Counter(ids[i] for i in rows)
    missing, twice = sorted(want - found.keys()), sorted(k for k, n in found.items() if n > 1)
    if missing or twice:
        raise IntegrityError(
            f"{shard}: " + ("; ".join(
                ([f"record(s) {', '.join(map(repr, missing[:5]))} the manifest places here are missing"] if missing else [])
                + ([f"record(s) {', '.join(map(repr, twice[:5]))} appear more than once"] if twice else [])))
            + ": the release does not match its manifest; nothing was restored")
    return rows


def _device(asked: str | None, used: str) -> str:
    """The device the release was anonymized on, unless asked otherwise: lossless restore is
    bit-exact only there (float kernels differ between CPU and GPU)."""
    import torch

    device = asked or used
    if device == "cuda" and not torch.cuda.is_available():
        if asked:
            raise InputError("--device cuda: no CUDA GPU is available here")
        raise InputError(
            "this release was anonymized on a CUDA GPU and lossless restore is exact only on one: run restore "
            "on a GPU machine, or pass --device cpu to try anyway (a mismatch is reported, never silent)"
        )
    return device


def load_release_model(m: dict, model: str | None, device: str = "cpu"):
    """The model that made release manifest `m` (its name, or the --model folder), with its sampler
    settings; every path that restores records (restore, eval) loads it here. The batch size does not
    matter: each record carries the batch shape it was made at. The weights and the noise schedule
    are checked up front, so a wrong --model fails in one line before any record is restored."""
    from ..anonymizer import Anonymizer

    s = m["settings"]
    name = model or m["model"]["name"]
    want = m["model"]["sha256"]
    try:
        anon = Anonymizer.from_pretrained(
            name, device=device, steps=s.get("steps"), inversion_iters=s.get("inversion_iters"),
            dtype=s.get("dtype", "float32"),
        )
    except InputError as e:
        if model:
            raise
        raise InputError(
            f"cannot load the release's model {name!r} ({e}); pass --model with the folder it was anonymized with "
            f"(sha256 {want[:12]}…)"
        ) from None
    anon.check_model(want, "this release")
    check_schedule(anon, s, name)
    return anon


def check_schedule(anon, settings: dict, name: str) -> None:
    """The records check the weights' sha256, which does not cover the scheduler config; newer
    releases also name the noise schedule (older ones lack it: nothing to compare). Every path
    that restores records (restore, eval) must refuse another schedule: restore would be wrong."""
    ours = anon.settings.get("schedule")
    if "schedule" in settings and settings["schedule"] != ours:
        raise InputError(
            f"the model {name!r} has the release's weights but another noise schedule (scheduler config: "
            f"schedule {ours} here, {settings['schedule']} in the release): restore would be wrong; use the model "
            "folder the release was anonymized with, its scheduler/ unedited"
        )


def _write_card(out_dir: Path, splits: list[str], dataset_id: str, n: int, key_only: bool = False) -> None:
    yaml = ["---", "configs:", "- config_name: default", "  data_files:"]
    for s in splits:
        yaml += [f'  - split: "{s}"', f'    path: "data/{s}-*"']
    text = "\n".join(yaml + ["---", "", "# Restored records", "",
                             f"{n} records of anondata release `{dataset_id}`, restored with `anondata restore`"
                             + (" --key-only: from the keys alone, close to the originals but not bit-exact. "
                                if key_only else ". ")
                             + "These are the **original faces**: keep this folder private.", ""])
    atomic_write(out_dir / "README.md", text.encode())
