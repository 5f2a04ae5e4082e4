"""How good is a face prior? Samples N faces and measures what issue 5 asks of the embedded model.

- face rate: share of samples in which an offline detector finds a face, on 4x upscaled samples
  (dlib HOG frontal face detector; OpenCV Haar frontal-face cascade). Goal >= 90%. The same
  detectors run on N real training images as a reference (images are read, never written).
- colour: per-channel mean/std of the samples vs the training data (RGB in 0..1), relative
  difference. Goal within 10%.
- range: share of final pixels outside [-1, 1] before clipping: what 8-bit storage cannot hold.
- grid: a PNG of the samples (generated faces only) to look at.

Sampling uses anondata's own deterministic DDIM (`anondata.scheme.generate`, eta = 0) with the
whole image as the mask, so the numbers describe what the anonymizer will generate with.
`--sampler ddpm` samples with diffusers' ancestral `DDPMScheduler` instead (from t = 999 for a
zero-terminal-SNR model), to tell the weights' spread from what few deterministic steps make of it.

    python benchmarks/prior_quality.py --model anondata/models/embedded \\
        --data ../shared/data/celeba64-train.parquet --grid runs/prior/grid.png --json runs/prior/quality.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def levels_from(top_t: int, steps: int) -> list[tuple[int, int | None]]:
    """[(t, s)] DDIM steps from the clean end, like scheme._levels, but evenly spaced from top_t
    down to t = 1 (top_t 951 with 20 steps is the scheme's own "leading" grid)."""
    ts = [int(round(v)) for v in np.linspace(1, top_t, steps)]
    if len(set(ts)) != steps:
        raise SystemExit(f"error: --top-t {top_t} is too low for {steps} distinct steps")
    return [(t, ts[k - 1] if k else None) for k, t in enumerate(ts)]


def _stored(batches: list[torch.Tensor]) -> tuple[np.ndarray, float]:
    """Decoded samples in [-1, 1] -> (uint8 (n, R, R, 3) as stored, share of values outside [-1, 1])."""
    x = torch.cat([b.cpu() for b in batches])
    u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return u8, int((x.abs() > 1).sum()) / x.numel()


def sample(model: str, n: int, steps: int, seed: int, batch: int,
           start_mean: np.ndarray | None = None, top_t: int | None = None,
           device: str = "cpu") -> tuple[np.ndarray, float]:
    """-> (uint8 (n, R, R, 3), share of pixels outside [-1, 1] before clipping).

    start_mean (RGB in [-1, 1]): add sqrt(a_T) * start_mean to the starting noise. At the top
    timestep the data are not gone (a_T > 0), and the model reads each channel's mean off its
    input there; pure noise says "grey", so samples come out grey-centred with random casts. A
    diagnostic, not what the anonymizer does (its starting point is the inverted photo).

    top_t: start there instead of at the scheme's top level (t = 951 for 20 steps), another
    diagnostic: a higher start leaves less of the data in x_T for the model to read. With
    epsilon prediction the start cannot be t = 999 (a_T ~ 2e-9: the first step divides the
    noise estimate's error by sqrt(a_T))."""
    from anondata.backends import load_backend
    from anondata.scheme import Sampler, generate, generate_step, top_alpha

    backend = load_backend(model, device=device, dtype=torch.float32)
    r = backend.resolution
    sampler = Sampler(steps=steps, inversion_iters=0)
    levels = None if top_t is None else levels_from(top_t, steps)
    a_top = top_alpha(backend, sampler) if top_t is None else float(backend.alphas_cumprod[top_t])
    shift = 0.0 if start_mean is None else a_top**0.5 * torch.tensor(start_mean, dtype=torch.float32).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(seed)
    outs = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        z = (torch.randn((b, 3, r, r), generator=g) + shift).to(device)  # drawn on the CPU: same samples anywhere
        mask = torch.ones_like(z, dtype=torch.bool)
        bg = [torch.zeros_like(z)] * (steps + 1)  # unused: the mask covers everything
        with torch.no_grad():
            if levels is None:
                z = generate(backend, z, mask, bg, sampler)
            else:
                for t, s in reversed(levels):
                    z = generate_step(backend, z, t, s, mask, z)
            outs.append(backend.decode(z))
    return _stored(outs)


def sample_ddpm(model: str, n: int, steps: int, seed: int, batch: int, device: str = "cpu") -> tuple[np.ndarray, float]:
    """Like `sample`, with diffusers' ancestral DDPM sampler on the model's own noise schedule
    ("trailing" timesteps, so a zero-terminal-SNR model starts at t = 999). Deterministic DDIM
    with few steps narrows the samples' spread; ancestral sampling with many steps is the usual
    reference for what the weights learned, so the two together say which of them is short."""
    from diffusers import DDPMScheduler, UNet2DModel

    from anondata.backends import _resolve

    folder = _resolve(model)[0]
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32).to(device).eval()
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", timestep_spacing="trailing", clip_sample=False)
    sched.set_timesteps(steps)
    r = unet.config.sample_size
    g = torch.Generator().manual_seed(seed)
    outs = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        x = torch.randn((b, 3, r, r), generator=g)
        with torch.no_grad():
            for t in sched.timesteps:
                out = unet(x.to(device), t).sample.cpu()
                x = sched.step(out, t, x, generator=g).prev_sample  # the step's noise on the CPU too
        if not torch.isfinite(x).all():  # e.g. epsilon prediction at a = 0: x0 = (x - eps) / 0
            raise SystemExit(f"error: DDPM sampling of {model} gave non-finite pixels; is its schedule "
                             "zero-terminal-SNR without v-prediction?")
        outs.append(x)
    return _stored(outs)


def load_real(path: str, n: int | None, seed: int) -> np.ndarray:
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    col = pq.read_table(path, columns=["image"]).column("image").to_pylist()
    idx = range(len(col)) if n is None else np.random.default_rng(seed).choice(len(col), n, replace=False)
    return np.stack([np.asarray(Image.open(io.BytesIO(col[i]["bytes"])).convert("RGB")) for i in idx])


DETECTORS = ("hog", "haar")


def detect_rates(images: np.ndarray, upscale: int = 4, detectors: tuple[str, ...] = DETECTORS) -> dict:
    """Share of images with >= 1 face for each detector (dlib HOG, OpenCV Haar) and for any of them
    ("either"), on bicubic `upscale`x images. HOG alone needs only dlib, which travels to a GPU
    machine as a 4 MB wheel (whether its image's OpenCV has the Haar cascades is not known); on the
    shipped prior HOG finds as many faces as both together (100% of 64 and of 128 from t = 998;
    0.2.0's: 98.4% of 64, 97.7% of 128)."""
    unknown = set(detectors) - set(DETECTORS)
    if unknown or not detectors:
        raise SystemExit(f"error: detectors must be among {DETECTORS}, got {detectors}")
    hog = None
    if "hog" in detectors:
        import dlib

        hog = dlib.get_frontal_face_detector()
    haar = None
    if "haar" in detectors:
        import cv2

        haar = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        if haar.empty():
            raise SystemExit("error: OpenCV Haar cascade haarcascade_frontalface_default.xml not found")
    hits = dict.fromkeys((*detectors, "either"), 0)
    for img in images:
        # torch's bicubic is OpenCV's INTER_CUBIC (a = -0.75; on a 64 px face 1 value in 200,000 differs by a level)
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].double()
        x = torch.nn.functional.interpolate(x, scale_factor=upscale, mode="bicubic", align_corners=False)
        big = np.ascontiguousarray(x.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy())
        found = {}
        if hog is not None:
            found["hog"] = len(hog(big, 0)) > 0
        if haar is not None:
            gray = cv2.cvtColor(big, cv2.COLOR_RGB2GRAY)
            found["haar"] = len(haar.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(64, 64))) > 0
        for k, v in found.items():
            hits[k] += v
        hits["either"] += any(found.values())
    return {k: v / len(images) for k, v in hits.items()}


def channel_stats(images: np.ndarray) -> dict:
    x = images.reshape(-1, 3).astype(np.float64) / 255.0
    return {"mean": x.mean(0).round(4).tolist(), "std": x.std(0).round(4).tolist()}


def save_grid(images: np.ndarray, path: Path, cols: int = 8, scale: int = 2) -> None:
    from PIL import Image

    n, h, w, _ = images.shape
    rows = -(-n // cols)
    grid = np.zeros((rows * (h + 2), cols * (w + 2), 3), dtype=np.uint8) + 255
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = img
    im = Image.fromarray(grid)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.resize((im.width * scale, im.height * scale), Image.NEAREST).save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded", help="'embedded' or a diffusers folder (unet/ + scheduler/)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "celeba64-train.parquet"),
                   help="training Parquet for the reference statistics (skipped when absent)")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="sampling steps from noise (DDIM: 20 is what the model card reports; "
                        "the anonymizer takes 10 from an inverted face)")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim",
                   help="ddim: anondata's own deterministic sampler (what the anonymizer generates with); "
                        "ddpm: diffusers' ancestral DDPMScheduler from t = 999, --steps of them (on the embedded "
                        "prior 1000 bring the colour spread within 10%% of the data's; 20 DDIM steps leave it ~20%% low)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grid", default=str(ROOT / "runs" / "prior" / "grid.png"),
                   help="PNG of the samples (default: runs/prior/grid.png in the checkout, git-ignored)")
    p.add_argument("--json", default=None, help="write the results here too")
    p.add_argument("--detectors", default="hog,haar", help="face detectors: hog (dlib), haar (OpenCV), or both")
    p.add_argument("--device", default="cpu", help="where to sample: cpu | cuda (the noise is drawn on the CPU)")
    p.add_argument("--shift-start", action="store_true",
                   help="diagnostic: start from noise + sqrt(a_T) x the training data's channel means (needs --data)")
    p.add_argument("--top-t", type=int, default=None,
                   help="diagnostic: start sampling at this timestep (default: the scheme's top level, 951 at 20 steps)")
    args = p.parse_args(argv)
    if args.sampler == "ddpm" and (args.shift_start or args.top_t is not None):
        p.error("--shift-start and --top-t are diagnostics of the DDIM sampler; drop them with --sampler ddpm")
    torch.set_num_threads(args.threads)

    real_all = load_real(args.data, None, args.seed) if Path(args.data).is_file() else None
    start_mean = None
    if args.shift_start:
        if real_all is None:
            raise SystemExit(f"error: --shift-start needs the training data for its channel means; {args.data} is absent")
        start_mean = np.array(channel_stats(real_all)["mean"]) * 2 - 1
    t0 = time.perf_counter()
    detectors = tuple(args.detectors.split(","))
    if args.sampler == "ddpm":
        samples, out_of_range = sample_ddpm(args.model, args.n, args.steps, args.seed, args.batch, args.device)
    else:
        samples, out_of_range = sample(args.model, args.n, args.steps, args.seed, args.batch, start_mean,
                                       args.top_t, args.device)
    t_sample = time.perf_counter() - t0
    res = {"model": args.model, "n": args.n, "sampler": args.sampler, "steps": args.steps, "seed": args.seed,
           "start_mean": None if start_mean is None else start_mean.round(4).tolist(), "top_t": args.top_t,
           "sample_seconds": round(t_sample, 1), "out_of_range_share": round(out_of_range, 5),
           "face_rate": detect_rates(samples, detectors=detectors), "samples": channel_stats(samples)}
    if real_all is not None:
        res["data"] = channel_stats(real_all)
        res["data_face_rate"] = detect_rates(real_all[np.random.default_rng(args.seed).choice(len(real_all), args.n, replace=False)],
                                             detectors=detectors)
        rel = {}
        for k in ("mean", "std"):
            s, d = np.array(res["samples"][k]), np.array(res["data"][k])
            rel[k] = (np.abs(s - d) / d).round(4).tolist()
        res["relative_diff"] = rel
        res["colour_within_10pct"] = bool(max(max(v) for v in rel.values()) <= 0.10)
    res["face_rate_goal_met"] = res["face_rate"]["either"] >= 0.90
    save_grid(samples, Path(args.grid))
    res["grid"] = str(args.grid)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
