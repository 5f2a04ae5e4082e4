"""Shared fixtures: ONE Ray instance for the whole session (starting Ray costs seconds, and
the test machine has 2 cores), the tiny trained model, identities, and small face datasets.

Nothing here is autouse: tests that do not ask for Ray never start it."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# One torch thread per process: on 2 cores, torch's default threads fight Ray's workers and
# each other (measured 0.6 s vs 22.5 s for one tiny-model call on a loaded machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)


# Settings that keep job tests fast: a few sampler steps on the 32 px tiny model.
FAST = {"steps": 4, "inversion_iters": 2}


def subprocess_env(**extra) -> dict:
    """Environment for `python -m anondata.cli` subprocesses and Ray workers: the repo importable."""
    env = dict(os.environ)
    paths = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="session")
def ray_address():
    """ray.init(num_cpus=2) once; yields the GCS address so subprocess jobs can join it."""
    import ray

    os.environ.update({k: v for k, v in subprocess_env().items() if k in ("PYTHONPATH", "RAY_AUTH_MODE")})
    os.environ.pop("RAY_ADDRESS", None)
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", object_store_memory=200 * 2**20)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from anondata.testing import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("model"), resolution=32)


@pytest.fixture(scope="session")
def identities(tmp_path_factory) -> dict:
    """owner (recipient, restores), runner (signs), stranger (neither)."""
    from anondata.identity import generate_identity

    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("owner", "runner", "stranger"):
        generate_identity(name=name).save(d / f"{name}.key", d / f"{name}.pub")
        out[name] = (str(d / f"{name}.key"), str(d / f"{name}.pub"))
    return out


def synthetic_faces(n: int, seed: int = 0, size=(44, 40)) -> list[np.ndarray]:
    """Small smooth face-like RGB images (not real people): a skin ellipse with eyes and mouth on
    a gradient, varied per record. Enough texture for the tiny model; no dataset needed."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        bg = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, rng.integers(0, 255))], -1)
        img = bg.astype(np.float64)
        cx, cy = w / 2 + rng.normal(0, 2), h / 2 + rng.normal(0, 2)
        face = ((xx - cx) / (w * 0.33)) ** 2 + ((yy - cy) / (h * 0.4)) ** 2 <= 1
        img[face] = rng.integers(150, 230, 3)
        for ex in (-0.13, 0.13):
            eye = (xx - cx - ex * w) ** 2 + (yy - cy + 0.1 * h) ** 2 <= 4
            img[eye] = 30
        mouth = (abs(xx - cx) < w * 0.12) & (abs(yy - cy - 0.2 * h) < 1.5)
        img[mouth] = (150, 40, 40)
        img += rng.normal(0, 6, img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def damage_first_data_page(path) -> None:
    """Flip bytes inside the first column chunk's data page, leaving the footer valid: a file that
    opens and counts its rows but cannot be read."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata.row_group(0).column(0)
    b = bytearray(Path(path).read_bytes())
    for i in range(meta.data_page_offset + 20, meta.data_page_offset + meta.total_compressed_size - 20, 7):
        b[i] ^= 0xFF
    Path(path).write_bytes(bytes(b))


def write_face_parquet(path, n: int, *, corrupt=(), seed: int = 0, id_column: str | None = "record_id",
                       jpeg_every: int = 2, size=(44, 40)) -> list[dict]:
    """A datasets-style Parquet file (Image feature) of n synthetic faces; rows in `corrupt`
    hold garbage bytes. Returns the rows written."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    imgs = synthetic_faces(n, seed, size)
    rows = []
    for i, a in enumerate(imgs):
        data = b"\x89PNG not really" if i in corrupt else encode(a, "JPEG" if jpeg_every and i % jpeg_every else "PNG")
        row = {"image": {"bytes": data, "path": f"person_{i}.png"}, "label": i % 3, "caption": f"row {i}"}
        if id_column:
            row = {id_column: f"rec-{i:03d}", **row}
        rows.append(row)
    feats = {"image": datasets.Image(), "label": datasets.Value("int64"), "caption": datasets.Value("string")}
    if id_column:
        feats = {id_column: datasets.Value("string"), **feats}
    schema = datasets.Features(feats).arrow_schema
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=3)
    return rows


@pytest.fixture(scope="session")
def release(ray_address, tiny_model, identities, tmp_path_factory) -> dict:
    """One finished release shared by the job and publish tests (treat it as read-only):
    7 records, row 2 corrupt, shards of 3, Parquet source with an id column."""
    from anondata.job.pipeline import JobOptions, run_anonymize

    d = tmp_path_factory.mktemp("release")
    rows = write_face_parquet(d / "src" / "faces.parquet", 7, corrupt={2})
    out = d / "out"
    result = run_anonymize(JobOptions(
        source=str(d / "src" / "faces.parquet"), out=str(out), recipients=[identities["owner"][1]],
        signing_key=identities["runner"][0], model=tiny_model, shard_size=3, batch_size=2,
        progress=False, **FAST,
    ))
    return {"dir": out, "rows": rows, "result": result, "source": d / "src" / "faces.parquet"}
