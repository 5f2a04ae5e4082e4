"""Sources (every local form + the Hub path through a stand-in filesystem), shard tables and
the dataset card. No Ray, no model: fast."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from anondata.errors import InputError
from anondata.job.shards import build_public_table, output_schema, shard_name
from anondata.job.sources import derived_id, image_bytes, open_source
from conftest import damage_first_data_page, encode, synthetic_faces, write_face_parquet


def test_parquet_file_keeps_schema_and_reads_ranges(tmp_path):
    rows = write_face_parquet(tmp_path / "faces.parquet", 8)
    s = open_source(str(tmp_path / "faces.parquet"))
    assert s.kind == "parquet" and [(x.name, x.rows) for x in s.splits] == [("train", 8)]
    assert s.id_column == "record_id"
    assert s.ids("train") == [r["record_id"] for r in rows]
    # a range across row groups (row_group_size=3) gives exactly those rows, with HF metadata
    t = s.read("train", 2, 7)
    assert t.column("record_id").to_pylist() == [r["record_id"] for r in rows[2:7]]
    assert b"huggingface" in t.schema.metadata
    assert s.read("train", 5, 6, ["caption"]).to_pylist() == [{"caption": "row 5"}]


def test_parquet_folder_hub_layout_splits_and_file_boundaries(tmp_path):
    d = tmp_path / "ds" / "data"
    a = write_face_parquet(d / "train-00000-of-00002.parquet", 4, seed=1)
    b = write_face_parquet(d / "train-00001-of-00002.parquet", 3, seed=2)
    for r in b:
        r["record_id"] = r["record_id"].replace("rec", "b")
    import datasets

    schema = pq.read_schema(d / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(b, schema=schema), d / "train-00001-of-00002.parquet")
    write_face_parquet(d / "test-00000-of-00001.parquet", 2, seed=3)
    s = open_source(str(tmp_path / "ds"))
    assert [(x.name, x.rows) for x in s.splits] == [("train", 7), ("test", 2)]
    ids = s.read("train", 2, 6, ["record_id"]).column(0).to_pylist()
    assert ids == [a[2]["record_id"], a[3]["record_id"], b[0]["record_id"], b[1]["record_id"]]
    assert [x.name for x in open_source(str(tmp_path / "ds"), splits=["test"]).splits] == ["test"]
    with pytest.raises(InputError, match="validation"):
        open_source(str(tmp_path / "ds"), splits=["validation"])
    assert datasets  # the layout is the one datasets itself writes


def test_shards_that_differ_only_in_nullability_read_across_their_boundary(tmp_path):
    """Writers declare nullability as they like (one shard `label int64 not null`, the next nullable
    with a null): such files are one schema, but their rows read together raised pyarrow's
    "Schema at index 1 was different" on the workers and the driver, a traceback mid-job."""
    d = tmp_path / "ds" / "data"
    d.mkdir(parents=True)
    imgs = [encode(a) for a in synthetic_faces(4)]
    strict = pa.schema([pa.field("image", pa.binary()), pa.field("label", pa.int64(), nullable=False)])
    pq.write_table(pa.table({"image": imgs[:2], "label": [0, 1]}, schema=strict), d / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"image": imgs[2:], "label": [2, None]}), d / "train-00001-of-00002.parquet")
    s = open_source(str(tmp_path / "ds"))
    assert s.read("train", 0, 4, ["label"]).column(0).to_pylist() == [0, 1, 2, None]
    assert s.read("train", 1, 3).column("image").to_pylist() == imgs[1:3]


def test_ids_are_read_in_blocks_across_files_past_the_limit(tmp_path, monkeypatch):
    """A plan reads every id, rows past --limit too (listed as skipped), block by block rather than
    the whole column at once (memory on a Hub dataset of millions of rows): blocks smaller than a
    row group and a file, ending inside one, give the ids in row order, and an empty id is named
    by its row in the split, whichever file and block it is in."""
    from anondata.job import sources

    monkeypatch.setattr(sources, "_ID_BLOCK", 2)
    d = tmp_path / "ds" / "data"
    a = write_face_parquet(d / "train-00000-of-00002.parquet", 5, seed=1)  # row groups of 3
    schema = pq.read_schema(d / "train-00000-of-00002.parquet")
    b = [{**r, "record_id": f"b-{i}"} for i, r in enumerate(write_face_parquet(tmp_path / "b.parquet", 4))]
    pq.write_table(pa.Table.from_pylist(b, schema=schema), d / "train-00001-of-00002.parquet")
    want = [r["record_id"] for r in a + b]
    for limit in (None, 1, 4, 6, 9, 20):
        s = open_source(str(tmp_path / "ds"), limit=limit)
        assert s.ids("train", all_rows=True) == want
        assert s.ids("train") == want[:limit]
    b[2]["record_id"] = " "
    pq.write_table(pa.Table.from_pylist(b, schema=schema), d / "train-00001-of-00002.parquet")
    with pytest.raises(InputError, match="split 'train' row 7: the id column 'record_id' is empty"):
        open_source(str(tmp_path / "ds"), limit=3).ids("train", all_rows=True)
    assert open_source(str(tmp_path / "ds"), limit=7).ids("train") == want[:7]  # row 7 is past it
    write_face_parquet(tmp_path / "f.parquet", 2)
    damage_first_data_page(tmp_path / "f.parquet")
    with pytest.raises(InputError, match=r"f\.parquet: the column 'record_id' cannot be read"):
        open_source(str(tmp_path / "f.parquet")).ids("train")


def test_hub_layout_with_a_missing_or_stray_file_is_refused(tmp_path):
    """The names say how many files a split has: a download cut short silently left a third of
    the split out of the job and its manifest (found by opening train-00000/00002-of-00003)."""
    d = tmp_path / "ds" / "data"
    write_face_parquet(d / "train-00000-of-00003.parquet", 2)
    write_face_parquet(d / "train-00002-of-00003.parquet", 2, seed=5)
    write_face_parquet(d / "test-00000-of-00001.parquet", 2, seed=6)
    with pytest.raises(InputError, match="split 'train': 2 files named -of-00003, missing 00001;.*download"):
        open_source(str(tmp_path / "ds"))
    write_face_parquet(d / "train-00001-of-00003.parquet", 2, seed=7)
    assert [(x.name, x.rows) for x in open_source(str(tmp_path / "ds")).splits] == [("train", 6), ("test", 2)]
    write_face_parquet(d / "train-00000-of-00002.parquet", 2, seed=8)  # left from an older upload
    with pytest.raises(InputError, match="split 'train': files of 2 different counts"):
        open_source(str(tmp_path / "ds"))


def test_split_from_file_name_word(tmp_path):
    write_face_parquet(tmp_path / "d" / "faces-validation.parquet", 2)
    assert [x.name for x in open_source(str(tmp_path / "d")).splits] == ["validation"]
    # a .PARQUET file was left out (and its split with it) while the others were read
    write_face_parquet(tmp_path / "d" / "faces-test.PARQUET", 3, seed=4)
    assert [(x.name, x.rows) for x in open_source(str(tmp_path / "d")).splits] == [("validation", 2), ("test", 3)]


def test_limit_split_name_and_missing_columns(tmp_path):
    write_face_parquet(tmp_path / "f.parquet", 6)
    s = open_source(str(tmp_path / "f.parquet"), splits=["dev"], limit=4)
    assert [(x.name, x.rows) for x in s.splits] == [("dev", 4)]
    assert s.read("dev", 2, 10).num_rows == 2  # clipped at the limit
    with pytest.raises(InputError, match="--image-column"):
        open_source(str(tmp_path / "f.parquet"), image_column="photo")
    with pytest.raises(InputError, match="--id-column"):
        open_source(str(tmp_path / "f.parquet"), id_column="nope")
    with pytest.raises(InputError, match="not images"):
        open_source(str(tmp_path / "f.parquet"), image_column="caption")
    with pytest.raises(InputError, match="does not exist"):
        open_source(str(tmp_path / "missing.parquet"))
    rel = tmp_path / "rel"  # a release given as a source: its keys/ were read as data (a schema error)
    (rel / "keys").mkdir(parents=True)
    (rel / "manifest.json").write_text("{}")
    with pytest.raises(InputError, match="is an anondata release .*give its data/ folder"):
        open_source(str(rel))
    # a struct named like an Image column whose fields are not bytes and text: a TypeError on every
    # worker (bytes(str)) before, found by a struct<bytes: string, path: string> column
    for fields in ([("bytes", pa.string()), ("path", pa.string())], [("bytes", pa.binary()), ("path", pa.int64())]):
        pq.write_table(pa.table({"image": pa.array([None], pa.struct(fields))}), tmp_path / "s.parquet")
        with pytest.raises(InputError, match="not images: expected a datasets Image column"):
            open_source(str(tmp_path / "s.parquet"))
    # but a path that is null in every cell is what pyarrow infers from {"bytes": b, "path": None}
    pq.write_table(pa.table({"image": [{"bytes": b"png", "path": None}]}), tmp_path / "s.parquet")
    assert open_source(str(tmp_path / "s.parquet")).image_column == "image"
    with pytest.raises(InputError, match="--limit"):
        open_source(str(tmp_path / "f.parquet"), limit=0)


def test_split_names_the_manifest_refuses_are_refused_before_the_job(tmp_path):
    """The manifest allows ASCII split names of at most 64 characters; the source accepted any
    Unicode word (`\\w`), of any length, and a `$` that let a trailing newline through. Such a job
    anonymized every record, then could not sign (finalize's manifest check), nor ever finish on
    --resume, which keeps the plan's split name."""
    from anondata.manifest import SPLIT_RE

    write_face_parquet(tmp_path / "f.parquet", 2)
    for bad in ("t\u00e9st", "\u0663", "train\n", "a" * 65):
        with pytest.raises(InputError, match="not valid"):
            open_source(str(tmp_path / "f.parquet"), splits=[bad])
    d = tmp_path / "hub"  # a named split from the files: not fixable with --split, so said at once
    write_face_parquet(d / "data" / "t\u00e9st-00000-of-00001.parquet", 2)
    with pytest.raises(InputError, match="not valid"):
        open_source(str(d))
    for good in ("a" * 64, "train.v2", "x_1"):
        assert SPLIT_RE.match(open_source(str(tmp_path / "f.parquet"), splits=[good]).splits[0].name)


def test_split_names_that_differ_only_in_case_are_refused(tmp_path):
    """Shard files are named by split: on a case-insensitive file system (macOS's and Windows'
    defaults) `Train`'s and `train`'s shards were one file, the second written over the first, and
    the signed manifest placed the first split's records in a file that holds the other's."""
    d = tmp_path / "d"
    write_face_parquet(d / "data" / "train-00000-of-00001.parquet", 2)
    write_face_parquet(d / "data" / "Train-00000-of-00001.parquet", 2, seed=1)
    with pytest.raises(InputError, match="'Train' and 'train' differ only in case"):
        open_source(str(d))
    assert [x.name for x in open_source(str(d), splits=["train"]).splits] == ["train"]


def test_derived_ids_without_id_column(tmp_path):
    write_face_parquet(tmp_path / "f.parquet", 3, id_column=None)
    s = open_source(str(tmp_path / "f.parquet"))
    assert s.id_column is None
    assert s.ids("train") == ["train-000000", "train-000001", "train-000002"] == [derived_id("train", i) for i in range(3)]


def test_image_folder_sorted_with_derived_ids(tmp_path):
    imgs = synthetic_faces(3)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    (tmp_path / "imgs" / "b.png").write_bytes(encode(imgs[1]))
    (tmp_path / "imgs" / "a.jpg").write_bytes(encode(imgs[0], "JPEG"))
    (tmp_path / "imgs" / "sub" / "c.png").write_bytes(encode(imgs[2]))
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    (tmp_path / "imgs" / ".hidden.png").write_bytes(b"x")
    (tmp_path / "imgs" / "phone.HEIC").write_bytes(b"heic")  # a record (quarantined if undecodable), not left out
    s = open_source(str(tmp_path / "imgs"))
    assert s.kind == "imagefolder" and s.splits[0].rows == 4 and s.id_column is None
    t = s.read("train", 0, 4)
    assert [c["bytes"] for c in t.column("image").to_pylist()] == [
        (tmp_path / "imgs" / p).read_bytes() for p in ("a.jpg", "b.png", "phone.HEIC", "sub/c.png")
    ]
    with pytest.raises(InputError, match="no Parquet files"):
        (tmp_path / "empty").mkdir()
        open_source(str(tmp_path / "empty"))


def test_image_folder_follows_links_to_folders_and_refuses_a_folder_reached_twice(tmp_path):
    """rglob does not descend into a linked folder: `imgs/more -> ../elsewhere` left its images out
    of the job and the manifest without a word. They are records; a folder reached twice (a loop,
    or two links to it) is refused, as its images would be published twice."""
    imgs = synthetic_faces(2)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    (tmp_path / "imgs" / "a.png").write_bytes(encode(imgs[0]))
    (tmp_path / "elsewhere" / "deep" / "b.png").write_bytes(encode(imgs[1]))
    (tmp_path / "imgs" / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    s = open_source(str(tmp_path / "imgs"))
    assert s.splits[0].files == ["a.png", "more/deep/b.png"]
    assert image_bytes(s, s.read("train", 1, 2).column(0)[0].as_py()) == (encode(imgs[1]), None)
    (tmp_path / "imgs" / "again").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(InputError, match="reached twice"):
        open_source(str(tmp_path / "imgs"))
    (tmp_path / "imgs" / "again").unlink()
    (tmp_path / "elsewhere" / "loop").symlink_to(tmp_path / "imgs", target_is_directory=True)
    with pytest.raises(InputError, match="reached twice"):
        open_source(str(tmp_path / "imgs"))


def test_a_subfolder_that_cannot_be_listed_is_an_error_not_left_out(tmp_path, monkeypatch):
    """The walk skipped a folder it could not list (no permission: rglob and os.walk ignore the
    error), and its images were left out of the job and the manifest without a word."""
    (tmp_path / "imgs" / "locked").mkdir(parents=True)
    (tmp_path / "imgs" / "a.png").write_bytes(encode(synthetic_faces(1)[0]))
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(InputError, match="locked.*cannot be listed.*Permission denied"):
        open_source(str(tmp_path / "imgs"))


def test_parquet_folder_reads_a_split_behind_a_link(tmp_path):
    """The same for Parquet: a split folder that is a link (`ds/test -> /data/test`) was left out,
    and the job published the other splits as the whole dataset."""
    write_face_parquet(tmp_path / "ds" / "train" / "part.parquet", 2)
    write_face_parquet(tmp_path / "elsewhere" / "part.parquet", 3, seed=1)
    (tmp_path / "ds" / "test").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert [(x.name, x.rows) for x in open_source(str(tmp_path / "ds")).splits] == [("train", 2), ("test", 3)]


def _in_thread(fn, timeout: float = 20):
    """fn() in a daemon thread: a test of something that used to hang fails instead of hanging."""
    import threading

    out = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert out, f"still running after {timeout} s"
    return out[0]


def test_broken_link_in_an_image_folder_is_a_record_and_a_damaged_page_a_clear_error(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(encode(synthetic_faces(1)[0]))
    (tmp_path / "imgs" / "b.jpg").symlink_to(tmp_path / "nowhere.jpg")
    s = open_source(str(tmp_path / "imgs"))
    assert s.splits[0].rows == 2 and s.fingerprint()  # counted (then quarantined as unreadable), not dropped
    assert s.read("train", 0, 2).column("image").to_pylist()[1] is None
    assert "cannot be read" in image_bytes(s, None)[1]  # the file, not "the image cell is empty"
    # a link to a pipe (or a device) is not read: it hung the job for ever (or filled its memory)
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "imgs" / "c.png").symlink_to(tmp_path / "pipe")
    s = open_source(str(tmp_path / "imgs"))
    assert s.splits[0].rows == 3
    cells = _in_thread(lambda: s.read("train", 0, 3).column("image").to_pylist())
    assert cells[0]["bytes"] and cells[1] is None and cells[2] is None
    # a Parquet file whose footer is fine but whose data page is not
    write_face_parquet(tmp_path / "f.parquet", 2)
    damage_first_data_page(tmp_path / "f.parquet")
    s = open_source(str(tmp_path / "f.parquet"))
    with pytest.raises(InputError, match=r"f\.parquet: rows 0-1 cannot be read"):
        s.read(s.splits[0].name, 0, 2)


def test_save_to_disk_dataset_and_dict(tmp_path):
    import datasets

    imgs = synthetic_faces(4)
    feats = datasets.Features({"record_id": datasets.Value("string"), "image": datasets.Image(),
                               "score": datasets.Value("float32")})
    ds = datasets.Dataset.from_dict(
        {"record_id": [f"x{i}" for i in range(4)], "image": [{"bytes": encode(a), "path": None} for a in imgs],
         "score": [0.5, 1.5, 2.5, 3.5]}, features=feats)
    ds.save_to_disk(str(tmp_path / "one"))
    s = open_source(str(tmp_path / "one"))
    assert s.kind == "arrow" and s.splits[0].rows == 4
    t = s.read("train", 1, 3)
    assert t.column("record_id").to_pylist() == ["x1", "x2"] and t.schema.field("score").type == pa.float32()
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    s2 = open_source(str(tmp_path / "dict"))
    assert [(x.name, x.rows) for x in s2.splits] == [("train", 4), ("test", 1)]


def test_path_only_image_cells_are_read_from_disk(tmp_path):
    img = encode(synthetic_faces(1)[0])
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "p.png").write_bytes(img)
    s = open_source(str(tmp_path / "pics"))
    assert image_bytes(s, {"bytes": None, "path": "p.png"}) == (img, None)
    assert image_bytes(s, {"bytes": None, "path": str(tmp_path / "pics" / "p.png")}) == (img, None)
    data, err = image_bytes(s, {"bytes": None, "path": "gone.png"})
    assert data is None and "cannot be read" in err and "gone" not in err  # the manifest is public: no file names
    assert image_bytes(s, None)[0] is None and image_bytes(s, b"abc") == (b"abc", None)


def test_path_only_cells_never_read_outside_the_source_folder(tmp_path, monkeypatch):
    """A path-only cell comes with the dataset: `../`, an absolute path, a link out of the folder
    or a device file must not make the job read (and publish) the runner's other files, nor hang.
    Found by a job whose Parquet named ../outside.png: it was anonymized and published."""
    img = encode(synthetic_faces(1)[0])
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "p.png").write_bytes(img)
    (tmp_path / "private.png").write_bytes(img)
    (tmp_path / "pics" / "link.png").symlink_to(tmp_path / "private.png")
    (tmp_path / "pics" / "sub").mkdir()
    s = open_source(str(tmp_path / "pics"))
    assert image_bytes(s, {"bytes": None, "path": "sub/../p.png"}) == (img, None)
    for p in ("../private.png", str(tmp_path / "private.png"), "link.png", "sub/../../private.png", "/dev/zero",
              "sub", "a\0b"):
        data, err = image_bytes(s, {"bytes": None, "path": p})
        assert data is None and "outside the source folder" in err and "private" not in err, p
    # the Hub: only files of the dataset's own repository
    rows = write_face_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet", 1)
    (tmp_path / "hub" / "data" / "p.png").write_bytes(img)
    import huggingface_hub

    _LocalHub.root = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub, "HfFileSystem", _LocalHub)
    h = open_source("user/faces")
    assert rows and image_bytes(h, {"bytes": None, "path": "data/p.png"}) == (img, None)
    for p in ("../other/data/p.png", "/datasets/user/private/p.png", "data/../../x/p.png"):
        data, err = image_bytes(h, {"bytes": None, "path": p})
        assert data is None and "outside the source folder" in err, p


class _LocalHub:
    """Stands in for HfFileSystem: 'datasets/USER/NAME/...' maps to a local folder."""

    root: Path

    def glob(self, pattern):
        base = "datasets/user/faces"
        assert pattern.startswith(base)
        return [f"{base}/{p.relative_to(self.root).as_posix()}" for p in sorted(self.root.rglob("*.parquet"))]

    def open(self, path, mode="rb"):
        return open(self.root / path.split("/", 3)[3], mode)


def test_hub_id_uses_hffilesystem(tmp_path, monkeypatch):
    rows = write_face_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet", 3)
    import huggingface_hub

    _LocalHub.root = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub, "HfFileSystem", _LocalHub)
    s = open_source("user/faces")
    assert s.kind == "hub" and s.splits[0].rows == 3
    assert s.read("train", 0, 3, ["record_id"]).column(0).to_pylist() == [r["record_id"] for r in rows]


def test_hub_parquet_files_are_closed_after_each_read(tmp_path, monkeypatch):
    """Footers (when the source is opened), row ranges and id blocks each opened a Hub file and
    left it to the garbage collector: HfFileSystem handles hold HTTP connections, and a plan of a
    dataset of thousands of files opens each several times."""
    from anondata.job import sources

    monkeypatch.setattr(sources, "_ID_BLOCK", 2)
    rows = write_face_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet", 5)
    import huggingface_hub

    opened = []

    class Hub(_LocalHub):
        def open(self, path, mode="rb"):
            opened.append(super().open(path, mode))
            return opened[-1]

    Hub.root = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub, "HfFileSystem", Hub)
    s = open_source("user/faces")
    assert s.read("train", 1, 4, ["record_id"]).column(0).to_pylist() == [r["record_id"] for r in rows[1:4]]
    assert s.ids("train", all_rows=True) == [r["record_id"] for r in rows]
    assert len(opened) >= 3 and all(f.closed for f in opened)


def test_hub_parquet_conversion_partial_or_several_configs_is_refused(tmp_path, monkeypatch):
    """Without Parquet files of its own, a Hub dataset is read from the Hub's conversion, which
    holds only the first 5 GB of a big split (`partial-train`) and a folder per config: both were
    read as if complete (the rest of the records missing from the manifest, configs mixed)."""
    import huggingface_hub

    class ConvertedHub:
        def glob(self, pattern):
            if "@refs%2Fconvert%2Fparquet" not in pattern:
                return []
            base = pattern.split("/**")[0]
            return [f"{base}/{p.relative_to(tmp_path).as_posix()}" for p in sorted(tmp_path.rglob("*.parquet"))]

        def open(self, path, mode="rb"):
            return open(tmp_path / path.split("/", 3)[3], mode)

    monkeypatch.setattr(huggingface_hub, "HfFileSystem", ConvertedHub)
    write_face_parquet(tmp_path / "default" / "train" / "0000.parquet", 2)
    assert [(x.name, x.rows) for x in open_source("user/faces").splits] == [("train", 2)]
    write_face_parquet(tmp_path / "other" / "train" / "0000.parquet", 2, seed=3)
    with pytest.raises(InputError, match="several configs \\(default, other\\); download"):
        open_source("user/faces")
    (tmp_path / "other" / "train" / "0000.parquet").unlink()
    (tmp_path / "default" / "train").rename(tmp_path / "default" / "partial-train")
    with pytest.raises(InputError, match="conversion of it is partial \\(partial-train: only the first 5 GB\\)"):
        open_source("user/faces")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub

    class Offline:
        def glob(self, pattern):
            raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "HfFileSystem", Offline)
    with pytest.raises(InputError, match="cannot read Hub dataset 'user/faces'.*download"):
        open_source("user/faces")


def test_public_table_keeps_columns_types_and_adds_derived_id(tmp_path):
    import datasets

    write_face_parquet(tmp_path / "f.parquet", 4, id_column=None)
    s = open_source(str(tmp_path / "f.parquet"))
    schema = output_schema(s.schema, "image", add_id=True)
    assert schema.names == ["record_id", "image", "label", "caption"]
    base = s.read("train", 0, 4, ["label", "caption"])
    new = [encode(np.zeros((9, 9, 3), np.uint8)) for _ in range(3)]
    t = build_public_table(base, schema, "image", new, [True, False, True, True], s.ids("train"))
    assert t.column("record_id").to_pylist() == ["train-000000", "train-000002", "train-000003"]
    assert t.column("label").to_pylist() == [0, 2, 0]
    assert [c["bytes"] for c in t.column("image").to_pylist()] == new
    assert all(c["path"] is None for c in t.column("image").to_pylist())  # no input file names leak
    out = tmp_path / "rel" / "data"
    out.mkdir(parents=True)
    pq.write_table(t, out / "train-00000-of-00001.parquet")
    ds = datasets.load_dataset(str(tmp_path / "rel"), split="train")
    assert ds.column_names == ["record_id", "image", "label", "caption"]
    assert ds[0]["image"].size == (9, 9)


def test_public_schema_of_columns_datasets_has_no_feature_for(tmp_path):
    """A Parquet file without `datasets` metadata (Spark, pandas) and a column `datasets` cannot
    describe (a map): the public schema's features for the added record_id (or the struct image)
    raised datasets' ValueError in the job after its plan, a traceback that --resume repeated.
    The shards are written without features metadata; every column keeps its Arrow type."""
    imgs = [encode(a) for a in synthetic_faces(2)]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    tags = pa.array([[("k", "v")], None], pa.map_(pa.string(), pa.string()))
    for image in (pa.array(imgs), pa.array([{"bytes": b, "path": None} for b in imgs], struct)):
        pq.write_table(pa.table({"image": image, "tags": tags, "n": [1, 2]}), tmp_path / "f.parquet")
        s = open_source(str(tmp_path / "f.parquet"))
        for add_id in (True, False):
            schema = output_schema(s.schema, "image", add_id=add_id)
            assert schema.names == ["record_id"] * add_id + ["image", "tags", "n"]
            t = build_public_table(s.read("train", 0, 2, ["tags", "n"]), schema, "image", imgs[1:], [False, True],
                                   s.ids("train"))
            assert t.column("tags").type == tags.type and t.column("tags").to_pylist() == [None]


def test_card_yaml_and_shard_names():
    from anondata.job.card import dataset_card

    plan = {"splits": [{"name": "train", "rows": 3, "shards": [{}]}, {"name": "test", "rows": 1, "shards": [{}]}],
            "options": {"faces": {"mode": "aligned", "box": None, "on_no_face": "quarantine"}},
            "source": {"kind": "parquet", "image_column": "image", "id_column": "record_id"},
            "dataset_id": "0" * 32, "signer": "f" * 32}
    text = dataset_card(plan, {"model": {"name": "m", "sha256": "a" * 64}, "settings": {"steps": 4}},
                        {"anonymized": 3, "quarantined": 1}, license="cc-by-4.0")
    head = text.split("---")[1]
    import yaml

    meta = yaml.safe_load(head)
    assert meta["license"] == "cc-by-4.0"
    assert meta["configs"][0]["data_files"] == [{"split": "train", "path": "data/train-*"},
                                                {"split": "test", "path": "data/test-*"}]
    assert "quarantined records: 1" in text and "a" * 64 in text
    assert shard_name("train", 3, 12) == "train-00003-of-00012"
    assert json.dumps(meta)


def test_binary_image_column_stays_binary(tmp_path):
    """A plain binary column of encoded images (no datasets metadata) keeps its Arrow type."""
    imgs = [encode(a) for a in synthetic_faces(2)]
    pq.write_table(pa.table({"id": pa.array([7, 9]), "img": pa.array(imgs, pa.large_binary())}), tmp_path / "b.parquet")
    s = open_source(str(tmp_path / "b.parquet"), image_column="img", id_column="id")
    assert s.ids("train") == ["7", "9"]
    schema = output_schema(s.schema, "img", add_id=False)
    assert schema.field("img").type == pa.large_binary()
    t = build_public_table(s.read("train", 0, 2, ["id"]), schema, "img", [b"new"], [False, True], None)
    assert t.to_pylist() == [{"id": 9, "img": b"new"}]


def test_other_picture_columns_are_refused_until_dropped_or_kept(tmp_path):
    """Only the image column is anonymized and the others are published as they are, so any
    other column that can hold a picture, at any depth, stops the job until it is dropped or
    kept; a dropped column leaves the schema, the features metadata and every read. Strings (a
    file name) are not pictures."""
    import datasets

    from anondata.job.columns import choose_columns

    img = encode(synthetic_faces(1)[0])
    schema = datasets.Features({
        "record_id": datasets.Value("string"), "image": datasets.Image(), "original": datasets.Image(),
        "gallery": datasets.Sequence(datasets.Image()), "file_path": datasets.Value("string"),
        "label": datasets.Value("int64"),
    }).arrow_schema
    for name, t in {"thumb": pa.binary(), "digest": pa.binary(4), "meta": pa.struct([("raw", pa.large_binary()), ("w", pa.int32())]),
                    "by_name": pa.map_(pa.string(), pa.binary()), "nested": pa.list_(pa.list_(pa.binary_view()))}.items():
        schema = schema.append(pa.field(name, t))
    row = {"record_id": "r0", "image": {"bytes": img, "path": None}, "original": {"bytes": img, "path": "alice.png"},
           "gallery": [{"bytes": img, "path": None}], "file_path": "photos/alice.png", "label": 1, "thumb": img,
           "digest": b"abcd", "meta": {"raw": img, "w": 3}, "by_name": [("a", img)], "nested": [[img]]}
    f = str(tmp_path / "f.parquet")
    pq.write_table(pa.Table.from_pylist([row], schema=schema), f)
    risky = ["original", "gallery", "thumb", "digest", "meta", "by_name", "nested"]
    with pytest.raises(InputError, match="--drop-column NAME.*--keep-column NAME") as e:
        choose_columns(open_source(f), [], [])
    assert all(f"{c} (" in str(e.value) for c in risky)
    assert not any(f"{c} (" in str(e.value) for c in ("file_path", "label", "record_id"))
    for c in risky:  # each one alone is enough to refuse
        with pytest.raises(InputError, match=f"column\\(s\\) {c} "):
            choose_columns(open_source(f), [x for x in risky if x != c], [])

    s = open_source(f)
    choose_columns(s, ["original", "gallery", "digest", "meta", "by_name", "nested"], ["thumb"])
    assert s.schema.names == ["record_id", "image", "file_path", "label", "thumb"]
    assert s.read("train", 0, 1).column_names == s.schema.names
    features = json.loads(output_schema(s.schema, "image", add_id=False).metadata[b"huggingface"])["info"]["features"]
    assert set(features) == {"record_id", "image", "file_path", "label"}  # the Hub's schema names no dropped column
    for drop, keep, msg in ((["nope"], [], "--drop-column nope: no such column"), ([], ["image"], "image column"),
                            (["record_id"], [], "id column"), (["thumb"], ["thumb"], "both")):
        with pytest.raises(InputError, match=msg):
            choose_columns(open_source(f), drop, keep)


def test_text_columns_holding_encoded_pictures_are_refused(tmp_path, monkeypatch):
    """Base64 images and data: URLs are pictures in a string column, which was published as it
    is (found by a Parquet file with a `thumb_b64` column: choose_columns let it through). Plain
    text, ids and hex digests still pass."""
    import base64

    from anondata.job.columns import choose_columns

    png, jpg = encode(synthetic_faces(1)[0]), encode(synthetic_faces(1)[0], "JPEG")
    b64 = base64.b64encode
    risky = {
        "data_url": pa.array(["x", "data:image/png;base64," + b64(png).decode()]),
        "png_b64": pa.array([b64(png).decode(), None], pa.large_string()),
        "jpg_urlsafe": pa.array([base64.urlsafe_b64encode(jpg).decode(), "x"], pa.string_view()),
        "in_list": pa.array([[], ["y", b64(jpg).decode()]], pa.list_(pa.string())),
        "in_struct": pa.array([{"s": "a"}, {"s": b64(png).decode()}], pa.struct([("s", pa.string())])),
    }
    safe = {"caption": pa.array(["a face", "iVBOR is how PNG starts"]), "digest": pa.array(["0" * 64, "f" * 64])}
    f = tmp_path / "f.parquet"
    pq.write_table(pa.table({"image": pa.array([png, png], pa.binary()), **risky, **safe}), f)
    with pytest.raises(InputError, match="--drop-column NAME") as e:
        choose_columns(open_source(str(f)), [], [])
    assert "data_url (text holding an encoded picture, e.g. split 'train' row 1)" in str(e.value)
    assert all(f"{c} (" in str(e.value) for c in risky) and not any(f"{c} (" in str(e.value) for c in safe)
    import anondata.job.columns as columns_mod

    monkeypatch.setattr(columns_mod, "SCAN_ROWS", 1)  # read in blocks: the hit is found, at its row
    with pytest.raises(InputError, match=r"data_url \(text holding an encoded picture, e.g. split 'train' row 1\)"):
        choose_columns(open_source(str(f)), [], [])
    s = open_source(str(f))
    choose_columns(s, list(risky), [])
    assert s.schema.names == ["image", "caption", "digest"]
    pq.write_table(pa.table({"image": pa.array([png, png], pa.binary()), "png_b64": risky["png_b64"]}), f)
    choose_columns(open_source(str(f), limit=1), [], ["png_b64"])  # kept on the runner's word


def test_fingerprint_sees_renamed_reordered_or_replaced_inputs(tmp_path):
    """Resume reads rows by position: a renamed image or reordered rows would shift them (one
    record published twice, another never), which the row counts alone do not show."""
    d = tmp_path / "pics"
    d.mkdir()
    for n, a in zip("abcd", synthetic_faces(4)):
        (d / f"{n}.png").write_bytes(encode(a))
    before = open_source(str(d)).fingerprint()
    assert open_source(str(d)).fingerprint() == before
    (d / "a.png").rename(d / "e.png")
    after = open_source(str(d)).fingerprint()["splits"]["train"]
    assert after["files"] != before["splits"]["train"]["files"] and after["ids"] == before["splits"]["train"]["ids"]

    f = tmp_path / "f.parquet"
    write_face_parquet(f, 4)
    s = open_source(str(f), limit=2)
    assert len(s.ids("train", all_rows=True)) == 4 and len(s.ids("train")) == 2
    fp = s.fingerprint()
    pq.write_table(pq.read_table(f).take([0, 1, 3, 2]), f, row_group_size=3)  # same rows, past the limit reordered
    moved = open_source(str(f), limit=2).fingerprint()["splits"]["train"]
    assert moved["ids"] != fp["splits"]["train"]["ids"] and moved["files"] != fp["splits"]["train"]["files"]
