"""Train anondata's embedded face prior: a small pixel-space DDPM UNet2DModel.

Why a job of its own: no diffusion weights can be downloaded where anondata runs, so the
default model (`--model embedded`) is trained here from a Parquet of face crops and shipped
inside the package. The run is built to survive being stopped at any moment:

- a full checkpoint (model, EMA, optimizer, RNG, step) is written atomically every
  ``--save-every-min`` minutes and at the end; a run resumes from it by default (``--no-resume``
  starts over; the epilog of ``--help`` says which options a resume keeps);
- every save also writes a complete diffusers folder of the EMA weights
  (``unet/`` fp16 safetensors in shards of at most ``--shard-mb`` MB, ``scheduler/``
  DDIM-compatible config with the training betas) under ``snapshots/step-NNNNNNN`` and
  swaps the ``latest`` symlink to it atomically, so ``RUN/latest`` is always loadable;
- the loss is appended to ``RUN/loss.jsonl``; lines past the step a run starts from (steps a
  crash makes it train again) are dropped first, so each step is logged once.

Example (the start of the CPU run behind the shipped model, one thread; the model card has
every invocation)::

    OMP_NUM_THREADS=1 python jobs/train_prior.py --data ../shared/data/celeba64-train.parquet \\
        --run /work/runs/prior --threads 1 --max-minutes 100

Any Parquet with an ``image`` column (datasets.Image struct {bytes, path}, or raw bytes)
works; images are decoded once into a uint8 tensor and resized to ``--resolution``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # anondata.faces (the face ellipse), also without an install
    sys.path.insert(0, str(ROOT))

from anondata.files import atomic_write, fsync_dir, fsync_tree, make_dirs  # noqa: E402 (needs the path above)

SCHEDULER_KW = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
)


def scheduler_kw(args) -> dict:
    """The noise schedule and objective this run trains (and its snapshots' scheduler/ says)."""
    kw = dict(SCHEDULER_KW, prediction_type=args.prediction_type)
    if args.zero_snr:
        kw["rescale_betas_zero_snr"] = True
    return kw


RESUME_HELP = (
    "On a resume the checkpoint fixes the architecture flags (--resolution, --channels, "
    "--layers-per-block, --attn-levels, --norm-groups, --head-dim: a difference is an error) and carries "
    "the weights, EMA, optimizer moments, step and random state (so --seed only seeds a new run). Every "
    "other option is taken from this command line from the resumed step on: --lr and its schedule, "
    "--weight-decay, --ema-decay, --batch-size, --prediction-type and the rest, so a resumed run may "
    "lower --lr or add --decay-start.")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=RESUME_HELP)
    p.add_argument("--data", required=True, help="Parquet file with an `image` column")
    p.add_argument("--run", required=True, help="run folder: checkpoint, loss log, snapshots")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--channels", default="32,64,64,128", help="block_out_channels, comma separated")
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--attn-levels", default="3",
                   help="comma-separated block indices with self-attention ('' = none; mid block always has it)")
    p.add_argument("--norm-groups", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=32, help="attention_head_dim")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--decay-start", type=int, default=0,
                   help="step at which the learning rate starts a cosine decay (0 = constant after warm-up); "
                        "set it on a resumed run to anneal before stopping")
    p.add_argument("--decay-steps", type=int, default=2000, help="length of that decay")
    p.add_argument("--decay-floor", type=float, default=0.1, help="learning rate at the end of the decay, / --lr")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default="epsilon",
                   help="what the UNet predicts; changing it on a resumed run fine-tunes to the new objective")
    p.add_argument("--zero-snr", action="store_true",
                   help="rescale the betas to zero terminal SNR (Lin et al. 2024): t = 999 is pure noise, so "
                        "samples can start there; needs --prediction-type v_prediction")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--offset-noise", type=float, default=0.0,
                   help="add this std times one normal per image and channel to the training noise "
                        "(offset noise): pure noise then no longer reads as grey at the top timestep "
                        "(model card, 'Why the colours are off'); 0.1 is the usual value")
    p.add_argument("--max-steps", type=int, default=0, help="0 = no step limit")
    p.add_argument("--max-minutes", type=float, default=0.0, help="0 = no time limit (this invocation)")
    p.add_argument("--save-every-min", type=float, default=10.0)
    p.add_argument("--save-every-steps", type=int, default=0, help="also save every N steps (0 = off)")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--shard-mb", type=int, default=16, help="max size of one weights file")
    p.add_argument("--keep-snapshots", type=int, default=0,
                   help="keep only the newest N snapshots up to the current step (0 = all); later steps "
                        "(left when checkpoint.pt was replaced by an older one) are kept")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="use only the first N images (0 = all)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start at step 0; refused in a folder that holds a checkpoint or snapshots (their "
                        "steps would mix with this run's for jobs/pick_snapshot.py): pass a new --run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (CUDA runs)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA runs)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--bench-steps", type=int, default=0,
                   help="only time N training steps (after 3 warm-up steps), print s/step, save nothing")
    return p.parse_args(argv)


# ---------------------------------------------------------------- data


def load_images(path: str, resolution: int, limit: int = 0) -> torch.Tensor:
    """Decode every image once into a uint8 (N, 3, R, R) tensor: the whole set is a few
    hundred MB at most, and decoding per step would cost more than a small UNet step."""
    import pyarrow.parquet as pq
    from PIL import Image

    table = pq.read_table(path, columns=["image"])
    col = table.column("image").to_pylist()
    if limit:
        col = col[:limit]
    if not col:
        raise SystemExit(f"error: {path} has no rows in column `image`")
    out = np.empty((len(col), resolution, resolution, 3), dtype=np.uint8)
    for i, cell in enumerate(col):
        data = cell["bytes"] if isinstance(cell, dict) else cell
        if data is None:
            raise SystemExit(f"error: row {i} of {path} has no image bytes; embed the images in the Parquet")
        img = Image.open(io.BytesIO(data)).convert("RGB")
        if img.size != (resolution, resolution):
            img = img.resize((resolution, resolution), Image.BICUBIC)
        out[i] = np.asarray(img)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------- model


def build_unet(args: argparse.Namespace):
    from diffusers import UNet2DModel

    chans = tuple(int(c) for c in args.channels.split(","))
    attn = {int(a) for a in args.attn_levels.split(",") if a.strip() != ""}
    down = tuple("AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(len(chans)))
    up = tuple("AttnUpBlock2D" if (len(chans) - 1 - i) in attn else "UpBlock2D" for i in range(len(chans)))
    return UNet2DModel(
        sample_size=args.resolution,
        in_channels=3,
        out_channels=3,
        layers_per_block=args.layers_per_block,
        block_out_channels=chans,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=args.norm_groups,
        attention_head_dim=args.head_dim,
    )


def build_schedulers(kw: dict):
    """The training schedule and a DDIM scheduler with the same betas (what the
    anonymizer samples and inverts with). No clipping: the scheme needs exact eps."""
    from diffusers import DDIMScheduler, DDPMScheduler

    train = DDPMScheduler(**kw, clip_sample=False)
    ddim = DDIMScheduler(**kw, clip_sample=False, set_alpha_to_one=True)
    return train, ddim


# ---------------------------------------------------------------- saving


def _atomic_torch_save(obj, path: Path) -> None:
    """Temp name, fsync, rename, fsync the folder: a rename alone is not durable, and after a power
    cut the folder could hold checkpoint.pt as an empty file (the old checkpoint gone)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def save_diffusers_folder(ema_model, ddim, out_dir: Path, shard_mb: int) -> None:
    """Write `out_dir/unet` (fp16 safetensors, shards <= shard_mb) and `out_dir/scheduler`."""
    import copy

    half = copy.deepcopy(ema_model).to("cpu", dtype=torch.float16)
    half.save_pretrained(out_dir / "unet", safe_serialization=True, max_shard_size=f"{shard_mb}MB")
    ddim.save_pretrained(out_dir / "scheduler")
    (out_dir / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDIMPipeline", "_diffusers_version": _diffusers_version(),
         "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DModel"]}, indent=2) + "\n")


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def face_mean(data: torch.Tensor) -> list[float]:
    """Mean RGB in [-1, 1] of the training crops inside the face ellipse the job uses on aligned
    crops: what the anonymizer's flip centres on (anondata.json; scheme.flip)."""
    from anondata.faces import aligned_mask

    m = torch.from_numpy(aligned_mask(data.shape[-1]))
    total = torch.zeros(3, dtype=torch.float64)
    for i in range(0, data.shape[0], 1024):  # uint8 in chunks: the whole set as float64 would be GBs
        total += data[i:i + 1024].cpu()[:, :, m].double().sum(dim=(0, 2))
    mean = total / (data.shape[0] * int(m.sum())) / 127.5 - 1
    return [round(float(v), 4) for v in mean]


def publish_snapshot(run: Path, ema_model, ddim, step: int, shard_mb: int, keep: int, meta: dict,
                     face_rgb: list[float] | None = None) -> Path:
    """Write snapshots/step-N completely and durably, then swap the `latest` symlink in one rename."""
    snaps = make_dirs(run / "snapshots")
    final = snaps / f"step-{step:07d}"
    tmp = snaps / f".tmp-step-{step:07d}"
    # A kill during an earlier save left .tmp-step-M, and the resumed run may never save step M again.
    for stale in snaps.glob(".tmp-step-*"):
        if stale.name[len(".tmp-step-"):].isdigit() and stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    save_diffusers_folder(ema_model, ddim, tmp, shard_mb)
    if face_rgb is not None:
        from anondata.backends import ANONDATA_CONFIG

        (tmp / ANONDATA_CONFIG).write_text(json.dumps(
            {"about": "mean RGB in [-1, 1] of the training crops inside the aligned face ellipse (jobs/train_prior.py)",
             "face_mean": face_rgb}, indent=2) + "\n")
    (tmp / "train_meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    fsync_tree(tmp)  # what save_pretrained wrote is on disk before the rename that publishes it
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(snaps)
    link_tmp = run / ".latest.tmp"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    os.symlink(os.path.relpath(final, run), link_tmp)
    os.replace(link_tmp, run / "latest")
    fsync_dir(run)
    if keep > 0:
        # Only steps up to this one: snapshots past it (left when checkpoint.pt was replaced by an
        # older one) sort after the one just published, which `latest` names, and would push it out.
        ours = sorted(p for p in snaps.iterdir() if p.name.startswith("step-") and p.name[5:].isdigit()
                      and int(p.name[5:]) <= step)
        for p in ours[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def trim_loss_log(path: Path, step: int) -> int:
    """Drop the lines of steps past `step`, where this run starts: after a crash the steps since the
    checkpoint are trained (and logged) again, and a reader would see them twice. A line the
    crash tore is dropped too. Atomic: the old log or the trimmed one. Returns the lines dropped."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    lines, kept = data.splitlines(), []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + b"\n")
        except (ValueError, KeyError, TypeError):
            pass
    if b"".join(kept) != data:
        atomic_write(path, b"".join(kept))
    return len(lines) - len(kept)


# ---------------------------------------------------------------- training


def lr_at(step: int, args) -> float:
    """Linear warm-up, constant, then (with --decay-start) a cosine down to --decay-floor * lr."""
    lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup_steps))
    if args.decay_start and step >= args.decay_start:
        done = min(1.0, (step - args.decay_start) / max(1, args.decay_steps))
        lr *= args.decay_floor + (1 - args.decay_floor) * 0.5 * (1 + math.cos(math.pi * done))
    return lr


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.zero_snr and args.prediction_type != "v_prediction":
        raise SystemExit("error: --zero-snr needs --prediction-type v_prediction (at zero SNR the noise is the input)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    run = make_dirs(args.run)
    ckpt_path = run / "checkpoint.pt"
    if not args.resume:
        earlier = [p.name for p in (ckpt_path, run / "latest") if p.exists() or p.is_symlink()]
        earlier += [p.name for p in sorted((run / "snapshots").glob("step-*"))][:3]
        if earlier:
            raise SystemExit(f"error: {run} holds another run ({', '.join(earlier)}); --no-resume starts "
                             "over only in a new or empty folder: pass another --run, or remove that one")

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    data = load_images(args.data, args.resolution, args.limit)
    n = data.shape[0]
    face_rgb = face_mean(data)
    if cuda:
        data = data.to(device)

    model = build_unet(args).to(device)
    ema = build_unet(args).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    sched_kw = scheduler_kw(args)
    train_sched, ddim = build_schedulers(sched_kw)
    acp = train_sched.alphas_cumprod.to(device=device, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=cuda or None)
    step = 0
    gen = torch.Generator(device="cpu").manual_seed(args.seed)

    if args.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ck["arch"] != _arch(args):
            raise SystemExit(f"error: {ckpt_path} was trained with {ck['arch']}, not {_arch(args)}; "
                             "pass the same architecture flags or a new --run folder")
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        # The command line's weight decay, not the checkpoint's (lr is set every step), and this
        # device's kernels: a GPU run's checkpoint says fused=True, a CPU run's fused=None.
        mine = {k: opt.param_groups[0][k] for k in ("fused", "foreach", "capturable")}
        opt.load_state_dict(ck["opt"])
        for g in opt.param_groups:
            g.update(mine, weight_decay=args.weight_decay)
        step = ck["step"]
        gen.set_state(ck["gen"])
        print(f"resumed from {ckpt_path} at step {step}", flush=True)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"data {tuple(data.shape)}  params {n_params/1e6:.2f}M  device {device}  "
          f"threads {torch.get_num_threads()}  arch {_arch(args)}", flush=True)

    fwd = torch.compile(model) if args.compile else model
    params = [p for p in model.parameters()]
    ema_params = [p for p in ema.parameters()]

    def train_step() -> float:
        idx = torch.randint(0, n, (args.batch_size,), generator=gen)
        flip = torch.rand(args.batch_size, generator=gen) < 0.5
        noise = torch.randn((args.batch_size, 3, args.resolution, args.resolution), generator=gen)
        if args.offset_noise:
            noise += args.offset_noise * torch.randn((args.batch_size, 3, 1, 1), generator=gen)
        t = torch.randint(0, train_sched.config.num_train_timesteps, (args.batch_size,), generator=gen)
        x = data[idx.to(data.device)].float().div_(127.5).sub_(1.0)
        x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)
        noise, t = noise.to(device), t.to(device)
        a = acp[t][:, None, None, None]
        xt = a.sqrt() * x + (1 - a).sqrt() * noise
        if args.channels_last:
            xt = xt.contiguous(memory_format=torch.channels_last)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and cuda):
            pred = fwd(xt, t).sample
        target = noise if args.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        return loss.detach()

    if args.bench_steps:
        for _ in range(3):
            train_step()
        t0 = time.perf_counter()
        for _ in range(args.bench_steps):
            train_step()
        if cuda:
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / args.bench_steps
        print(json.dumps({"arch": _arch(args), "params": n_params, "batch": args.batch_size,
                          "s_per_step": round(dt, 4), "s_per_image": round(dt / args.batch_size, 5)}), flush=True)
        return 0

    def save(reason: str) -> None:
        meta = {"step": step, "arch": _arch(args), "params": n_params, "batch_size": args.batch_size,
                "lr": args.lr, "ema_decay": args.ema_decay,
                "offset_noise": args.offset_noise, "data": os.path.basename(args.data),
                "images": n, "reason": reason, "scheduler": sched_kw,
                "command": " ".join([os.path.basename(sys.executable), "jobs/train_prior.py", *sys.argv[1:]])
                if argv is None else "in-process"}
        _atomic_torch_save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                            "step": step, "gen": gen.get_state(), "arch": _arch(args)}, ckpt_path)
        snap = publish_snapshot(run, ema, ddim, step, args.shard_mb, args.keep_snapshots, meta, face_rgb)
        print(f"saved step {step} -> {snap}", flush=True)

    stop: list[int] = []

    def _stop(signum, frame):
        """`kill PID` or Ctrl-C stops cleanly: the step under way is finished, then the loop saves.
        Why not raise here: an exception midway through a step (between the optimizer's updates of
        the weights and of its moments, or before the EMA update and `step += 1`) saved a model one
        update ahead of its EMA and step counter, which the resume trained again with other noise.
        A second signal stops at once, without saving (the last checkpoint stands)."""
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)

    handlers = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    dropped = trim_loss_log(run / "loss.jsonl", step)
    if dropped:
        print(f"loss.jsonl: dropped {dropped} lines past step {step}, which this run trains again", flush=True)
    log = open(run / "loss.jsonl", "a")
    t_start = time.monotonic()
    last_save = t_start
    acc, acc_n, t_log = 0.0, 0, time.monotonic()
    saved_step = step  # the step the checkpoint on disk holds
    try:
        while True:
            if stop:
                print(f"interrupted: stopping after step {step}", flush=True)
                break
            if args.max_steps and step >= args.max_steps:
                break
            if args.max_minutes and time.monotonic() - t_start >= args.max_minutes * 60:
                break
            loss = train_step()
            step += 1
            acc += float(loss)
            acc_n += 1
            if step % args.log_every == 0:
                now = time.monotonic()
                rec = {"step": step, "loss": round(acc / acc_n, 5), "lr": lr_at(step - 1, args),
                       "s_per_step": round((now - t_log) / acc_n, 4), "elapsed_s": round(now - t_start, 1),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                print(json.dumps(rec), flush=True)
                acc, acc_n, t_log = 0.0, 0, now
            if not math.isfinite(float(loss)):
                raise SystemExit(f"error: loss is {float(loss)} at step {step}; lower --lr")
            due_time = time.monotonic() - last_save >= args.save_every_min * 60
            due_step = args.save_every_steps and step % args.save_every_steps == 0
            if due_time or due_step:
                save("periodic")
                saved_step, last_save = step, time.monotonic()
        # Not again when this step is saved already (--save-every-steps hitting --max-steps, a
        # signal during a periodic save): a second save of step N deletes snapshots/step-N, which
        # `latest` points to, before the new copy is renamed in.
        if step > saved_step or not (run / "latest").exists():
            save("final")
    finally:
        log.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    return 0


def _arch(args) -> dict:
    return {"resolution": args.resolution, "channels": args.channels, "layers_per_block": args.layers_per_block,
            "attn_levels": args.attn_levels, "norm_groups": args.norm_groups, "head_dim": args.head_dim}


if __name__ == "__main__":
    sys.exit(main())
