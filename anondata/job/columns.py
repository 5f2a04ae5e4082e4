"""Which of a source's other columns may be published: only the image column is anonymized, and
every other column goes out as it is, so one that can hold a picture is refused until named."""

from __future__ import annotations

import json

import pyarrow as pa

from ..errors import InputError
from .sources import Source, hf_features_json


def choose_columns(source: Source, drop: list[str], keep: list[str]) -> None:
    """Fail closed on the other columns: only the image column is anonymized and the rest are
    published as they are, so any other column that can hold a picture (binary data at any
    depth, or a datasets Image / Video feature) is refused until the runner names it: dropped
    from the release (`drop`), or kept on their word that it holds no faces (`keep`). Dropped
    columns leave `source.schema` and its features metadata, so nothing reads or publishes
    them. A string column (a file name, a path) is published as it is, unless a value in it is
    an encoded picture (base64, a data: URL: `_encoded_picture_in`)."""
    names = source.schema.names
    for opt, given in (("--drop-column", drop), ("--keep-column", keep)):
        unknown = [c for c in given if c not in names]
        if unknown:
            raise InputError(
                f"{opt} {', '.join(unknown)}: no such column in {source.location} (columns: {', '.join(names)})")
        if source.image_column in given:
            raise InputError(f"{opt} {source.image_column}: that is the image column, the one that is anonymized")
    both = sorted(set(drop) & set(keep))
    if both:
        raise InputError(f"column(s) {', '.join(both)} given to both --drop-column and --keep-column; choose one")
    if source.id_column in drop:
        raise InputError(f"--drop-column {source.id_column}: that is the id column, which the manifest and restore "
                         "need; pass --id-column to use another column as the id")
    feats = ((hf_features_json(source.schema) or {}).get("info") or {}).get("features") or {}
    risky = []
    for f in source.schema:
        if f.name in (source.image_column, *drop, *keep):
            continue
        if _feature_has_picture(feats.get(f.name) if isinstance(feats, dict) else None):
            risky.append(f"{f.name} (a datasets image feature)")
        elif _holds_binary(f.type):
            t = str(f.type)
            risky.append(f"{f.name} (binary data: {t if len(t) <= 60 else t[:59] + '…'})")
        elif _holds_string(f.type) and (where := _encoded_picture_in(source, f.name)):
            risky.append(f"{f.name} (text holding an encoded picture, e.g. {where})")
    if risky:
        raise InputError(
            f"{source.location}: column(s) {'; '.join(risky)} may hold pictures of faces, and only the image column "
            f"{source.image_column!r} is anonymized (the others are published as they are). For each, pass "
            "--drop-column NAME to leave it out of the release, or --keep-column NAME if it holds no faces "
            "(published unchanged)"
        )
    if drop:
        source.schema = _without_columns(source.schema, set(drop))


_PICTURE_FEATURES = ("Image", "Video")


def _feature_has_picture(feature) -> bool:
    if isinstance(feature, dict):
        return feature.get("_type") in _PICTURE_FEATURES or any(_feature_has_picture(v) for v in feature.values())
    if isinstance(feature, list):
        return any(_feature_has_picture(v) for v in feature)
    return False


def _holds(t: pa.DataType, leaf) -> bool:
    """Whether `leaf(type)` holds at any depth: struct fields, list and map values, dictionary
    values, extension storage."""
    if leaf(t):
        return True
    if pa.types.is_dictionary(t):
        return _holds(t.value_type, leaf)
    if isinstance(t, pa.BaseExtensionType):
        return _holds(t.storage_type, leaf)
    return any(_holds(t.field(i).type, leaf) for i in range(t.num_fields))


def _holds_binary(t: pa.DataType) -> bool:
    return _holds(t, lambda u: (pa.types.is_binary(u) or pa.types.is_large_binary(u) or pa.types.is_fixed_size_binary(u)
                                or pa.types.is_binary_view(u)))


def _holds_string(t: pa.DataType) -> bool:
    return _holds(t, lambda u: pa.types.is_string(u) or pa.types.is_large_string(u) or pa.types.is_string_view(u))


# A picture in text: a data: URL of an image, or base64 that starts like PNG, JPEG, GIF, WebP or TIFF
# (standard or URL-safe alphabet; base64 keeps a file's first bytes at its start).
_ENCODED_PICTURE = r"^\s*(data:image/|(iVBORw0KGgo|/9j/|_9j_|R0lGOD[dl]h|UklGR|SUkqA|TU0AK)[A-Za-z0-9+/_=-]{60})"


def _encoded_picture_in(source: Source, column: str) -> str | None:
    """Where the first string value of `column` (at any depth) holding an encoded picture is
    ("split S row N"), or None. Text columns are published as they are, and a column of base64
    images or data: URLs is a column of pictures all the same. Reads the column (only the rows
    the job publishes), not the images."""
    import pyarrow.compute as pc

    def leaves(a: pa.Array):
        t = a.type
        if pa.types.is_dictionary(t):
            a, t = a.dictionary_decode(), t.value_type
        if isinstance(a, pa.ExtensionArray):
            a, t = a.storage, t.storage_type
        if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
            yield a, True
        elif pa.types.is_struct(t):
            for i in range(t.num_fields):
                yield from leaves(a.field(i))  # the same rows
        elif pa.types.is_map(t):
            yield from ((x, False) for x, _ in leaves(a.keys))
            yield from ((x, False) for x, _ in leaves(a.items))
        elif hasattr(a, "flatten") and t.num_fields == 1:  # lists of any kind
            yield from ((x, False) for x, _ in leaves(a.flatten()))

    for info in source.splits:
        for start in range(0, info.rows, SCAN_ROWS):  # in blocks: a split's text can be larger than memory
            col = source._read(info, start, min(start + SCAN_ROWS, info.rows), [column]).column(0)
            for chunk_start, chunk in _chunks(col, start):
                for values, rows_known in leaves(chunk):
                    hits = pc.match_substring_regex(values.cast(pa.large_string()), _ENCODED_PICTURE)
                    if pc.any(hits).as_py():
                        first = pc.index(hits, True).as_py()
                        return f"split {info.name!r} row {chunk_start + first}" if rows_known else f"split {info.name!r}"
    return None


SCAN_ROWS = 65536


def _chunks(col: pa.ChunkedArray, start: int = 0):
    for chunk in col.chunks:
        yield start, chunk
        start += len(chunk)


def _without_columns(schema: pa.Schema, drop: set[str]) -> pa.Schema:
    """`schema` less `drop`, in its fields and in the features metadata the Hub and `datasets`
    read, which would otherwise announce a column the shards do not have."""
    meta = dict(schema.metadata or {})
    hf = hf_features_json(schema) or {}
    info = hf.get("info")
    if isinstance(info, dict) and isinstance(info.get("features"), dict):
        info["features"] = {k: v for k, v in info["features"].items() if k not in drop}
        meta[b"huggingface"] = json.dumps(hf).encode()
    return pa.schema([f for f in schema if f.name not in drop], metadata=meta or None)


# --------------------------------------------------------------------------- the Hub
