"""Anonymize / restore throughput per variant of the sampling loop, with the fidelity each keeps (issue 9).

    python benchmarks/gpu_throughput.py --device cuda --json OUT.json            # on a GPU
    python benchmarks/gpu_throughput.py --device cpu --quick                      # plumbing check

For each model (the embedded prior, and the google/ddpm-celebahq-256 UNet architecture with
random weights) and each variant of the denoiser call, in one run on one card:

- images/s for `Anonymizer.anonymize` and `Anonymizer.restore` at one batch size (key-only), and
  the bare denoiser's image*steps/s at that batch;
- model FLOPs of one denoiser call (counted once with torch.utils.flop_counter) and the model
  FLOPs utilisation of the bare loop and of anonymize: FLOP/s / --peak-tflops (default 989, the
  H100/H200 SXM dense bf16 figure; pass the card's own);
- peak GPU memory;
- restore fidelity of that variant (embedded only: random weights have none): median PSNR of
  key-only restore through uint8 against the original, and the share of pixels that differ from
  the eager fp32 restore, so that no speed-up silently costs fidelity.

Variants (`--variants`): eager (as shipped: IEEE fp32 and deterministic cuDNN, the backends'
`exact_float32`), tf32 (TF32 matmuls and convolutions inside the UNet call, so eager against tf32
is what `exact_float32` costs; on in every variant below too, for what autocast leaves in fp32),
bf16 (autocast), cl-bf16 (channels_last + bf16), compile-bf16 (torch.compile + channels_last + bf16),
graphs-bf16 (torch.compile mode "reduce-overhead": CUDA graphs for the fixed-shape calls). The
variant wraps the UNet only; the scheme, its float64 coefficients and the uint8 plumbing stay.
The bare loop runs under `exact_float32` too, as the backend's calls do.
Faces: public-domain sample images (anondata.testing.sample_images), so nothing private travels.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anondata import Anonymizer  # noqa: E402
from anondata.backends import exact_float32, load_backend  # noqa: E402
from anondata.scheme import Sampler  # noqa: E402
from anondata.testing import sample_images  # noqa: E402
from backend_cost import CELEBAHQ_256  # noqa: E402  (google/ddpm-celebahq-256's unet config)
from restore_fidelity import psnr  # noqa: E402

VARIANTS = ("eager", "tf32", "bf16", "cl-bf16", "compile-bf16", "graphs-bf16")


class FastUNet(torch.nn.Module):
    """The UNet behind one variant. Returns fp32 `.sample` whatever runs inside, so the scheme's
    arithmetic outside the network is the same for every variant."""

    def __init__(self, unet, variant: str, device: torch.device):
        super().__init__()
        self.unet, self.variant = unet, variant
        self.config = unet.config
        self.bf16 = variant.endswith("bf16") and device.type == "cuda"
        self.tf32 = variant != "eager" and device.type == "cuda"
        self.channels_last = variant in ("cl-bf16", "compile-bf16", "graphs-bf16")
        if self.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.fn = self._call
        if variant == "compile-bf16":
            self.fn = torch.compile(self._call, dynamic=False)
        elif variant == "graphs-bf16":
            self.fn = torch.compile(self._call, mode="reduce-overhead", dynamic=False)

    def _call(self, z, t):
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.unet(z, t).sample
        return out.float()

    def forward(self, z, t):
        if self.channels_last:  # here too, not only in _call: anonymize passes z strided as its images
            # (channels last), the bare loop a contiguous z, and a compiled _call guards on the strides,
            # so without this the timed anonymize recompiled (the 256px model has no warm-up of it)
            z = z.contiguous(memory_format=torch.channels_last)
        with tf32(self.tf32):  # here, not in _call: torch.compile must not trace flag changes
            out = self.fn(z, t)
        return SimpleNamespace(sample=out.clone() if self.variant == "graphs-bf16" else out)


@contextmanager
def tf32(on: bool):
    """TF32 matmuls and convolutions for one UNet call. Set where the variant runs the UNet, inside
    the backend's exact_float32, which turns TF32 off around every model call."""
    bk = torch.backends
    if not on:
        yield
        return
    if hasattr(bk.cudnn, "conv"):  # torch >= 2.9: the per-operator API (exact_float32 uses it too)
        flags = [(bk.cuda.matmul, "fp32_precision", "tf32"), (bk.cudnn.conv, "fp32_precision", "tf32")]
    else:
        flags = [(bk.cuda.matmul, "allow_tf32", True), (bk.cudnn, "allow_tf32", True)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in flags]
    try:
        for obj, name, value in flags:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def faces(resolution: int, n: int) -> np.ndarray:
    from PIL import Image

    imgs = sample_images()
    out = []
    for i in range(n):
        im = Image.fromarray(imgs[i % len(imgs)])
        if i >= len(imgs):  # more faces than samples: mirrored copies, so no two rows are equal
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        out.append(np.asarray(im.resize((resolution, resolution), Image.BICUBIC)))
    return np.stack(out)


def flops_per_call(unet, res: int, device) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    z = torch.randn(1, 3, res, res, device=device)
    t = torch.full((1,), 500, device=device, dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        unet(z, t)
    return int(fc.get_total_flops())


def measure(folder: str, name: str, variant: str, a, device, ref_restore=None) -> dict:
    backend = load_backend(folder, device=device)
    plain = backend.unet
    flops = flops_per_call(plain, backend.resolution, device)
    backend.unet = FastUNet(plain, variant, device)
    anon = Anonymizer(backend, Sampler(steps=a.steps, inversion_iters=a.iters), batch_size=a.batch)
    x = faces(anon.resolution, a.batch)
    keys = [bytes([i]) * 32 for i in range(a.batch)]
    z = torch.randn(a.batch, 3, anon.resolution, anon.resolution, device=device)
    t = torch.full((a.batch,), 500, device=device, dtype=torch.long)
    row = {"model": name, "variant": variant, "batch": a.batch, "steps": a.steps, "iters": a.iters}
    with torch.no_grad(), exact_float32():
        t0 = time.perf_counter()
        for _ in range(3):  # warm-up: compilation and graph capture happen here
            backend.unet(z, t)
        sync(device)
        row["warmup_s"] = round(time.perf_counter() - t0, 1)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(a.calls):
            backend.unet(z, t)
        sync(device)
        dt = (time.perf_counter() - t0) / a.calls
    row["img_steps_per_s"] = round(a.batch / dt, 1)
    row["gflop_per_call_per_img"] = round(flops / 1e9, 3)
    row["mfu_bare_loop"] = round(flops * a.batch / dt / (a.peak_tflops * 1e12), 4)
    if name == "embedded":  # warm-up of the whole path (the 256px model's costs ~10 s; its shapes are warm already)
        anon.anonymize(x, keys)
        sync(device)
    t0 = time.perf_counter()
    out, recs = anon.anonymize(x, keys)
    sync(device)
    ta = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = anon.restore(out, keys, recs)
    sync(device)
    tr = time.perf_counter() - t0
    calls = a.steps * (2 + a.iters) + a.steps  # background trajectory, inversion (1 + iters), generation
    row["anonymize_img_per_s"] = round(a.batch / ta, 2)
    row["restore_img_per_s"] = round(a.batch / tr, 2)
    row["mfu_anonymize"] = round(flops * calls * a.batch / ta / (a.peak_tflops * 1e12), 4)
    row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None
    if name == "embedded":
        row["restore_psnr_median"] = round(float(np.median(psnr(back, x, np.ones(x.shape[:3], bool)))), 2)  # whole crop: no masks
        if ref_restore is not None:
            row["restore_pixels_differing_from_eager"] = round(float((back != ref_restore).mean()), 5)
    print(json.dumps(row), flush=True)
    return {"row": row, "restore": back}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="embedded,celebahq256")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch", type=int, default=64, help="images per call (the 256px model uses --batch-256)")
    p.add_argument("--batch-256", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--calls", type=int, default=20, help="timed bare denoiser calls")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing, not a measurement")
    p.add_argument("--json", help="write the rows here too")
    a = p.parse_args()
    device = torch.device(a.device)
    if a.quick:
        a.batch, a.batch_256, a.steps, a.iters, a.calls = 2, 1, 2, 1, 2
    info = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "peak_tflops": a.peak_tflops}
    import diffusers

    info["diffusers"] = diffusers.__version__
    print(json.dumps(info), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"embedded": "embedded"}
        if "celebahq256" in a.models:
            from diffusers import DDPMScheduler, UNet2DModel

            torch.manual_seed(0)
            arch = dict(CELEBAHQ_256, sample_size=64) if a.quick else CELEBAHQ_256
            UNet2DModel(**arch).save_pretrained(Path(tmp) / "c256" / "unet")
            DDPMScheduler(num_train_timesteps=1000).save_pretrained(Path(tmp) / "c256" / "scheduler")
            folders["celebahq256"] = str(Path(tmp) / "c256")
        for name in a.models.split(","):
            ref = None
            for variant in a.variants.split(","):
                if variant not in VARIANTS:
                    raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
                b = a.batch if name == "embedded" else a.batch_256
                try:
                    r = measure(folders[name], name, variant, argparse.Namespace(**{**vars(a), "batch": b}), device, ref)
                except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others' numbers
                    rows.append({"model": name, "variant": variant, "error": f"{type(e).__name__}: {e}"[:500]})
                    print(json.dumps(rows[-1]), flush=True)
                    write_json(a.json, info, rows)
                    continue
                rows.append(r["row"])
                if variant == "eager":
                    ref = r["restore"]
                torch._dynamo.reset()
                write_json(a.json, info, rows)
    write_json(a.json, info, rows)


def write_json(path: str | None, info: dict, rows: list) -> None:
    """Rewritten after every row: the device call's timeout (jobs/gpu_session.sh, BENCH_S) may stop
    the run midway, and a file written only at the end kept none of the rows measured until then."""
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps({"info": info, "rows": rows}, indent=1))
        tmp.replace(path)


if __name__ == "__main__":
    main()
