"""Tiny models for tests and CI: real diffusers folders, loaded through the same
`from_pretrained` path a user's folder takes.

`anondata/models/tiny32/` is a 165k-parameter UNet2DModel trained here for a few minutes on random
crops of public-domain sample images that ship with scikit-image and matplotlib (astronaut, cat,
coffee, Grace Hopper), by `python -m anondata.testing --train OUT`. It is not a face model: it makes
colourful noise, but its noise predictions are good enough for inversion, so restore round trips
are meaningful in tests (an untrained UNet's are not: its generations explode).
"""

from __future__ import annotations

import shutil
from pathlib import Path

TINY32_DIR = Path(__file__).parent / "models" / "tiny32"


def _tiny_unet(resolution: int):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=resolution,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=None,
    )


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")


def tiny_model_dir(root, resolution: int = 32, layout: str = "pipeline", trained: bool = True, seed: int = 0) -> str:
    """A tiny model folder under `root`. trained=True (resolution 32 only) copies the shipped
    `tiny32`; trained=False saves random weights (for loading/format tests, not for round trips).
    layout="pipeline": unet/ + scheduler/; layout="bare": config.json + scheduler_config.json."""
    import torch

    path = Path(root) / f"tiny-{resolution}-{layout}-{'trained' if trained else f'random{seed}'}"
    if path.exists():
        return str(path)
    if trained:
        if resolution != 32:
            raise ValueError("the shipped trained tiny model is 32x32; use trained=False for other sizes")
        if layout == "pipeline":
            shutil.copytree(TINY32_DIR, path)
        else:
            path.mkdir(parents=True)
            for f in (TINY32_DIR / "unet").iterdir():
                shutil.copy(f, path / f.name)
            shutil.copy(TINY32_DIR / "scheduler" / "scheduler_config.json", path / "scheduler_config.json")
        return str(path)
    torch.manual_seed(seed)
    unet, sched = _tiny_unet(resolution), _scheduler()
    if layout == "pipeline":
        unet.save_pretrained(path / "unet")
        sched.save_pretrained(path / "scheduler")
    else:
        unet.save_pretrained(path)
        sched.save_pretrained(path)
    return str(path)


def with_edited_schedule(model_dir, dest) -> str:
    """A copy of a model folder whose scheduler config says other betas (same weights, so the same
    sha256): what restore and eval must refuse by the manifest's settings.schedule."""
    import json

    shutil.copytree(model_dir, dest)
    dest = Path(dest)
    cfg_path = next(p for p in (dest / "scheduler" / "scheduler_config.json", dest / "scheduler_config.json")
                    if p.is_file())
    cfg = json.loads(cfg_path.read_text())
    cfg["beta_end"] = 0.03
    cfg_path.write_text(json.dumps(cfg))
    return str(dest)


def sample_images() -> list:
    """Public-domain RGB uint8 images that ship inside dependencies."""
    import numpy as np
    from matplotlib import cbook
    from PIL import Image
    from skimage import data

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.array(Image.open(f).convert("RGB"))
    return [data.astronaut(), data.chelsea(), data.coffee(), hopper]


def train_tiny(out: str, steps: int = 1500, resolution: int = 32, seed: int = 0) -> None:
    """Train the tiny test model (see module docstring). ~0.1-0.3 s per step on one CPU core."""
    import numpy as np
    import torch
    from PIL import Image

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images = sample_images()
    unet, sched = _tiny_unet(resolution), _scheduler()
    ac = sched.alphas_cumprod

    def batch(n):
        crops = []
        for _ in range(n):
            im = images[rng.integers(len(images))]
            s = int(rng.integers(64, min(im.shape[:2])))
            y, x = (int(rng.integers(0, d - s + 1)) for d in im.shape[:2])
            crop = Image.fromarray(im[y : y + s, x : x + s]).resize((resolution, resolution), Image.BILINEAR)
            crops.append(np.array(crop))
        return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1

    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    for step in range(steps):
        x0 = batch(32)
        t = torch.randint(0, len(ac), (len(x0),))
        e = torch.randn_like(x0)
        a = ac[t].view(-1, 1, 1, 1)
        loss = ((unet(a.sqrt() * x0 + (1 - a).sqrt() * e, t).sample - e) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    unet.to(torch.float16).save_pretrained(Path(out) / "unet")
    sched.save_pretrained(Path(out) / "scheduler")



RES = 32


# -- tiny latent models (tests/test_backends.py, benchmarks/backend_cost.py) --------------------
def faces32(res: int = RES):
    """The sample images at res x res, uint8 (N, res, res, 3)."""
    import numpy as np
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((res, res), Image.BILINEAR)) for im in sample_images()])


def _autoencoder(kind: str, res: int):
    from diffusers import AutoencoderKL, VQModel

    common = dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
        norm_num_groups=4, sample_size=res,
    )
    if kind == "vq":  # like CompVis/ldm-celebahq-256: VQ-f4, 3 latent channels, scaling_factor in config
        return VQModel(latent_channels=3, num_vq_embeddings=256, scaling_factor=1.0, **common)
    return AutoencoderKL(latent_channels=4, scaling_factor=0.5, **common)


def _latent_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0015, beta_end=0.0195,
                         prediction_type=prediction_type)


def tiny_latent_unet(kind: str, latent_channels: int, latent_size: int):
    from diffusers import UNet2DConditionModel, UNet2DModel

    if kind == "controlnet":
        return UNet2DConditionModel(
            sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
            block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, norm_num_groups=8,
            cross_attention_dim=8, attention_head_dim=4,
        )
    return UNet2DModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8, attention_head_dim=None,
    )


def build_tiny_latent(root, kind: str, seed: int = 0, res: int = RES, unet_state: dict | None = None,
                      zero_out: bool = False, prediction_type: str = "epsilon") -> str:
    """A pipeline folder: vqvae/ (kind "vq", as CompVis/ldm-celebahq-256) or vae/ (AutoencoderKL),
    unet/, scheduler/, and for kind "controlnet" a UNet2DConditionModel + controlnet/ (4-channel
    latent, as the paper's FFHQ model; its zero convolutions are randomised so the hint matters).

    The VQ codebook is set to encoder latents of the sample images (a random codebook sits near 0
    and decodes every latent to the same grey). zero_out=True zeroes the UNet's output layer: eps is
    then 0 and DDIM is a pure rescaling, which keeps generations bounded (an untrained UNet's
    explode), so round trips test the latent plumbing. unet_state: weights of a trained UNet."""
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    ae = _autoencoder("vq" if kind == "vq" else "kl", res)
    if kind == "vq":
        with torch.no_grad():
            x = torch.from_numpy(faces32(res)).permute(0, 3, 1, 2).float() / 127.5 - 1
            h = ae.encode(x).latents.permute(0, 2, 3, 1).reshape(-1, 3)
            idx = torch.randperm(len(h), generator=torch.Generator().manual_seed(seed))
            codes = h[idx[: ae.quantize.n_e] % len(h)] + 0.01 * torch.randn(ae.quantize.n_e, 3)
            ae.quantize.embedding.weight.copy_(codes)
    lc = int(ae.config.latent_channels)
    unet = tiny_latent_unet(kind, lc, res // 4)
    if unet_state is not None:
        unet.load_state_dict(unet_state)
    if zero_out:
        torch.nn.init.zeros_(unet.conv_out.weight)
        torch.nn.init.zeros_(unet.conv_out.bias)
    tag = f"{kind}-{res}-s{seed}{'-zero' if zero_out else ''}{'-trained' if unet_state is not None else ''}-{prediction_type}"
    path = Path(root) / f"tiny-latent-{tag}"
    if path.exists():
        return str(path)
    ae.save_pretrained(path / ("vqvae" if kind == "vq" else "vae"))
    unet.save_pretrained(path / "unet")
    _latent_scheduler(prediction_type).save_pretrained(path / "scheduler")
    if kind == "controlnet":
        cn = ControlNetModel.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(8, 8, 16))
        with torch.no_grad():  # fresh zero convs make the ControlNet a no-op; give them weights
            for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
                conv.weight.normal_(0, 0.05)
        cn.save_pretrained(path / "controlnet")
    return str(path)


if __name__ == "__main__":
    import argparse

    import torch

    p = argparse.ArgumentParser(description="Train the tiny 32px test model shipped in anondata/models/tiny32.")
    p.add_argument("--train", required=True, metavar="OUT")
    p.add_argument("--steps", type=int, default=1500)
    a = p.parse_args()
    torch.set_num_threads(1)
    train_tiny(a.train, a.steps)
