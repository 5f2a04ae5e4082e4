"""Where the records come from: a Parquet file or folder (the Hub's `data/{split}-*.parquet`
layout), a folder of image files, a `datasets` `save_to_disk` folder, or a Hub dataset id.

Why one `Source` type: the job plans fixed shard boundaries up front and later reads row
ranges `[start, stop)` of a split, on the driver (the non-image columns) and on Ray workers
(the image bytes). Every form answers the same three questions: which splits, how many
rows, and what are rows `start..stop` of this split. A `Source` is picklable so workers can
read their own slices.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .. import canonical
from ..errors import InputError
from ..files import within

# Every file of an image folder with one of these names is a record. Some are formats the decoder
# may refuse (HEIC, AVIF, JPEG XL, ...): those records are quarantined as unreadable, so the runner
# sees them, instead of being left out of the job and its manifest without a word.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff",
                    ".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".ppm", ".pgm", ".pnm", ".tga", ".qoi", ".ico")
DEFAULT_SPLIT = "train"
_ID_BLOCK = 65_536  # rows of the id column held as Arrow at a time (Source.ids)
# What the manifest allows (manifest.SPLIT_RE: ASCII, at most 64 characters), less `-`, which
# separates the split from the shard number in file names; `\Z`: `$` let a trailing newline through
_SPLIT_RE = re.compile(r"^(?=.{1,64}\Z)\w+(\.\w+)*\Z", re.ASCII)
_SPLIT_RULE = "ASCII letters, digits and _ (. between words), at most 64 characters"
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Hub layout: data/train-00000-of-00003.parquet, train-*.parquet, or train/xxx.parquet
_SHARD_NAME_RE = re.compile(r"^(?P<split>\w+(?:\.\w+)*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.parquet$", re.IGNORECASE)


@dataclass
class SplitInfo:
    """One split: the files it is read from (in order) and their row counts."""

    name: str
    files: list[str]
    file_rows: list[int]
    limit: int | None = None

    @property
    def rows(self) -> int:
        return self.total if self.limit is None else min(self.total, self.limit)

    @property
    def total(self) -> int:
        """Rows before --limit: the manifest lists the ones past it as skipped."""
        return sum(self.file_rows)


@dataclass
class Source:
    """A dataset opened for reading. `id_column` None means ids are derived from the split and
    the row number (`derived_id`), and the job adds them as a `record_id` column."""

    kind: str  # parquet | imagefolder | arrow | hub
    location: str  # local path or Hub id, as given
    root: str  # folder that relative image paths are resolved against
    splits: list[SplitInfo]
    schema: pa.Schema  # Arrow schema with the `huggingface` features metadata when known
    image_column: str
    id_column: str | None
    fs: Any = field(default=None, repr=False)  # fsspec filesystem (Hub) or None (local)

    def split(self, name: str) -> SplitInfo:
        for s in self.splits:
            if s.name == name:
                return s
        raise InputError(f"split {name!r} is not in the source (it has: {', '.join(s.name for s in self.splits)})")

    def describe(self) -> dict:
        """JSON-able description for the resume plan: enough to notice a different source."""
        return {
            "kind": self.kind,
            "location": self.location,
            "image_column": self.image_column,
            "id_column": self.id_column or "",
            "splits": {s.name: s.rows for s in self.splits},
        }

    def read(self, split: str, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
        """Rows `[start, stop)` of `split` (original order), only `columns` if given."""
        info = self.split(split)
        return self._read(info, start, min(stop, info.rows), columns)

    def _read(self, info: SplitInfo, start: int, stop: int, columns: list[str] | None) -> pa.Table:
        if start >= stop:
            return self.schema.empty_table() if columns is None else self.schema.empty_table().select(columns)
        if self.kind == "imagefolder":
            table = _read_image_files(self, info, start, stop)
            return table if columns is None else table.select(columns)
        if self.kind == "arrow":
            ds = _load_arrow_split(info.files[0])
            if columns is not None:
                ds = ds.select_columns(columns)
            return _cast_like(ds.with_format("arrow")[start:stop], self.schema, columns)
        pieces = []
        offset = 0
        for path, n in zip(info.files, info.file_rows):
            lo, hi = max(start, offset), min(stop, offset + n)
            if lo < hi:  # each file in the source's schema first: concat_tables wants one
                pieces.append(_cast_like(_read_parquet_range(path, self.fs, lo - offset, hi - offset, columns),
                                         self.schema, columns))
            offset += n
        return pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]

    def where(self, split: str, row: int) -> str | None:
        """Where a row came from, for the runner's terminal only (never a public file: a file
        name can name the person): an image folder's file, whose record id names only its row."""
        if self.kind == "imagefolder":
            return str(Path(self.location) / self.split(split).files[row])
        return None

    def ids(self, split: str, all_rows: bool = False) -> list[str]:
        """Every record id of `split`, in row order (reads only the id column). `all_rows`: the
        rows past --limit too, which the manifest must list (as skipped) like every other."""
        info = self.split(split)
        n = info.total if all_rows else info.rows
        if self.id_column is None:
            return [derived_id(split, i) for i in range(n)]
        out: list[str] = []
        for block in self._column_blocks(info, n, self.id_column):
            for v in block.to_pylist():
                if v is None or (isinstance(v, str) and not v.strip()):
                    raise InputError(
                        f"split {split!r} row {len(out)}: the id column {self.id_column!r} is empty; "
                        "fill it, or pass --id-column to use another column"
                    )
                if isinstance(v, bool) or not isinstance(v, (str, int)):
                    raise InputError(
                        f"the id column {self.id_column!r} holds {type(v).__name__} values; "
                        "ids must be strings or integers (pass --id-column)"
                    )
                out.append(str(v))
        return out

    def _column_blocks(self, info: SplitInfo, stop: int, column: str):
        """`column` of rows [0, stop), in row order, _ID_BLOCK rows at a time. A plan reads every id
        (rows past --limit too: the manifest lists them), and the whole column as Arrow beside its
        Python values cost a third more memory (2 million ids: +320 MiB, now +225 MiB)."""
        if self.kind in ("imagefolder", "arrow"):  # ids derived, or a memory-mapped table
            for a in range(0, stop, _ID_BLOCK):
                yield self._read(info, a, min(stop, a + _ID_BLOCK), [column]).column(0)
            return
        offset = 0
        for path, n in zip(info.files, info.file_rows):
            if offset >= stop:
                break
            left = min(n, stop - offset)
            try:
                with _parquet_file(path, self.fs) as pf:
                    for batch in pf.iter_batches(batch_size=_ID_BLOCK, columns=[column]):
                        if left <= 0:
                            break
                        batch = batch.slice(0, left)
                        left -= batch.num_rows
                        yield _cast_like(pa.Table.from_batches([batch]), self.schema, [column]).column(0)
            except (OSError, pa.ArrowException) as e:  # a damaged data page behind a valid footer
                raise InputError(f"{path}: the column {column!r} cannot be read ({str(e).splitlines()[0][:160]}); "
                                 "repair or re-export the file") from None
            offset += n

    def fingerprint(self, ids: dict[str, list[str]] | None = None) -> dict:
        """What --resume compares to notice changed contents: a resumed job reads rows by
        position, so a renamed, added or replaced file shifts rows and one record is published
        twice while another is never processed. SHA-256 per split of every record id (all rows,
        in order) and of the files' names and sizes (Parquet: and footers, which hold each
        column chunk's size and statistics); plus the columns. Cheap: ids are read for the
        plan anyway, and no image is read. `ids`: split -> `ids(split, all_rows=True)`."""
        splits = {}
        for info in self.splits:
            rows = ids[info.name] if ids is not None else self.ids(info.name, all_rows=True)
            files = self._file_facts(info)
            splits[info.name] = {"ids": _sha(canonical.dumps(rows)), "files": _sha(canonical.dumps(files))}
        return {"columns": _sha(str(self.schema.remove_metadata()).encode()), "splits": splits}

    def _file_facts(self, info: SplitInfo) -> list:
        if self.kind == "imagefolder":
            return [[rel, _size_or_none(Path(self.root) / rel)] for rel in info.files]
        if self.kind == "arrow":  # one folder per split: data-*.arrow, state.json, dataset_info.json
            folder = Path(info.files[0])
            return [[f.name, f.stat().st_size] + ([_sha(f.read_bytes())] if f.suffix == ".json" else [])
                    for f in sorted(folder.iterdir()) if f.is_file()]
        return [[os.path.relpath(path, self.root), n, _parquet_footer_sha(path, self.fs)]
                for path, n in zip(info.files, info.file_rows)]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _parquet_footer_sha(path: str, fs) -> str:
    """SHA-256 of a Parquet file's size and footer (its last bytes: the metadata, then its
    length and `PAR1`): two range reads, also on the Hub."""
    with (fs.open(path, "rb") if fs is not None else open(path, "rb")) as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(size - 8)
        tail = fh.read(8)
        n = int.from_bytes(tail[:4], "little")
        fh.seek(max(0, size - 8 - n))
        return _sha(str(size).encode() + b":" + fh.read(n) + tail)


def derived_id(split: str, row: int) -> str:
    """Stable id for sources without an id column: the split and the row number."""
    return f"{split}-{row:06d}"


# --------------------------------------------------------------------------- opening


def open_source(
    location: str,
    *,
    image_column: str = "image",
    id_column: str | None = None,
    splits: list[str] | None = None,
    limit: int | None = None,
) -> Source:
    """Open `location` (a local path or a Hub dataset id). `splits` keeps only those splits;
    for sources whose one split has no name (a single Parquet file, a folder of images)
    a single entry names it. `limit` keeps the first N records of each split."""
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, not {limit}")
    for s in splits or []:
        if not _SPLIT_RE.match(s):
            raise InputError(f"split name {s!r} is not valid: use {_SPLIT_RULE} (e.g. train)")
    path = Path(location).expanduser()
    if location.startswith("hf://") or (not path.exists() and _HUB_ID_RE.match(location)):
        source = _open_hub(location.removeprefix("hf://").removeprefix("datasets/"))
    elif not path.exists():
        raise InputError(f"source {location!r} does not exist (give a Parquet file or folder, an image folder, a save_to_disk folder or a Hub id)")
    elif path.is_file():
        if path.suffix.lower() != ".parquet":
            raise InputError(f"source {location!r} is a file but not .parquet; for images give their folder")
        source = _open_parquet_files(location, str(path.parent), {None: [str(path)]})
    elif (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        source = _open_arrow(location, path)
    elif (path / "manifest.json").is_file() and (path / "keys").is_dir():
        # its keys/ would be read as data (and refused for another schema, a confusing error)
        raise InputError(f"source {location!r} is an anondata release (manifest.json, keys/): to anonymize its "
                         f"public shards again, give its data/ folder")
    else:
        # any case: a split in TEST.PARQUET must not be left out while the others are read
        parquet = sorted(path / rel for rel in _files_under(location, path, (".parquet",)))
        if parquet:
            source = _open_parquet_files(location, str(path), _group_by_split(parquet, path))
        else:
            source = _open_image_folder(location, path)
    return _finish(source, image_column, id_column, splits, limit)


def _group_by_split(files: list, root) -> dict[str | None, list[str]]:
    """Split names as the Hub infers them: `{split}-NNNNN-of-NNNNN.parquet`, or a well-known
    split word (train, test, validation, ...) in the file or folder name. Files that name no
    split form the unnamed one, which is only allowed alone."""
    groups: dict[str | None, list[str]] = {}
    for f in files:
        rel = Path(str(f)).relative_to(root) if root is not None else Path(str(f))
        groups.setdefault(_split_of(rel), []).append(str(f))
    if None in groups and len(groups) > 1:
        raise InputError(
            f"cannot tell the split of {Path(groups[None][0]).name}: name Parquet files "
            "{split}-NNNNN-of-NNNNN.parquet (the Hub layout) or give one file"
        )
    for split, names in groups.items():
        _check_shard_set(split, [Path(f).name for f in names])
    return groups


def _check_shard_set(split: str | None, names: list[str]) -> None:
    """`{split}-NNNNN-of-NNNNN.parquet` names say how many files the split has: one missing (a
    download cut short) would silently leave its records out of the job and the manifest, and two
    counts (files left from an older upload) would publish records twice."""
    shards = [m for m in map(_SHARD_NAME_RE.match, names) if m]
    if not shards:
        return
    counts = sorted({m.group("count") for m in shards})
    indexes = sorted(int(m.group("index")) for m in shards)
    want = list(range(int(counts[0])))
    if len(counts) > 1 or indexes != want:
        missing = sorted(set(want) - set(indexes))
        what = (f"files of {len(counts)} different counts (-of-{', -of-'.join(counts)}: left from another upload?)"
                if len(counts) > 1 else f"{len(indexes)} files named -of-{counts[0]}" + (
                    f", missing {', '.join(f'{i:05d}' for i in missing[:5])}{', …' if len(missing) > 5 else ''}"
                    if missing else ", some numbered twice or past the count"))
        raise InputError(f"split {split!r}: {what}; the split would be incomplete or hold records twice: "
                         "download the missing files, or remove the stray ones")


def _split_of(rel: Path) -> str | None:
    m = _SHARD_NAME_RE.match(rel.name)
    if m:
        return m.group("split")
    for part in [rel.stem, *reversed(rel.parts[:-1])]:
        words = set(re.split(r"[-_.\s]+", part.lower()))
        hits = [k for k in _KNOWN_SPLITS if k in words]
        if len(hits) == 1:
            return _SPLIT_ALIASES.get(hits[0], hits[0])
    return None


_SPLIT_ALIASES = {"valid": "validation", "dev": "validation", "eval": "validation"}


_KNOWN_SPLITS = {"train", "test", "validation", "valid", "dev", "eval"}


def _open_parquet_files(location: str, root: str, groups: dict, fs=None, kind: str = "parquet") -> Source:
    splits, schema = [], None
    for name, files in groups.items():
        rows = []
        for f in files:
            with _parquet_file(f, fs) as meta:
                s, n = meta.schema_arrow, meta.metadata.num_rows
            if schema is None:
                schema = s
            elif not _same_columns(schema, s):
                raise InputError(
                    f"{f}: its columns {s.names} ({_types(s)}) differ from the first file's "
                    f"{schema.names} ({_types(schema)}); every shard must have the same schema"
                )
            else:  # a column one writer declared `not null` and another did not: nullable, or its nulls fail the cast
                schema = pa.schema([a.with_nullable(a.nullable or b.nullable) for a, b in zip(schema, s)],
                                   metadata=schema.metadata)
            rows.append(n)
        splits.append(SplitInfo(name or "", files, rows))
    return Source(kind, location, root, splits, schema, "image", None, fs)


def _types(schema: pa.Schema) -> str:
    return ", ".join(str(t) for t in schema.types)


def _same_columns(a: pa.Schema, b: pa.Schema) -> bool:
    return a.names == b.names and all(x.equals(y) for x, y in zip(a.types, b.types))


def _open_arrow(location: str, path: Path) -> Source:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; all mean "not loadable"
        raise InputError(f"{location}: not a readable save_to_disk folder ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        items = list(ds.items())
        if not items:
            raise InputError(f"{location}: the DatasetDict has no splits")
        schema = items[0][1].features.arrow_schema
        splits = []
        for name, d in items:
            if not _same_columns(schema, d.features.arrow_schema):
                raise InputError(f"{location}: split {name!r} has different columns from {items[0][0]!r}")
            splits.append(SplitInfo(name, [str(path / name)], [d.num_rows]))
    else:
        schema = ds.features.arrow_schema
        splits = [SplitInfo("", [str(path)], [ds.num_rows])]
    return Source("arrow", location, str(path), splits, schema, "image", None)


def _size_or_none(p: Path) -> int | None:
    """A file's size, or None for a broken link (a record that will be quarantined)."""
    try:
        return p.stat().st_size
    except OSError:
        return None


def _files_under(location: str, path: Path, suffixes: tuple[str, ...]) -> list[str]:
    """The folder's files with one of `suffixes` (any case), relative, sorted. Links to folders are
    followed (rglob does not descend into them: their images, or a whole split, were left out of
    the job and its manifest without a word); a folder reached twice (a loop, or two links to it)
    is refused, as its records would be published twice, and so is a folder that cannot be listed
    (os.walk skips it silently). Hidden files and folders are not read."""
    def unlisted(e: OSError):
        raise InputError(f"{location}: the folder {e.filename} cannot be listed ({e.strerror or e}): its files "
                         "would be left out; fix its permissions, or move it out of the source folder")

    seen: dict[str, str] = {}
    files = []
    for top, dirs, names in os.walk(path, onerror=unlisted, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            raise InputError(f"{location}: the folder {real} is reached twice, as {seen[real]} and {top} (through "
                             "links): its files would be read twice; remove one of the links")
        seen[real] = top
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            p = Path(top) / name
            # a broken link is still a record: it is quarantined as unreadable, not silently left out
            if (not name.startswith(".") and p.suffix.lower() in suffixes
                    and (p.is_file() or (p.is_symlink() and not p.is_dir()))):
                files.append(p.relative_to(path).as_posix())
    return sorted(files)


def _open_image_folder(location: str, path: Path) -> Source:
    files = _files_under(location, path, IMAGE_EXTENSIONS)
    if not files:
        raise InputError(
            f"{location}: no Parquet files, no save_to_disk dataset and no image files "
            f"({', '.join(IMAGE_EXTENSIONS)}) found in this folder"
        )
    import datasets

    schema = datasets.Features({"image": datasets.Image()}).arrow_schema
    return Source("imagefolder", location, str(path), [SplitInfo("", files, [1] * len(files))], schema, "image", None)


def _finish(source: Source, image_column: str, id_column: str | None, splits: list[str] | None, limit: int | None) -> Source:
    unnamed = [s for s in source.splits if s.name == ""]
    if unnamed:
        if splits and len(splits) != 1:
            raise InputError(f"{source.location} has one unnamed split; --split can name it, but only with one name")
        unnamed[0].name = splits[0] if splits else DEFAULT_SPLIT
    elif splits:
        have = {s.name for s in source.splits}
        missing = [s for s in splits if s not in have]
        if missing:
            raise InputError(f"split(s) {', '.join(missing)} not in {source.location} (it has: {', '.join(sorted(have))})")
        source.splits = [s for s in source.splits if s.name in splits]
    for s in source.splits:
        if not _SPLIT_RE.match(s.name):
            raise InputError(f"split name {s.name!r} in {source.location} is not valid for the Hub layout "
                             f"({_SPLIT_RULE}): rename it, or pass --split to leave it out")
        s.limit = limit
    folded: dict[str, str] = {}
    for s in source.splits:  # shard files are named by split
        other = folded.setdefault(s.name.lower(), s.name)
        if other != s.name:
            raise InputError(f"splits {min(other, s.name)!r} and {max(other, s.name)!r} differ only in case: their "
                             "shard files would be one file on a case-insensitive file system (macOS, Windows); "
                             "rename one, or pass --split to leave one out")
    source.splits.sort(key=lambda s: (_SPLIT_ORDER.get(s.name, 9), s.name))

    names = source.schema.names
    if image_column not in names:
        raise InputError(f"{source.location} has no column {image_column!r} (columns: {', '.join(names)}); pass --image-column")
    t = source.schema.field(image_column).type
    if not (_is_image_struct(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)):
        raise InputError(
            f"column {image_column!r} is {t}, not images: expected a datasets Image column "
            "(struct of binary bytes and string path) or a binary column of encoded image files"
        )
    source.image_column = image_column
    if id_column is not None:
        if id_column not in names:
            raise InputError(f"{source.location} has no column {id_column!r} for --id-column (columns: {', '.join(names)})")
        if id_column == image_column:
            raise InputError("--id-column cannot be the image column")
        source.id_column = id_column
    else:
        source.id_column = "record_id" if "record_id" in names else None
    if not any(s.rows for s in source.splits):
        raise InputError(f"{source.location} has no records")
    return source


_SPLIT_ORDER = {"train": 0, "validation": 1, "valid": 1, "dev": 1, "test": 2}


def _is_image_struct(t: pa.DataType) -> bool:
    """A datasets Image column: `bytes` binary and `path` text, or null where no cell has one
    (pyarrow infers that from `{"bytes": b, "path": None}`); other field types would fail on every
    worker when the cells are read, a traceback instead of this clear refusal."""
    if not pa.types.is_struct(t):
        return False
    fields = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
    return ("bytes" in fields and "path" in fields
            and any(f(fields["bytes"]) for f in (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view))
            and any(f(fields["path"]) for f in (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view,
                                                pa.types.is_null)))


def _open_hub(repo_id: str) -> Source:
    """A Hub dataset through HfFileSystem: its Parquet files (or the Hub's Parquet
    conversion for other formats), read lazily with pyarrow. This is the one function
    that needs the network."""
    try:
        from huggingface_hub import HfFileSystem

        fs = HfFileSystem()
        base = f"datasets/{repo_id}"
        files = sorted(fs.glob(f"{base}/**/*.parquet"))
        if not files:
            base = f"datasets/{repo_id}@refs%2Fconvert%2Fparquet"
            files = sorted(fs.glob(f"{base}/**/*.parquet"))
    except Exception as e:  # noqa: BLE001 - network, auth, 404: all "cannot read it"
        raise InputError(
            f"cannot read Hub dataset {repo_id!r} ({type(e).__name__}: {str(e)[:200]}); check the id and your "
            "network or token, or download it (huggingface-cli download --repo-type dataset) and give the folder"
        ) from None
    if not files:
        raise InputError(f"Hub dataset {repo_id!r} has no Parquet files (nor a Parquet conversion)")
    rels = [f[len(base) + 1:] for f in files]
    if "@refs%2Fconvert%2Fparquet" in base:
        _check_hub_conversion(repo_id, rels)
    groups = _group_by_split(rels, None)
    groups = {k: [f"{base}/{r}" for r in v] for k, v in groups.items()}
    return _open_parquet_files(repo_id, base, groups, fs=fs, kind="hub")


def _check_hub_conversion(repo_id: str, rels: list[str]) -> None:
    """The Hub's Parquet conversion (`{config}/{split}/NNNN.parquet`) holds only the first 5 GB of
    a bigger split, in `partial-{split}`, and one folder per config: read as is, the job would
    leave the rest out of its manifest without a word, or mix configs into one split."""
    partial = sorted({p for r in rels for p in r.split("/")[:-1] if p.startswith("partial-")})
    configs = sorted({r.split("/")[0] for r in rels if "/" in r})
    if partial or len(configs) > 1:
        what = (f"the Hub's Parquet conversion of it is partial ({', '.join(partial)}: only the first 5 GB)"
                if partial else f"it has several configs ({', '.join(configs[:5])})")
        raise InputError(f"Hub dataset {repo_id!r}: {what}; download the files you want (huggingface-cli download "
                         "--repo-type dataset) and give their folder")


# --------------------------------------------------------------------------- reading


@contextmanager
def _parquet_file(path: str, fs):
    """The open ParquetFile, closed on leaving (with the file system's handle, which ParquetFile
    does not close: a Hub handle holds a connection, and a plan opens every file more than once)."""
    fh = None
    try:
        fh = None if fs is None else fs.open(path, "rb")
        pf = pq.ParquetFile(path if fh is None else fh)
    except (OSError, pa.ArrowInvalid) as e:
        if fh is not None:
            fh.close()
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None
    try:
        yield pf
    finally:
        pf.close()
        if fh is not None:
            fh.close()


def _read_parquet_range(path: str, fs, start: int, stop: int, columns) -> pa.Table:
    with _parquet_file(path, fs) as pf:
        groups, first, offset = [], None, 0
        for i in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            if offset + n > start and offset < stop:
                groups.append(i)
                if first is None:
                    first = offset
            offset += n
        try:
            table = pf.read_row_groups(groups, columns=columns)
        except (OSError, pa.ArrowException) as e:  # a damaged data page behind a valid footer
            raise InputError(f"{path}: rows {start}-{stop - 1} cannot be read ({str(e).splitlines()[0][:160]}); "
                             "repair or re-export the file, then run again with --resume") from None
    return table.slice(start - first, stop - start)


@functools.lru_cache(maxsize=8)
def _load_arrow_split(path: str):
    import datasets

    return datasets.load_from_disk(path)


def _cast_like(table: pa.Table, schema: pa.Schema, columns) -> pa.Table:
    target = schema if columns is None else pa.schema([schema.field(c) for c in columns])
    table = table.select(target.names)
    if not table.schema.equals(target, check_metadata=False):
        table = table.cast(target)
    return table.replace_schema_metadata(schema.metadata if columns is None else None)


def _read_image_files(source: Source, info: SplitInfo, start: int, stop: int) -> pa.Table:
    """Image-folder rows. Unreadable files become a null image; the worker quarantines them.
    Only regular files are read: a link to a pipe hung the job for ever, one to /dev/zero filled
    its memory (links out of the folder are followed: the Hub's download cache is made of them)."""
    data = []
    for rel in info.files[start:stop]:
        full = Path(source.root) / rel
        try:
            data.append({"bytes": full.read_bytes(), "path": None} if full.is_file() else None)
        except OSError:
            data.append(None)
    return pa.table({"image": pa.array(data, source.schema.field("image").type)}, schema=source.schema)


def image_bytes(source: Source, cell: Any) -> tuple[bytes | None, str | None]:
    """The encoded bytes of one image cell, or (None, reason). Struct cells with only a path
    (save_to_disk of local files) are read from that path, relative to the source folder."""
    if cell is None:
        if source.kind == "imagefolder":
            return None, "the image file cannot be read (a broken link, no permission, or not a regular file)"
        return None, "the image cell is empty"
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return bytes(cell), None
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:
            return bytes(cell["bytes"]), None
        p = cell.get("path")
        if not p:
            return None, "the image cell has neither bytes nor a path"
        full = _inside_root(source, p)
        if full is None:
            return None, ("the image cell names a file outside the source folder (or not a regular file), which is "
                          "not read: embed the image bytes in the dataset, or put the files inside its folder")
        try:
            if source.fs is not None:
                with source.fs.open(full, "rb") as fh:
                    return fh.read(), None
            with open(full, "rb") as fh:
                return fh.read(), None
        except OSError as e:
            # not the path: the manifest is public, and a file name can name the person
            return None, f"the image file its cell names cannot be read ({e.strerror or type(e).__name__})"
    return None, f"the image cell holds {type(cell).__name__}, not image bytes"


def _inside_root(source: Source, p: str) -> str | None:
    """Where a path-only cell's file is, or None when that is outside the source folder (after
    `..` and symlinks) or not a regular file. The cells come with the dataset, which may be
    someone else's: `../`, an absolute path or a link must not make the job read the runner's
    other files (and publish them with only their faces changed), nor hang on /dev/zero or a pipe.
    On the Hub: inside the dataset's repository (the runner's token could read private ones)."""
    if source.fs is not None:
        full = posixpath.normpath(f"{source.root}/{p}")
        return full if not p.startswith("/") and full.startswith(source.root.rstrip("/") + "/") else None
    if "\0" in p:
        return None
    full = os.path.realpath(os.path.join(source.root, p))  # an absolute p replaces root
    if not within(full, source.root) or (os.path.exists(full) and not os.path.isfile(full)):
        return None
    return full  # a missing file: "cannot be read"


def hf_features_json(schema: pa.Schema) -> dict | None:
    raw = (schema.metadata or {}).get(b"huggingface")
    return json.loads(raw) if raw else None
