"""What each backend costs on CPU, and what restore fidelity a latent model can reach.

    PYTHONPATH=. python benchmarks/backend_cost.py [--threads 1] [--skip-fidelity] [--json OUT]

1. Cost: seconds per image per sampler step (one eps call: what anonymize and restore pay
   (steps * (2 + inversion_iters)) times, plus one decode) for the tiny pixel model, the tiny
   latent models of anondata/testing.py (VQ, KL, ControlNet), and the 256px
   google/ddpm-celebahq-256 UNet2DModel architecture with random weights; and seconds per image
   per decoder-inversion iteration for the latent ones.
2. Fidelity: a tiny AutoencoderKL / VQModel and a tiny latent UNet trained briefly here on the
   public-domain sample images; key-only restore through uint8 (PSNR vs the original, inside the
   mask) as a function of anonymize's decoder-inversion iterations, next to the autoencoder's own
   reconstruction PSNR inside the mask (encoder only, and decoder inversion): the ceiling for any
   key-only latent restore; and the restore record's size (it carries the generated latent).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anondata import Anonymizer  # noqa: E402
from anondata.backends import load_backend  # noqa: E402
from anondata.scheme import Sampler  # noqa: E402
from anondata.testing import build_tiny_latent, faces32, tiny_latent_unet  # noqa: E402

CELEBAHQ_256 = dict(
    sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
)


def per_step_seconds(backend, batch: int, repeats: int) -> float:
    r = backend.resolution
    x = torch.rand(batch, 3, r, r) * 2 - 1
    mask = torch.ones(batch, r, r, dtype=torch.bool)
    if hasattr(backend, "prepare"):
        bound = backend._bound(mask)
        z = backend.encode(x)
    else:
        bound, z = backend, x
    bound.eps(z, 500)  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        bound.eps(z, 500)
    return (time.perf_counter() - t) / repeats / batch


def decinv_seconds(backend, batch: int, iters: int) -> float:
    r = backend.resolution
    x = torch.rand(batch, 3, r, r) * 2 - 1
    mask = torch.ones(batch, r, r, dtype=torch.bool)
    m = backend.latent_mask(mask)
    z = backend.encode(x)
    t = time.perf_counter()
    backend.invert_decoder(x, mask, m, z, torch.zeros_like(z), iters=iters)
    return (time.perf_counter() - t) / iters / batch


def cost(root: Path) -> dict:
    from diffusers import DDIMScheduler, UNet2DModel

    from anondata.testing import tiny_model_dir

    rows = {}
    rows["pixel tiny32"] = {"s_per_img_step": per_step_seconds(load_backend(tiny_model_dir(root)), 4, 5)}
    for kind in ("vq", "kl", "controlnet"):
        b = load_backend(build_tiny_latent(root, kind))
        rows[f"latent tiny {kind} (32px)"] = {
            "s_per_img_step": per_step_seconds(b, 4, 5), "s_per_img_decinv_iter": decinv_seconds(b, 4, 10),
        }
    torch.manual_seed(0)
    big = root / "ddpm-celebahq-256-arch"
    UNet2DModel(**CELEBAHQ_256).save_pretrained(big / "unet")
    DDIMScheduler(num_train_timesteps=1000).save_pretrained(big / "scheduler")
    b = load_backend(big)
    rows["google/ddpm-celebahq-256 arch (random weights)"] = {
        "s_per_img_step": per_step_seconds(b, 1, 2),
        "params_M": round(sum(p.numel() for p in b.unet.parameters()) / 1e6, 1),
    }
    return rows


# -- fidelity with a briefly trained tiny latent model ---------------------------------------------
def _crops(rng, n: int, res: int) -> torch.Tensor:
    from PIL import Image

    from anondata.testing import sample_images

    images = sample_images()
    out = []
    for _ in range(n):
        im = images[rng.integers(len(images))]
        s = int(rng.integers(64, min(im.shape[:2])))
        y, x = (int(rng.integers(0, d - s + 1)) for d in im.shape[:2])
        out.append(np.asarray(Image.fromarray(im[y : y + s, x : x + s]).resize((res, res), Image.BILINEAR)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_tiny_latent(root: Path, kind: str, ae_steps: int, unet_steps: int, seed: int = 0) -> str:
    """Train the tiny autoencoder (MSE on the continuous path, plus a small KL term for "kl"),
    then a tiny latent UNet on its latents; save as a pipeline folder."""
    rng = np.random.default_rng(seed)
    base = Path(build_tiny_latent(root, kind, seed=seed))
    from diffusers import AutoencoderKL, DDIMScheduler, VQModel

    sub = "vqvae" if kind == "vq" else "vae"
    ae = (VQModel if kind == "vq" else AutoencoderKL).from_pretrained(base / sub).train()
    opt = torch.optim.Adam(ae.parameters(), lr=2e-3)
    for step in range(ae_steps):
        x = _crops(rng, 16, 32)
        if kind == "vq":
            h = ae.encode(x).latents
            rec = ae.decode(h, force_not_quantize=True).sample
            loss = ((rec - x) ** 2).mean()
        else:
            post = ae.encode(x).latent_dist
            rec = ae.decode(post.sample()).sample
            loss = ((rec - x) ** 2).mean() + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    ae.eval()
    with torch.no_grad():
        lat = torch.cat([ae.encode(_crops(rng, 64, 32)).latents if kind == "vq" else ae.encode(_crops(rng, 64, 32)).latent_dist.mode()
                         for _ in range(8)])
        scale = 1.0 / float(lat.std())
        if kind == "vq":  # codebook from latents of the training crops (k-means-free stand-in for VQ training)
            flat = lat.permute(0, 2, 3, 1).reshape(-1, lat.shape[1])
            idx = torch.randperm(len(flat), generator=torch.Generator().manual_seed(seed))[: ae.quantize.n_e]
            ae.quantize.embedding.weight.copy_(flat[idx])
    ae.register_to_config(scaling_factor=scale)
    lc = lat.shape[1]
    unet = tiny_latent_unet(kind, lc, 8)
    sched = DDIMScheduler.from_pretrained(base / "scheduler")
    ac = sched.alphas_cumprod
    uopt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    ctx = torch.zeros(32, 1, 8)
    for step in range(unet_steps):
        z0 = lat[torch.from_numpy(rng.integers(0, len(lat), 32))] * scale
        t = torch.randint(0, len(ac), (32,))
        e = torch.randn_like(z0)
        a = ac[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * e
        out = unet(zt, t, encoder_hidden_states=ctx).sample if kind == "controlnet" else unet(zt, t).sample
        loss = ((out - e) ** 2).mean()
        uopt.zero_grad()
        loss.backward()
        uopt.step()
    path = root / f"trained-{kind}"
    ae.save_pretrained(path / sub)
    unet.save_pretrained(path / "unet")
    sched.save_pretrained(path / "scheduler")
    return str(path)


def fidelity(root: Path, ae_steps: int, unet_steps: int, iters_list: list[int], steps: int) -> dict:
    faces = faces32()
    keys = [hashlib.sha256(b"bench" + bytes([i])).digest() for i in range(len(faces))]
    yy, xx = np.mgrid[:32, :32]
    ellipse = ((yy - 15.5) / 11) ** 2 + ((xx - 15.5) / 9) ** 2 <= 1
    masks = np.stack([ellipse] * len(faces))
    out = {}
    for kind in ("kl", "vq"):
        t0 = time.perf_counter()
        folder = train_tiny_latent(root, kind, ae_steps, unet_steps)
        res = {"train_s": round(time.perf_counter() - t0, 1)}
        for quantize in ((True, False) if kind == "vq" else (False,)):
            for iters in iters_list:
                b = load_backend(folder, decoder_inversion_iters=iters, vq_quantize=quantize)
                m3 = np.broadcast_to(masks[..., None], faces.shape)
                inside = lambda u: float(10 * np.log10(255**2 / max(np.mean((u[m3].astype(float) - faces[m3]) ** 2), 1e-12)))  # noqa: E731
                anon = Anonymizer(b, Sampler(steps=steps, inversion_iters=4))
                x = torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 127.5 - 1
                with torch.no_grad():
                    enc_only = b.decode(b.encode(x))
                mt = torch.from_numpy(masks)
                _, z, _ = b.prepare(x, mt)  # what anonymize starts from
                dec_inv = b._bound(mt, restoring=True).decode(z)  # restored faces decode without quantizer
                to_u8 = lambda y: np.clip(np.round((y.double() + 1) * 127.5), 0, 255).permute(0, 2, 3, 1).numpy().astype(np.uint8)
                t = time.perf_counter()
                a, recs = anon.anonymize(faces, keys, masks=masks)
                r = anon.restore(a, keys, recs)
                w = anon.restore(a, keys[::-1], recs)
                res[f"quantize={int(quantize)} decinv={iters}"] = {
                    "ae_recon_psnr_in_mask_encoder": round(inside(to_u8(enc_only)), 2),
                    "ae_recon_psnr_in_mask_decinv": round(inside(to_u8(dec_inv)), 2),
                    "restore_psnr_in_mask": round(inside(r), 2),
                    "wrong_key_psnr_in_mask": round(inside(w), 2),
                    "anonymized_psnr_in_mask": round(inside(a), 2),
                    "max_overflow_levels": int(max(np.abs(rc.overflow).max() for rc in recs)),
                    "record_bytes_median": int(np.median([len(rc.to_bytes()) for rc in recs])),
                    "s_anonymize_plus_2_restores": round(time.perf_counter() - t, 1),
                }
                print(kind, f"quantize={int(quantize)} decinv={iters}", res[f"quantize={int(quantize)} decinv={iters}"], flush=True)
        out[kind] = res
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-fidelity", action="store_true")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--ae-steps", type=int, default=600)
    p.add_argument("--unet-steps", type=int, default=600)
    p.add_argument("--decinv", default="0,50,200", help="decoder-inversion iterations to compare")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", help="write the results here too")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    result = {"threads": a.threads, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if not a.skip_cost:
            result["cost"] = cost(root)
            print(json.dumps(result["cost"], indent=1), flush=True)
        if not a.skip_fidelity:
            result["fidelity"] = fidelity(root, a.ae_steps, a.unet_steps, [int(i) for i in a.decinv.split(",")], a.steps)
            print(json.dumps(result["fidelity"], indent=1), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
