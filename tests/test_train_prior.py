"""jobs/train_prior.py on a tiny synthetic Parquet: trains, saves a loadable diffusers folder
(fp16 safetensors, sharded), resumes exactly where it stopped, logs the loss."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _load_job(name: str = "train_prior"):
    """A fresh copy of jobs/<name>.py (tests may replace its functions)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny_parquet(path: Path, n: int = 12, size: int = 20) -> Path:
    """datasets.Image-style struct column; 20 px images so the job's resize path runs too."""
    rng = np.random.default_rng(0)
    cells = []
    for _ in range(n):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        cells.append({"bytes": buf.getvalue(), "path": None})
    image_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array(cells, type=image_t)}), path)
    return path


TINY = ["--resolution", "16", "--channels", "32,64", "--attn-levels", "1", "--norm-groups", "8",
        "--head-dim", "8", "--batch-size", "2", "--threads", "1", "--log-every", "1", "--device", "cpu",
        "--shard-mb", "1", "--warmup-steps", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    job = _load_job()
    tmp = tmp_path_factory.mktemp("prior")
    data = _tiny_parquet(tmp / "faces.parquet")
    run = tmp / "run"
    assert job.main(["--data", str(data), "--run", str(run), "--max-steps", "3", *TINY]) == 0
    first = torch.load(run / "checkpoint.pt", weights_only=False)
    assert job.main(["--data", str(data), "--run", str(run), "--max-steps", "5", *TINY]) == 0
    return job, data, run, first


def test_resume_continues_from_checkpoint(trained):
    _job, _data, run, first = trained
    assert first["step"] == 3
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 5
    steps = [json.loads(line)["step"] for line in (run / "loss.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # resumed at 4, not from scratch
    losses = [json.loads(line)["loss"] for line in (run / "loss.jsonl").read_text().splitlines()]
    assert all(np.isfinite(losses))
    # The resumed run really trained: weights moved after step 3.
    assert any(not torch.equal(first["model"][n], ck["model"][n]) for n in ck["model"])
    assert ck["opt"]["state"], "optimizer state must be restored and carried on" 


def test_latest_is_a_loadable_fp16_sharded_diffusers_folder(trained):
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
    from safetensors import safe_open

    _job, _data, run, _first = trained
    latest = run / "latest"
    assert latest.is_symlink() and latest.resolve().name == "step-0000005"
    files = sorted((latest / "unet").glob("*.safetensors"))
    assert len(files) >= 2, "expected shards with --shard-mb 1"
    assert (latest / "unet" / "diffusion_pytorch_model.safetensors.index.json").exists()
    for f in files:
        assert f.stat().st_size <= 1_000_000 + 64_000  # shard limit (+ header slack)
        with safe_open(str(f), framework="pt") as sf:
            assert {sf.get_tensor(k).dtype for k in sf.keys()} == {torch.float16}
    unet = UNet2DModel.from_pretrained(str(latest / "unet"))
    assert unet.config.sample_size == 16 and tuple(unet.config.block_out_channels) == (32, 64)
    x = torch.zeros(1, 3, 16, 16, dtype=unet.dtype)
    assert unet(x, torch.tensor([10])).sample.shape == (1, 3, 16, 16)
    ddim = DDIMScheduler.from_pretrained(str(latest / "scheduler"))
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    assert ddim.config.prediction_type == "epsilon" and not ddim.config.clip_sample
    assert torch.allclose(ddim.alphas_cumprod, ref.alphas_cumprod)
    meta = json.loads((latest / "train_meta.json").read_text())
    assert meta["step"] == 5
    # the mean face the anonymizer's flip centres on: recomputed from the training images
    from anondata.backends import read_face_mean
    from anondata.faces import aligned_mask

    imgs = _job.load_images(str(_data), 16).permute(0, 2, 3, 1).numpy()
    want = imgs[:, aligned_mask(16)].reshape(-1, 3).astype(np.float64).mean(0) / 127.5 - 1
    assert np.allclose(read_face_mean(latest, 3), want, atol=1e-4)


def test_snapshot_holds_the_ema_weights(trained):
    from diffusers import UNet2DModel

    _job, _data, run, _first = trained
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    unet = UNet2DModel.from_pretrained(str(run / "latest" / "unet"), torch_dtype=torch.float32)
    sd = unet.state_dict()
    for name, w in ck["ema"].items():
        assert torch.allclose(sd[name], w.half().float()), name


def test_architecture_mismatch_on_resume_is_a_clear_error(trained, capsys):
    job, data, run, _first = trained
    other = [a if a != "32,64" else "16,32" for a in TINY]
    with pytest.raises(SystemExit, match="architecture flags"):
        job.main(["--data", str(data), "--run", str(run), "--max-steps", "6", *other])


def test_a_stop_signal_mid_step_saves_whole_steps_and_the_resume_matches_an_unstopped_run(trained, tmp_path,
                                                                                        monkeypatch):
    """`kill PID` arriving inside a training step (here: after the optimizer step, before the EMA
    update) must not save a half-done step: the model one update ahead of its EMA and step counter,
    which a resume then trains again with other noise."""
    import os
    import signal

    job, data, _run, _first = trained
    real_lerp, calls = torch._foreach_lerp_, []

    def lerp(*a, **kw):
        calls.append(1)
        if len(calls) == 4:  # inside step 4
            os.kill(os.getpid(), signal.SIGTERM)
        return real_lerp(*a, **kw)

    monkeypatch.setattr(torch, "_foreach_lerp_", lerp)
    run = tmp_path / "run"
    assert job.main(["--data", str(data), "--run", str(run), "--max-steps", "5", *TINY]) == 0
    monkeypatch.setattr(torch, "_foreach_lerp_", real_lerp)
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 4  # step 4 finished, then saved
    assert job.main(["--data", str(data), "--run", str(run), "--max-steps", "5", *TINY]) == 0
    stopped, straight = (torch.load(r / "checkpoint.pt", weights_only=False) for r in (run, _run))
    assert stopped["step"] == straight["step"] == 5
    for part in ("model", "ema"):
        assert all(torch.equal(stopped[part][k], straight[part][k]) for k in straight[part]), part
    assert torch.equal(stopped["gen"], straight["gen"])
    assert getattr(signal.getsignal(signal.SIGTERM), "__name__", "") != "_stop"  # the caller's handler is back


def test_a_periodic_save_at_the_last_step_is_not_written_again(tmp_path, monkeypatch):
    """--save-every-steps hitting --max-steps saved the same step twice: the second save deletes
    snapshots/step-N (which `latest` points to) before renaming the new copy in."""
    job = _load_job()
    data = _tiny_parquet(tmp_path / "faces.parquet")
    real, saved = job.publish_snapshot, []
    monkeypatch.setattr(job, "publish_snapshot", lambda run, ema, ddim, step, *a, **kw: saved.append(step) or
                        real(run, ema, ddim, step, *a, **kw))
    run = tmp_path / "run"
    assert job.main(["--data", str(data), "--run", str(run), "--max-steps", "2", "--save-every-steps", "2",
                     *TINY]) == 0
    assert saved == [2]
    assert (run / "latest").resolve().name == "step-0000002"


def test_offset_noise_reaches_the_training_noise_and_the_snapshot_meta(tmp_path):
    job = _load_job()
    data = _tiny_parquet(tmp_path / "faces.parquet")
    losses = {}
    for offset in ("0", "0.5"):
        run = tmp_path / f"run-{offset}"
        assert job.main(["--data", str(data), "--run", str(run), "--max-steps", "2", "--offset-noise", offset,
                         *TINY]) == 0
        losses[offset] = [json.loads(line)["loss"] for line in (run / "loss.jsonl").read_text().splitlines()]
        meta = json.loads((run / "latest" / "train_meta.json").read_text())
        assert meta["offset_noise"] == float(offset)
    assert losses["0"] != losses["0.5"]  # same seed: only the offset differs


def test_v_prediction_zero_snr_snapshot_loads_as_such(tmp_path):
    from anondata.backends import load_backend

    job = _load_job()
    data = _tiny_parquet(tmp_path / "faces.parquet")
    run = tmp_path / "run"
    with pytest.raises(SystemExit, match="needs --prediction-type v_prediction"):
        job.main(["--data", str(data), "--run", str(run), "--max-steps", "1", "--zero-snr", *TINY])
    assert job.main(["--data", str(data), "--run", str(run), "--max-steps", "2", "--prediction-type", "v_prediction",
                     "--zero-snr", *TINY]) == 0
    backend = load_backend(str(run / "latest"), device="cpu")
    assert backend.prediction_type == "v_prediction"
    assert float(backend.alphas_cumprod[-1]) == 0.0 and float(backend.alphas_cumprod[-2]) > 0.0
    meta = json.loads((run / "latest" / "train_meta.json").read_text())
    assert meta["scheduler"]["prediction_type"] == "v_prediction" and meta["scheduler"]["rescale_betas_zero_snr"]


def test_parquet_without_image_bytes_is_rejected(tmp_path):
    job = _load_job()
    image_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    path = tmp_path / "paths_only.parquet"
    pq.write_table(pa.table({"image": pa.array([{"bytes": None, "path": "a.jpg"}], type=image_t)}), path)
    with pytest.raises(SystemExit, match="no image bytes"):
        job.load_images(str(path), 16)


EMBEDDED = ROOT / "anondata" / "models" / "embedded"


@pytest.mark.skipif(not (EMBEDDED / "unet" / "config.json").is_file(), reason="embedded prior not shipped yet")
def test_shipped_embedded_prior_is_small_sharded_fp16_and_loads_offline(monkeypatch):
    from safetensors import safe_open

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = [p for p in EMBEDDED.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30 * 2**20
    weights = sorted((EMBEDDED / "unet").glob("*.safetensors"))
    assert weights and all(p.stat().st_size <= 16 * 2**20 for p in weights)
    for f in weights:
        with safe_open(str(f), framework="pt") as sf:
            assert {sf.get_tensor(k).dtype for k in sf.keys()} == {torch.float16}
    assert (EMBEDDED / "scheduler" / "scheduler_config.json").is_file()
    card = (EMBEDDED / "MODEL_CARD.md").read_text()
    assert "research" in card.lower() and "CelebA" in card and "jobs/train_prior.py" in card
    from anondata.anonymizer import Anonymizer

    anon = Anonymizer.from_pretrained("embedded", device="cpu", steps=2, inversion_iters=0)
    assert anon.resolution == 64 and anon.face_mean == (3204, -193, -1772)  # anondata.json
    assert anon.model_info["name"] == "embedded"
    # the priors earlier versions shipped are named by restore errors; the current one must not be
    from anondata.backends import EARLIER_EMBEDDED

    assert anon.model_info["sha256"] not in EARLIER_EMBEDDED and len(set(EARLIER_EMBEDDED.values())) == len(EARLIER_EMBEDDED)


def test_learning_rate_schedule():
    job = _load_job()
    a = job.parse_args(["--data", "x", "--run", "y", "--lr", "1e-3", "--warmup-steps", "10"])
    assert job.lr_at(0, a) == pytest.approx(1e-4) and job.lr_at(9, a) == job.lr_at(5000, a) == pytest.approx(1e-3)
    a = job.parse_args(["--data", "x", "--run", "y", "--lr", "1e-3", "--warmup-steps", "10",
                        "--decay-start", "100", "--decay-steps", "50", "--decay-floor", "0.1"])
    assert job.lr_at(99, a) == pytest.approx(1e-3) and job.lr_at(125, a) == pytest.approx(0.55e-3)
    assert job.lr_at(150, a) == job.lr_at(10_000, a) == pytest.approx(1e-4)


def test_prior_quality_ddpm_sampler_is_seeded_and_handles_zero_terminal_snr(trained, tmp_path, monkeypatch):
    """benchmarks/prior_quality.py --sampler ddpm: the reference sampler for the prior's spread.
    Same seed, same samples; another seed, others; on a zero-terminal-SNR v-prediction schedule
    it starts at t = 999, where a = 0, and must still give finite images."""
    import shutil

    _job, _data, run, _first = trained
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import prior_quality
    snap = sorted((run / "snapshots").glob("step-*"))[-1]
    a, oor_a = prior_quality.sample_ddpm(str(snap), 3, 4, seed=0, batch=2)
    b, oor_b = prior_quality.sample_ddpm(str(snap), 3, 4, seed=0, batch=2)
    c, _ = prior_quality.sample_ddpm(str(snap), 3, 4, seed=1, batch=2)
    assert a.shape == (3, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and oor_a == oor_b and not np.array_equal(a, c)
    zsnr = tmp_path / "zsnr"
    shutil.copytree(snap, zsnr)
    cfg_path = zsnr / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(prediction_type="v_prediction", rescale_betas_zero_snr=True, beta_schedule="squaredcos_cap_v2")
    cfg_path.write_text(json.dumps(cfg))
    z, oor_z = prior_quality.sample_ddpm(str(zsnr), 3, 4, seed=0, batch=3)
    assert 0 <= oor_z < 1 and len({img.tobytes() for img in z}) == 3
    # the same start with epsilon prediction divides by sqrt(a) = 0: refused, not averaged into the stats
    cfg_path.write_text(json.dumps({**cfg, "prediction_type": "epsilon"}))
    with pytest.raises(SystemExit, match="non-finite"):
        prior_quality.sample_ddpm(str(zsnr), 3, 4, seed=0, batch=3)


def test_pick_snapshot_measures_faces_and_restore_and_ships_nothing_without_faces(trained, tmp_path, capsys):
    _job, _data, run, _first = trained
    pick = _load_job("pick_snapshot")
    snaps = sorted(p.name for p in (run / "snapshots").glob("step-*"))
    assert len(snaps) >= 2
    common = ["--run", str(run), "--faces", str(tmp_path / "absent.parquet"), "--n", "2", "--grid", "2x1",
              "--quality-n", "2", "--detectors", "hog", "--min-db", "-1000", "--floor-db", "-1000"]
    tar = tmp_path / "prior.tar"
    # a 32 px model trained for seconds makes no faces: nothing is shipped, however well it restores
    assert pick.main([*common, "--tar", str(tar)]) == 1
    out = capsys.readouterr().out
    assert not tar.exists() and "nothing to ship" in out
    assert all(f"| {s} | 0.0% |" in out and s in out for s in snaps)
    assert pick.main([*common, "--min-faces", "0", "--tar", str(tar)]) == 0
    assert f"picked {snaps[-1]}: makes faces and restores" in capsys.readouterr().out
    import tarfile

    with tarfile.open(tar) as t:
        names = t.getnames()
    assert names[0] == snaps[-1] and all(n.split("/")[0] == snaps[-1] for n in names)
    assert any(n.endswith(".safetensors") for n in names)


@pytest.mark.parametrize("rows, picked, says", [
    # (faces, restore median, restore worst) per snapshot, oldest first
    ([(0.55, 44, 30), (0.93, 36, 26), (0.97, 36, 25), (0.99, 33, 26)], 2, "makes faces and restores"),
    ([(0.55, 44, 30), (0.93, 34, 20), (0.97, 34, 26), (0.99, 33, 24)], 2, "makes faces; none of those restores"),
    ([(0.55, 44, 30), (0.80, 36, 26), (0.89, 40, 30)], None, "nothing to ship"),
])
def test_pick_snapshot_rule(tmp_path, capsys, rows, picked, says):
    """Faces first (a snapshot below 90% is never shipped), then the latest that also restores at
    35 / 25 dB, else the best median restore among those with faces (ties: the later)."""
    pick = _load_job("pick_snapshot")
    for i in range(len(rows)):
        (tmp_path / "snapshots" / f"step-{i:07d}").mkdir(parents=True)
    pick.measure = lambda snap, a: dict(zip(("faces", "restore_db_median", "restore_db_min"),
                                            rows[int(snap.name[5:])]))
    rc = pick.main(["--run", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == (1 if picked is None else 0) and says in out
    if picked is not None:
        assert f"picked step-{picked:07d}: {says}" in out


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fsynced descriptors")
def test_every_rename_that_publishes_a_save_is_fsynced_before_and_after(tmp_path, monkeypatch):
    """A rename alone is not durable: after a power cut the folder may not have it, or may hold the
    final name with an empty file (delayed allocation). So what is renamed in (the checkpoint, every
    file and folder of the snapshot) is fsynced first, and the folder holding the new name after."""
    import os

    job = _load_job()
    data = _tiny_parquet(tmp_path / "faces.parquet")
    run = Path(os.path.realpath(tmp_path)) / "run"
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("replace", os.path.abspath(src), os.path.abspath(dst)))
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    assert job.main(["--data", str(data), "--run", str(run), "--max-steps", "1", *TINY]) == 0
    monkeypatch.undo()
    snap = run / "snapshots" / "step-0000001"
    renames = {e[2]: i for i, e in enumerate(events) if e[0] == "replace"}
    for dst, parent in ((run / "checkpoint.pt", run), (snap, snap.parent), (run / "latest", run)):
        i = renames[str(dst)]
        assert ("fsync", str(parent)) in events[i + 1:], f"{parent} not fsynced after {dst.name} was renamed in"
    i = renames[str(run / "checkpoint.pt")]
    assert ("fsync", events[i][1]) in events[:i], "checkpoint not fsynced before its rename"
    i, tmp = renames[str(snap)], Path(events[renames[str(snap)]][1])
    inside = [tmp / p.relative_to(snap) for p in [snap, *snap.rglob("*")]]
    assert len(inside) > 5 and all(("fsync", str(p)) in events[:i] for p in inside), "snapshot not fsynced"


def test_a_temp_folder_left_by_a_kill_during_a_save_is_removed_and_nothing_else(tmp_path):
    """A kill during the snapshot of step N leaves snapshots/.tmp-step-N, and the resumed run
    never saves step N again: nothing removed it (a full model copy per kill, on a small disk)."""
    job = _load_job()
    data = _tiny_parquet(tmp_path / "faces.parquet")
    run = tmp_path / "run"
    assert job.main(["--data", str(data), "--run", str(run), "--max-steps", "1", *TINY]) == 0
    snaps = run / "snapshots"
    (snaps / ".tmp-step-0000007" / "unet").mkdir(parents=True)
    (snaps / ".tmp-step-0000007" / "unet" / "part.safetensors").write_bytes(b"half")
    (snaps / ".tmp-notes").mkdir()
    (snaps / "notes.txt").write_text("mine")
    assert job.main(["--data", str(data), "--run", str(run), "--max-steps", "2", *TINY]) == 0
    assert sorted(p.name for p in snaps.iterdir()) == [".tmp-notes", "notes.txt", "step-0000001", "step-0000002"]


def test_no_resume_is_refused_in_a_folder_holding_another_run(tmp_path):
    """--no-resume in a folder holding a longer run mixed the two runs' snapshots (pick_snapshot
    measured the old run's step-0000004 as this run's) and replaced its checkpoint unasked."""
    job = _load_job()
    data = _tiny_parquet(tmp_path / "faces.parquet")
    run = tmp_path / "run"
    assert job.main(["--data", str(data), "--run", str(run), "--max-steps", "4", "--save-every-steps", "2",
                     *TINY]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*")}
    with pytest.raises(SystemExit, match="holds another run .*checkpoint.pt.*pass another --run"):
        job.main(["--data", str(data), "--run", str(run), "--max-steps", "2", "--no-resume", *TINY])
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    fresh = tmp_path / "fresh"
    assert job.main(["--data", str(data), "--run", str(fresh), "--max-steps", "1", "--no-resume", *TINY]) == 0
    assert (fresh / "latest").resolve().name == "step-0000001"


def test_keep_snapshots_never_prunes_the_one_latest_points_to(tmp_path):
    """A checkpoint replaced by an older one (a run continued from a copy): the new step-0000002
    sorted before the snapshots past it, so keeping the newest N by name deleted it, `latest` dangling."""
    job = _load_job()
    data = _tiny_parquet(tmp_path / "faces.parquet")
    run = tmp_path / "run"
    assert job.main(["--data", str(data), "--run", str(run), "--max-steps", "1", *TINY]) == 0
    older = (run / "checkpoint.pt").read_bytes()
    assert job.main(["--data", str(data), "--run", str(run), "--max-steps", "4", "--save-every-steps", "1",
                     *TINY]) == 0
    (run / "checkpoint.pt").write_bytes(older)
    assert job.main(["--data", str(data), "--run", str(run), "--max-steps", "2", "--keep-snapshots", "1",
                     *TINY]) == 0
    assert (run / "latest").resolve().name == "step-0000002"
    assert (run / "latest" / "unet" / "config.json").is_file()
    # the older steps go; the snapshots past the checkpoint are not this run's to prune
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["step-0000002", "step-0000003", "step-0000004"]


def test_a_resume_uses_this_devices_optimizer_kernels(tmp_path):
    """The checkpoint's optimizer state carries the saving run's kernel flags: a GPU run's fused=True
    came back on a CPU resume, a CPU run's fused=None on a GPU one (the slow per-tensor loop)."""
    job = _load_job()
    data = _tiny_parquet(tmp_path / "faces.parquet")
    run = tmp_path / "run"
    assert job.main(["--data", str(data), "--run", str(run), "--max-steps", "1", *TINY]) == 0
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    for g in ck["opt"]["param_groups"]:
        g.update(fused=True, foreach=False)  # as a CUDA run saves it
    torch.save(ck, run / "checkpoint.pt")
    assert job.main(["--data", str(data), "--run", str(run), "--max-steps", "2", *TINY]) == 0
    group = torch.load(run / "checkpoint.pt", weights_only=False)["opt"]["param_groups"][0]
    assert group["fused"] is None and group["foreach"] is None  # what a CPU run constructs


def test_steps_redone_after_a_crash_are_logged_once(tmp_path, monkeypatch):
    """A crash after step 4 with the checkpoint at step 2: the resume trains steps 3 and 4 again, and
    their first loss lines (and a line torn by the crash) must not stay in loss.jsonl beside the new."""
    job = _load_job()
    data = _tiny_parquet(tmp_path / "faces.parquet")
    run = tmp_path / "run"
    real = job._atomic_torch_save

    def crash_at_step_4(obj, path):
        if obj["step"] == 4:
            raise RuntimeError("power cut")
        real(obj, path)

    monkeypatch.setattr(job, "_atomic_torch_save", crash_at_step_4)
    with pytest.raises(RuntimeError, match="power cut"):
        job.main(["--data", str(data), "--run", str(run), "--max-steps", "4", "--save-every-steps", "2", *TINY])
    monkeypatch.setattr(job, "_atomic_torch_save", real)
    with open(run / "loss.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    first = [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()[:4]]
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    assert job.main(["--data", str(data), "--run", str(run), "--max-steps", "4", *TINY]) == 0
    lines = [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert lines[:2] == first[:2]  # the lines before the checkpoint are kept as they were


def test_a_resume_takes_the_optimizer_options_from_the_command_line(tmp_path):
    """--lr and its schedule always came from the command line (set every step); --weight-decay came
    from the checkpoint's optimizer state, silently ignoring the flag on every resume."""
    job = _load_job()
    data = _tiny_parquet(tmp_path / "faces.parquet")
    run = tmp_path / "run"
    assert job.main(["--data", str(data), "--run", str(run), "--max-steps", "2", *TINY]) == 0
    again = ["--data", str(data), "--run", str(run), "--max-steps", "3", "--weight-decay", "0.1", "--lr", "1e-3",
             "--decay-start", "2", "--decay-steps", "4", *TINY]
    assert job.main(again) == 0
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 3 and ck["opt"]["state"]
    group = ck["opt"]["param_groups"][0]
    assert group["weight_decay"] == 0.1
    assert group["lr"] == pytest.approx(job.lr_at(2, job.parse_args(again)))
