"""Shard names and the public/keys shard writers.

Why the driver writes shards (not the workers): a shard is committed as a unit (data file,
keys file, marker) and the resume journal must see those three steps in order. The driver
reads the shard's non-image columns from the source itself, so every input column keeps its
exact Arrow type; only the image column is replaced (same Arrow type, new bytes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..files import fsync_dir, make_dirs

ROW_GROUP_SIZE = 100  # what `datasets` uses for image data: small groups keep the viewer fast
DERIVED_ID_COLUMN = "record_id"


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}"


def data_path(name: str) -> str:
    return f"data/{name}.parquet"


def keys_path(name: str) -> str:
    return f"keys/{name}.keys.parquet"


def output_schema(source_schema: pa.Schema, image_column: str, add_id: bool) -> pa.Schema:
    """The public shards' schema: the input's, plus `record_id` first when ids are derived.
    The `huggingface` features metadata follows, so `datasets` decodes the image column; no
    other metadata does, of the schema or of a field: tools write what they like there (pandas
    names dropped columns; others a source path or a caption of the person), and it would be
    published unseen."""
    fields = [f.remove_metadata() for f in source_schema]
    meta = {k: v for k, v in (source_schema.metadata or {}).items() if k == b"huggingface"}
    if add_id:
        fields.insert(0, pa.field(DERIVED_ID_COLUMN, pa.string()))
        hf = json.loads(meta.get(b"huggingface", b"{}") or b"{}")
        feats = hf.setdefault("info", {}).get("features")
        if feats is None:
            feats = _features_for(source_schema, image_column)
        if feats is not None:
            hf["info"]["features"] = {DERIVED_ID_COLUMN: {"dtype": "string", "_type": "Value"}, **feats}
            meta[b"huggingface"] = json.dumps(hf).encode()
    elif b"huggingface" not in meta and _is_struct_image(source_schema.field(image_column).type):
        feats = _features_for(source_schema, image_column)
        if feats is not None:
            meta[b"huggingface"] = json.dumps({"info": {"features": feats}}).encode()
    return pa.schema(fields, metadata=meta or None)


def _is_struct_image(t: pa.DataType) -> bool:
    return pa.types.is_struct(t)


def _features_for(schema: pa.Schema, image_column: str) -> dict | None:
    """The `datasets` features of a source that has none, or None where `datasets` has no feature
    for one of its columns (a map, a union, an interval): the shards then carry no features, and
    readers take the Arrow types, as for the source (the job failed here, after its plan)."""
    import datasets

    try:
        feats = datasets.Features.from_arrow_schema(schema.remove_metadata()).to_dict()
    except (ValueError, TypeError, NotImplementedError):
        return None
    if _is_struct_image(schema.field(image_column).type):
        feats[image_column] = {"_type": "Image"}
    return feats


def image_array(values: list[bytes], arrow_type: pa.DataType) -> pa.Array:
    """New image cells in the input column's Arrow type. The struct's `path` is left empty:
    an input file name can itself identify a person, and the bytes are now PNG."""
    if pa.types.is_struct(arrow_type):
        return pa.array([{"bytes": v, "path": None} for v in values], arrow_type)
    return pa.array(values, arrow_type)


def build_public_table(base: pa.Table, schema: pa.Schema, image_column: str, images: list[bytes],
                       keep: list[bool], derived_ids: list[str] | None) -> pa.Table:
    """`base`: the shard's non-image input columns (all rows, in order); keep: which rows
    were anonymized; images: their new bytes, in order."""
    mask = pa.array(keep, pa.bool_())
    kept = base.filter(mask) if base.num_columns else None
    n = sum(keep)
    cols = []
    for f in schema:
        if f.name == image_column:
            cols.append(image_array(images, f.type))
        elif derived_ids is not None and f.name == DERIVED_ID_COLUMN and DERIVED_ID_COLUMN not in base.column_names:
            cols.append(pa.array([i for i, k in zip(derived_ids, keep) if k], pa.string()))
        else:
            cols.append(kept.column(f.name))
    table = pa.Table.from_arrays(cols, schema=schema)
    assert table.num_rows == n
    return table


def write_parquet_atomic(table: pa.Table, final: Path, tmp: Path) -> None:
    """Temp name, fsync, rename: a reader (or a resumed job) never sees half a shard."""
    make_dirs(final.parent)
    make_dirs(tmp.parent)
    pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)
