"""Diffusion models behind one small interface, so the scheme never sees a model class.

A backend maps images to the space the scheme works in (`encode`/`decode`; the identity for
pixel models), predicts the noise `eps(z, t)` whatever the checkpoint's prediction type, and
says who it is (`info`: name, revision, sha256 of its weights) so a release records the model
and restore can refuse a different one.

Loading (`load_backend`): "embedded" (the prior shipped in this package), a local folder in the
diffusers layout, or a Hub id through the real `snapshot_download`; offline, a Hub id fails with
a message that says how to pre-download. Folder layouts:

- bare pixel model: `config.json` (UNet2DModel) + weights + `scheduler_config.json` (required: the
  training betas; a folder without one is refused);
- pipeline: `unet/` + `scheduler/`, and for latent diffusion `vqvae/` (VQModel, as
  CompVis/ldm-celebahq-256) or `vae/` (AutoencoderKL or VQModel), optionally `controlnet/`
  (ControlNetModel over a UNet2DConditionModel, conditioned on the face mask as in the paper); a
  part its `model_index.json` names must be there.

What the scheme cannot drive is refused at load with one line, not met mid-job: schedulers without
DDPM betas (`_check_beta_schedule`) or with betas outside [0, 1], a ControlNet whose shapes do not fit
the UNet, class-conditional UNets, added conditions, Fourier time embeddings and outputs of
another channel count than the input (`_check_unconditional`), a non-square sample_size (`_square_size`), and weights that
lack parameters their config asks for (diffusers would initialise them at random) or hold some it
does not use (it would drop them).

Latent models (`LatentBackend`) need more than encode/decode, because decode(encode(y)) != y and
decode is many-to-one: the stored image does not determine the latent that generated it
(benchmarks/backend_cost.py measured key-only restore at 8-10 dB when restore had to find it by
decoder inversion). So the restore record carries it: `carry` = z - encode(stored image) inside the
latent mask (fp16), the latent counterpart of the 8-bit overflow. Anonymize starts from the latent of
the original fitted by decoder inversion (Adam on ||decode(z) - x||^2 over the face mask, from
encode(x)), which sets the fidelity ceiling of key-only restore; restore starts from encode(stored) +
carry and decodes with the continuous decoder the inversion fitted. The background latent encodes
the image with the face zeroed, so it depends only on pixels that anonymize leaves bit-identical.

Every model call (UNet, ControlNet, autoencoder, and decoder inversion's backward pass) runs under
`exact_float32`: the manifest's `dtype float32` then means IEEE float32 with deterministic cuDNN
algorithms, whatever the process set (PyTorch runs float32 convolutions on NVIDIA GPUs as TF32 by
default, and `torch.set_float32_matmul_precision` lowers float32 matmuls to TF32, or to bfloat16
through oneDNN on CPUs with bf16 units).
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import AnondataError, InputError

EMBEDDED_DIR = Path(__file__).parent / "models" / "embedded"
# Weights sha256 of embedded priors this package no longer ships -> the anondata version that
# shipped them. A release restores only with the model that made it, so a restore that meets one
# of these can say what to install (MODEL_CARD.md, "Earlier versions").
EARLIER_EMBEDDED = {
    "6bee9653e02c4d6604c9dd4f07306a14beee1163c1a6f6b621360861eed98b7f": "0.1.0",
    "59ff85b2076061e814d55df74712b7fcea8327f2797b6001c0d3369a68180cfb": "0.2.0",
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")
PREDICTION_TYPES = ("epsilon", "v_prediction")

# Decoder inversion defaults (see LatentBackend.prepare); benchmarks/backend_cost.py measures them.
DECODER_INVERSION_ITERS = 100
DECODER_INVERSION_LR = 0.05


def _flag(obj, name: str, value) -> tuple:
    return (lambda: getattr(obj, name), lambda v: setattr(obj, name, v), value)


def _exact_float32_flags() -> list[tuple]:
    """(get, set, value inside model calls) for each process-global setting that changes what a
    float32 model call computes: TF32 or bfloat16 inner products, and cuDNN's choice of algorithm
    (autotuned or nondeterministic ones differ from run to run)."""
    bk = torch.backends
    if hasattr(bk.cudnn, "conv") and hasattr(bk.mkldnn, "matmul"):
        # torch >= 2.9: per-operator fp32_precision. The allow_tf32 flags are its legacy API, and
        # torch raises on reading them after a mix of the two, so only the new one is touched.
        flags = [_flag(obj, "fp32_precision", "ieee") for obj in (bk.cuda.matmul, bk.cudnn.conv, bk.mkldnn.matmul, bk.mkldnn.conv)]
    else:
        flags = [(torch.get_float32_matmul_precision, torch.set_float32_matmul_precision, "highest"),
                 _flag(bk.cudnn, "allow_tf32", False)]
    return flags + [_flag(bk.cudnn, "deterministic", True), _flag(bk.cudnn, "benchmark", False)]


@contextmanager
def exact_float32():
    """Run the enclosed model calls in IEEE float32 with deterministic cuDNN algorithms, and give
    the caller's settings back after. Restore reruns anonymize's arithmetic, and key-only fidelity
    and the lossless residual's size depend on it matching, so it must not depend on what a training
    script or notebook in the same process set. The settings are per process, not per thread: other
    threads' model calls meanwhile run under them too. As a decorator: a fresh context per call."""
    saved = []
    try:
        for get, put, value in _exact_float32_flags():
            saved.append((put, get()))
            put(value)
        yield
    finally:
        for put, old in reversed(saved):
            put(old)


class _Schedule:
    """What every backend shares: the training noise schedule, the prediction-type conversion,
    and where its denoiser lives (`device`, `dtype`)."""

    alphas_cumprod: torch.Tensor
    prediction_type: str
    unet: torch.nn.Module
    face_mean: tuple[float, ...] | None = None  # read_face_mean: what the flip centres on (scheme v3)
    schedule: str | None = None  # _alphas_cumprod's id of the noise schedule, for the manifest's settings

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def _check_prediction_type(self, prediction_type: str) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise InputError(f"model predicts {prediction_type!r}; anondata supports 'epsilon' and 'v_prediction'")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def _to_eps(self, out: torch.Tensor, z: torch.Tensor, t: int) -> torch.Tensor:
        if out.shape[1] == 2 * z.shape[1]:  # learned variance: the first half is the mean's prediction
            out = out[:, : z.shape[1]]
        if self.prediction_type == "v_prediction":
            a = float(self.alphas_cumprod[t])
            out = a**0.5 * out + (1 - a) ** 0.5 * z
        return out


def _check_unconditional(unet) -> None:
    """The scheme calls the UNet with a noisy input and a timestep only (a UNet2DConditionModel also
    gets one zero token). Refuse at load what that cannot drive: a class-conditional UNet or one
    needing added conditions (SDXL's text_time) fails on its first call, mid-job; a Fourier time
    embedding is a variance-exploding score model (NCSN++), which takes noise levels, not DDPM steps."""
    cfg = unet.config
    if getattr(unet, "class_embedding", None) is not None:
        raise InputError(f"the UNet is class-conditional (class_embed_type {cfg.class_embed_type!r}, num_class_embeds "
                         f"{cfg.num_class_embeds}); anondata runs unconditional models")
    if getattr(unet, "add_embedding", None) is not None or getattr(unet, "encoder_hid_proj", None) is not None:
        raise InputError(f"the UNet needs added conditions (addition_embed_type {getattr(cfg, 'addition_embed_type', None)!r}, "
                         f"encoder_hid_dim_type {getattr(cfg, 'encoder_hid_dim_type', None)!r}); anondata gives a UNet "
                         "only a zero text embedding")
    out, inp = getattr(cfg, "out_channels", None), cfg.in_channels
    if out not in (inp, 2 * inp):  # 2x: a learned variance (_to_eps takes the first half)
        raise InputError(f"the UNet predicts {out} channels for {inp} input channels; anondata needs as many as "
                         "it takes (or twice as many, a learned variance)")
    if getattr(cfg, "time_embedding_type", "positional") == "fourier":
        raise InputError("the UNet has a Fourier time embedding: a variance-exploding score model (as NCSN++), "
                         "which anondata does not run (DDPM-style models only)")


def _square_size(unet) -> int:
    """The UNet's sample_size, which sets the crop size: one int or a square pair. A non-square
    pair was read as its first side, so faces were made at a shape the model never saw."""
    size = unet.config.sample_size
    sides = [size] if isinstance(size, int) else list(size) if isinstance(size, (list, tuple)) else []
    if not sides or len(sides) > 2 or len(set(sides)) != 1 or not all(type(v) is int and v > 0 for v in sides):
        raise InputError(f"the UNet's config has sample_size {size!r}; anondata needs a square size (one integer)")
    return sides[0]


class PixelBackend(_Schedule):
    """A pixel-space `UNet2DModel`: the scheme's latent is the image itself, in [-1, 1]."""

    def __init__(self, unet, alphas_cumprod: torch.Tensor, prediction_type: str, info: dict):
        self._check_prediction_type(prediction_type)
        _check_unconditional(unet)
        self.unet = unet.eval().requires_grad_(False)
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)
        self.prediction_type = prediction_type
        self.info = info
        self.resolution = _square_size(unet)
        self.channels = int(unet.config.in_channels)
        if self.channels != 3:
            raise InputError(f"pixel model has {self.channels} input channels; expected RGB (3)")

    @property
    def settings(self) -> dict:
        return {}

    def to(self, device=None, dtype=None) -> "PixelBackend":
        self.unet.to(**_to_args(device, dtype))
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def latent_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(N, H, W) bool -> (N, 1, H, W) bool at latent resolution."""
        return mask[:, None]

    @exact_float32()
    @torch.no_grad()
    def eps(self, z: torch.Tensor, t: int) -> torch.Tensor:
        """Predicted noise at integer timestep `t` (v-prediction converted to epsilon)."""
        ts = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
        return self._to_eps(self.unet(z, ts).sample, z, t)


class LatentBackend(_Schedule):
    """Latent diffusion: a VQModel or AutoencoderKL around a UNet2DModel, or around a
    UNet2DConditionModel used unconditionally (zero text embedding), optionally with a
    ControlNetModel whose hint is the face mask (1 inside, 0 outside, at pixel resolution).

    Latents are scaled as diffusers' pipelines do: z = (h - shift) * scaling_factor. A VQModel
    decodes anonymized faces through its quantizer like `LDMPipeline` (`vq_quantize=True`); decoder
    inversion fits the continuous decoder (`force_not_quantize=True`), so restored faces decode
    through that one (quantizing the fitted latent would lose what the fit gained).
    """

    def __init__(
        self,
        vae,
        unet,
        alphas_cumprod: torch.Tensor,
        prediction_type: str,
        info: dict,
        controlnet=None,
        decoder_inversion_iters: int = DECODER_INVERSION_ITERS,
        vq_quantize: bool = True,
    ):
        from diffusers import VQModel

        self._check_prediction_type(prediction_type)
        _check_unconditional(unet)
        if not 0 <= decoder_inversion_iters <= 10_000:
            raise InputError(f"decoder_inversion_iters must be in 0..10000, got {decoder_inversion_iters}")
        self.vae = vae.eval().requires_grad_(False)
        self.unet = unet.eval().requires_grad_(False)
        self.controlnet = None if controlnet is None else controlnet.eval().requires_grad_(False)
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)
        self.prediction_type = prediction_type
        self.info = info
        self.is_vq = isinstance(vae, VQModel)
        self.vq_quantize = bool(vq_quantize) and self.is_vq
        self.decoder_inversion_iters = int(decoder_inversion_iters)
        vcfg, ucfg = vae.config, unet.config
        self.scaling_factor = float(getattr(vcfg, "scaling_factor", None) or 1.0)
        self.shift_factor = float(getattr(vcfg, "shift_factor", None) or 0.0)
        self.factor = 2 ** (len(vcfg.block_out_channels) - 1)
        self.latent_channels = int(vcfg.latent_channels if not self.is_vq else (vcfg.vq_embed_dim or vcfg.latent_channels))
        if int(vcfg.in_channels) != 3:
            raise InputError(f"autoencoder takes {vcfg.in_channels} channels; expected RGB (3)")
        if int(ucfg.in_channels) != self.latent_channels:
            raise InputError(
                f"the UNet takes {ucfg.in_channels} channels but the autoencoder's latents have {self.latent_channels}: "
                "unet/ and vae/ are not from the same pipeline"
            )
        self.latent_size = _square_size(unet)
        self.resolution = self.latent_size * self.factor
        self.cross_attention_dim = getattr(ucfg, "cross_attention_dim", None)
        if controlnet is not None:
            if self.cross_attention_dim is None:
                raise InputError("controlnet/ needs a UNet2DConditionModel in unet/ (a UNet2DModel takes no ControlNet residuals)")
            # Its input, text width and residuals (one per down-block layer, at the blocks' widths)
            # must fit the UNet's, or the first model call fails mid-job on a shape mismatch.
            for key in ("in_channels", "cross_attention_dim", "block_out_channels", "layers_per_block"):
                theirs, mine = (getattr(c, key, None) for c in (controlnet.config, ucfg))
                if _plain(theirs) != _plain(mine):
                    raise InputError(f"the ControlNet has {key} {_plain(theirs)}, the UNet {_plain(mine)}: controlnet/ "
                                     "was not made for this UNet")
            emb = controlnet.config.conditioning_embedding_out_channels
            self.hint_size = self.latent_size * 2 ** (len(emb) - 1)
            self.hint_channels = int(controlnet.config.conditioning_channels)
        self._hint = None  # set on the mask-bound copy made by `prepare`
        self._restoring = False  # likewise: decode restored latents without the VQ quantizer

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_size, self.latent_size)

    @property
    def settings(self) -> dict:
        """How anonymize ran, besides model and sampler (goes into the manifest). Restore needs none of
        it: the records carry the generated latents, and restored faces decode without quantizer."""
        return {
            "latent": "vq" if self.is_vq else "kl",
            "vq_quantize": int(self.vq_quantize),
            "decoder_inversion_iters": self.decoder_inversion_iters,
            "controlnet": int(self.controlnet is not None),
        }

    def to(self, device=None, dtype=None) -> "LatentBackend":
        for m in (self.vae, self.unet, self.controlnet):
            if m is not None:
                m.to(**_to_args(device, dtype))
        return self

    # -- autoencoder ----------------------------------------------------------------------------
    @exact_float32()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> scaled latent (VQ: before quantization; KL: the posterior mean)."""
        with torch.no_grad():
            enc = self.vae.encode(x)
            h = enc.latents if self.is_vq else enc.latent_dist.mode()
        return (h - self.shift_factor) * self.scaling_factor

    def _decode(self, z: torch.Tensor, quantize: bool) -> torch.Tensor:
        h = z / self.scaling_factor + self.shift_factor
        if self.is_vq:
            return self.vae.decode(h, force_not_quantize=not quantize).sample
        return self.vae.decode(h).sample

    @exact_float32()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Anonymized faces decode as the model's pipeline does (VQ: through the quantizer); restored
        ones through the continuous decoder, which anonymize's decoder inversion fitted."""
        with torch.no_grad():
            return self._decode(z, self.vq_quantize and not self._restoring)

    def latent_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(N, H, W) bool -> (N, 1, h, w) bool: a latent cell is in if any of its pixels is."""
        return F.max_pool2d(mask[:, None].float(), self.factor) > 0

    def prepare(self, x: torch.Tensor, mask: torch.Tensor, carry: torch.Tensor | None = None):
        """-> (backend bound to this mask, z0 to invert, background latent).

        The background latent encodes the image with the face set to 0, so it depends only on
        pixels outside the mask: anonymize and restore get the same one. Anonymizing (carry None),
        z0 inside the latent mask is fitted by decoder inversion to the pixels inside the mask (the
        only ones the model generates; the rest are copied from the input by the anonymizer).
        Restoring, z0 = encode(x) + carry: the latent anonymize generated (see `carry`).
        """
        m = self.latent_mask(mask)
        bg = self.encode(torch.where(mask[:, None], torch.zeros_like(x), x))
        if carry is None:
            z = self.invert_decoder(x, mask, m, torch.where(m, self.encode(x), bg), bg)
        else:
            z = torch.where(m, self.encode(x) + carry.to(x.dtype), bg)
        return self._bound(mask, restoring=carry is not None), z, bg

    def carry(self, z: torch.Tensor, x_stored: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """What restore adds to encode(stored image) to get back the generated latent z: z - encode(x)
        inside the latent mask, 0 outside, in float16 (restore needs it to ~1e-3, not bit for bit).
        x_stored: the image as restore will see it (8-bit levels plus carried overflow)."""
        m = self.latent_mask(mask).expand_as(z)
        c = torch.where(m, z - self.encode(x_stored), torch.zeros_like(z)).to(torch.float16)
        if not torch.isfinite(c).all():
            raise AnondataError("the generated latent is out of float16 range, in which its restore record "
                                "carries it; none were stored: the model is not usable")
        return c

    @exact_float32()  # the backward passes too, which run outside _decode
    def invert_decoder(self, x, mask, m, z_init, bg, iters: int | None = None, lr: float = DECODER_INVERSION_LR):
        """argmin_z ||decode(where(m, z, bg)) - x||^2 over the pixel mask, by Adam from z_init.
        Each image's loss is separate, so a batch gives what its images give one by one."""
        iters = self.decoder_inversion_iters if iters is None else iters
        if iters == 0:
            return z_init
        w = mask[:, None].to(x.dtype)
        z = z_init.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        with torch.enable_grad():
            for _ in range(iters):
                rec = self._decode(torch.where(m, z, bg), quantize=False)
                loss = (((rec - x) ** 2) * w).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return torch.where(m, z.detach(), bg)

    # -- denoiser -------------------------------------------------------------------------------
    def _bound(self, mask: torch.Tensor, restoring: bool = False) -> "LatentBackend":
        bound = object.__new__(LatentBackend)
        bound.__dict__.update(self.__dict__)
        bound._restoring = restoring
        if self.controlnet is not None:
            hint = mask[:, None].to(self.dtype)
            if hint.shape[-1] != self.hint_size:
                hint = F.interpolate(hint, size=(self.hint_size, self.hint_size), mode="nearest")
            bound._hint = hint.expand(-1, self.hint_channels, -1, -1)
        return bound

    @exact_float32()
    @torch.no_grad()
    def eps(self, z: torch.Tensor, t: int) -> torch.Tensor:
        # Batched: the anonymizer calls the model at one fixed batch shape (see Anonymizer._run),
        # so an image's floats do not depend on its batch-mates.
        ts = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
        if self.cross_attention_dim is None:
            out = self.unet(z, ts).sample
        else:
            # unconditional use of a text-conditioned UNet: one zero token of the configured width
            ctx = torch.zeros(z.shape[0], 1, int(self.cross_attention_dim), device=z.device, dtype=z.dtype)
            if self.controlnet is None:
                out = self.unet(z, ts, encoder_hidden_states=ctx).sample
            else:
                if self._hint is None or self._hint.shape[0] != z.shape[0]:
                    raise RuntimeError("ControlNet backend used without a mask: call prepare() first")
                down, mid = self.controlnet(z, ts, encoder_hidden_states=ctx, controlnet_cond=self._hint, return_dict=False)
                out = self.unet(z, ts, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                                mid_block_additional_residual=mid).sample
        return self._to_eps(out, z, t)


def _plain(value):
    """A config value as JSON gives it back (tuples as lists), to compare a loaded config with a built one."""
    return list(value) if isinstance(value, tuple) else value


def _to_args(device, dtype) -> dict:
    # Passing dtype=None still makes diffusers warn about float32 modules: pass only what is set.
    return {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}


# -- identity -----------------------------------------------------------------------------------
def _loaded_weight_files(component_dir: Path) -> list[Path]:
    """The weight files diffusers' from_pretrained reads in this folder, in its order: a sharded
    safetensors index's shards, else the safetensors file, else the .bin file (a .bin index, which
    it does not read by default, last). Other files (flax, .ckpt, fp16 variants) are not the model
    we run, so they do not change its identity."""
    st, pt = "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"
    for name in (f"{st}.index.json", st, pt, f"{pt}.index.json"):
        path = component_dir / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError):
            raise InputError(f"{path}: not a valid sharded-weights index") from None
        return [component_dir / s for s in shards]
    return []


def _present_weight_files(component_dir: Path) -> list[Path]:
    """`_loaded_weight_files`, refusing a folder without any or with a shard missing."""
    files = _loaded_weight_files(component_dir)
    if not files:
        raise InputError(f"model folder {component_dir} holds no weight file (diffusion_pytorch_model.safetensors or .bin)")
    for p in files:
        if not p.is_file():
            raise InputError(f"model folder {component_dir}: weight shard {p.name} is missing")
    return files


def _component_dirs(folder: Path) -> dict[str, Path]:
    """role -> folder, for the parts the backend loads. A bare model folder is the unet."""
    if (folder / "unet" / "config.json").is_file():
        dirs = {"unet": folder / "unet"}
    elif (folder / "config.json").is_file():
        return {"unet": folder}
    else:
        return {}
    _check_model_index(folder)
    for role, sub in (("vae", "vqvae"), ("vae", "vae"), ("controlnet", "controlnet")):
        if role not in dirs and (folder / sub / "config.json").is_file():
            dirs[role] = folder / sub
    return dirs


def _check_model_index(folder: Path) -> None:
    """A pipeline folder missing a part its model_index.json names was loaded without it: a latent
    UNet without its autoencoder as a pixel model (making noise at the latent size), a ControlNet
    pipeline as its UNet alone."""
    index = folder / "model_index.json"
    if not index.is_file():
        return
    try:
        parts = json.loads(index.read_text())
    except (OSError, ValueError):
        raise InputError(f"{index}: not readable JSON") from None
    for sub in ("vqvae", "vae", "controlnet"):
        named = parts.get(sub) if isinstance(parts, dict) else None
        if isinstance(named, list) and any(named) and not (folder / sub / "config.json").is_file():
            raise InputError(f"model folder {folder}: model_index.json names {sub}/, but there is no {sub}/config.json; "
                             "copy or download the whole pipeline")


def weights_sha256(folder: Path) -> str:
    """One hash over the weights the backend loads: sha256 of lines 'role/file\\0sha256(file)\\n'
    in role order (unet, vae, controlnet). Roles, not paths, so a bare folder and a pipeline
    folder holding the same UNet weights are the same model. Configs are not hashed."""
    folder = Path(folder)
    lines = []
    for role, d in sorted(_component_dirs(folder).items(), key=lambda kv: ("unet", "vae", "controlnet").index(kv[0])):
        for p in _present_weight_files(d):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            lines.append(f"{role}/{p.name}\0{h.hexdigest()}\n")
    if not lines:
        raise InputError(f"model folder {folder} holds no weight files")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


# -- loading ------------------------------------------------------------------------------------
def _scheduler_config(folder: Path) -> dict:
    for cand in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"):
        if cand.is_file():
            try:
                cfg = json.loads(cand.read_text())
            except (OSError, ValueError) as e:
                raise InputError(f"{cand}: not a readable JSON scheduler config ({e})") from None
            if not isinstance(cfg, dict):
                raise InputError(f"{cand}: not a scheduler config (expected a JSON object)")
            return cfg
    raise InputError(
        f"model folder {folder} has no scheduler config (scheduler/scheduler_config.json or "
        "scheduler_config.json): anondata needs the training noise schedule"
    )


def _check_beta_schedule(cfg: dict) -> None:
    """The scheme runs DDIM on the model's training betas, so the scheduler must have some: a
    variance-exploding (ScoreSdeVe, NCSN++), EDM/Karras-sigma, flow-matching or consistency
    scheduler has none, and DDIMScheduler.from_config would fill in its default linear betas,
    a schedule the model never saw (no error, wrong images, restore from the key fails)."""
    import inspect

    import diffusers

    name = cfg.get("_class_name")
    if not name:  # an old config without a class: read as DDPM, as diffusers does
        return
    cls = getattr(diffusers, str(name), None) if str(name).endswith("Scheduler") else None
    if cls is None:
        raise InputError(f"the model's scheduler is a {name}, which this diffusers does not know; "
                         "anondata runs DDPM-style (beta schedule) diffusion models")
    if hasattr(cls, "_backends"):  # a placeholder for a class whose extra dependency is missing
        return
    if "beta_schedule" not in inspect.signature(cls.__init__).parameters:
        raise InputError(f"the model's scheduler is a {name}, which has no DDPM beta schedule (a variance-exploding, "
                         "EDM, flow-matching or consistency model); anondata runs DDPM-style diffusion models only")


def _alphas_cumprod(cfg: dict) -> tuple[torch.Tensor, str]:
    """(alphas_cumprod, schedule id). The id names the schedule by the config values that define
    it (with diffusers' defaults filled in) and the prediction type: the weights' sha256 does not
    cover configs, so a scheduler config edited after anonymizing would otherwise restore from the
    key silently wrong. From the config, not the floats: the same config must give the same id
    on every machine and torch version."""
    # The scheduler classes own the beta formulas; DDIMScheduler accepts DDPM configs too.
    from diffusers import DDIMScheduler

    _check_beta_schedule(cfg)
    try:
        sched = DDIMScheduler.from_config(cfg)
    except (NotImplementedError, ValueError, TypeError) as e:  # e.g. DDPM's "sigmoid" betas, which DDIM lacks
        raise InputError(f"the model's scheduler config is not usable here: {e}") from None
    a = sched.alphas_cumprod.double()
    # Betas outside [0, 1] give products below 0, above 1 or 0 mid-way: DDIM's square roots and
    # divisions then fail on every record. Only the top may be 0 (zero terminal SNR; Anonymizer
    # refuses the steps that would start there).
    if not (torch.isfinite(a).all() and (a >= 0).all() and (a <= 1).all() and (a[1:] <= a[:-1]).all()
            and (a[:-1] > 0).all()):
        raise InputError("the model's scheduler config is not a noise schedule: its betas must lie in [0, 1] "
                         "(alphas_cumprod falling from at most 1, above 0 before the last timestep)")
    c = sched.config
    defining = {k: c.get(k) for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                      "trained_betas", "rescale_betas_zero_snr")}
    defining["prediction_type"] = cfg.get("prediction_type", "epsilon")
    text = json.dumps(defining, sort_keys=True, separators=(",", ":"), default=list)
    return sched.alphas_cumprod.clone(), hashlib.sha256(text.encode()).hexdigest()[:16]


def check_model(name_or_path: str) -> None:
    """Fail here, once, with one line, on what every worker would otherwise fail on when loading:
    no such folder, no scheduler config or one without betas, no UNet config, a missing weight file. Reads configs and
    file names only (a Hub id is fetched, which loading would do anyway)."""
    folder = _resolve(str(name_or_path))[0]
    _check_beta_schedule(_scheduler_config(folder))
    dirs = _component_dirs(folder)
    if "unet" not in dirs:
        raise InputError(f"model folder {folder} has no UNet config (unet/config.json or config.json)")
    for d in dirs.values():
        _present_weight_files(d)


def model_sha256(name_or_path: str) -> str:
    """The weights sha256 a backend for this model would report, without loading it."""
    return weights_sha256(_resolve(str(name_or_path))[0])


def _resolve(name_or_path: str) -> tuple[Path, str, str | None]:
    """-> (local folder, display name, revision)."""
    if name_or_path == "embedded":
        if not (EMBEDDED_DIR / "unet" / "config.json").is_file():
            raise InputError(
                "the embedded face prior is not in this installation "
                f"({EMBEDDED_DIR}); reinstall anondata or pass --model FOLDER"
            )
        return EMBEDDED_DIR, "embedded", None
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"--model {name_or_path}: not a folder (expected a diffusers model folder)")
        return path, path.resolve().name, None
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/")):
        raise InputError(f"--model {name_or_path}: no such folder, and not a Hub id of the form OWNER/NAME")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            name_or_path, allow_patterns=["*.json", "*.safetensors", "*.bin", "*/*.json", "*/*.safetensors", "*/*.bin"]
        )
    except Exception as e:  # offline, unknown repo, auth: all end the same way for the user
        raise InputError(
            f"--model {name_or_path}: could not fetch from the Hugging Face Hub ({type(e).__name__}). "
            f"On a machine with network run `huggingface-cli download {name_or_path} --local-dir DIR`, "
            "copy DIR here and pass --model DIR"
        ) from None
    return Path(local), name_or_path, Path(local).name


def _class_name(d: Path) -> str:
    try:
        return str(json.loads((d / "config.json").read_text()).get("_class_name", ""))
    except (OSError, ValueError, AttributeError):
        raise InputError(f"{d / 'config.json'}: not a readable JSON config") from None


def _load(cls_by_name: dict, d: Path, what: str, name: str, dtype, weights: bool = True):
    cls_name = _class_name(d) or next(iter(cls_by_name))  # no _class_name: the layout's default class
    if cls_name not in cls_by_name:
        raise InputError(
            f"--model {name}: {what} is a {cls_name}; "
            f"anondata supports {', '.join(sorted(cls_by_name))}"
        )
    cls = cls_by_name[cls_name]
    try:
        if not weights:  # the module from its config as from_pretrained builds it, on no memory
            with torch.device("meta"):
                module = cls.from_config(cls.load_config(d))
            return module if module.dtype == dtype else module.to(dtype=dtype)
        # low_cpu_mem_usage=False: without `accelerate` installed diffusers would warn on every load.
        model, loading = cls.from_pretrained(d, torch_dtype=dtype, low_cpu_mem_usage=False, output_loading_info=True)
    except (OSError, ValueError, EnvironmentError, RuntimeError, TypeError) as e:  # TypeError: a config value's type
        raise InputError(f"--model {name}: could not load the {what}: {e}") from None
    # diffusers fills parameters the weights lack with a fresh random init and only logs it: a config
    # edited after training (configs are not part of the model's sha256) would run a partly random
    # model, different in every process, whose records no restore reproduces.
    missing = sorted(loading.get("missing_keys") or [])
    if missing:
        raise InputError(f"--model {name}: the {what}'s weights lack {len(missing)} parameters its config asks for "
                         f"(first: {missing[0]}); config.json and the weights are not from the same model")
    # Likewise for weights the config has no place for (a layer edited out): only logged, and the
    # rest runs as another model under the same sha256.
    unused = sorted(loading.get("unexpected_keys") or [])
    if unused:
        raise InputError(f"--model {name}: the {what}'s weights hold {len(unused)} parameters its config does not use "
                         f"(first: {unused[0]}); config.json and the weights are not from the same model")
    return model


def _check_device(device) -> None:
    """Before loading: an unknown device string, or a GPU this machine lacks, was a torch traceback
    (AssertionError 'Torch not compiled with CUDA enabled') after the weights were read."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, TypeError, ValueError) as e:
        raise InputError(f"device {str(device)!r} is not usable here ({str(e).splitlines()[0][:120]})") from None


def load_backend(
    name_or_path: str = "embedded",
    device: str | torch.device = "cpu",
    dtype=torch.float32,
    decoder_inversion_iters: int = DECODER_INVERSION_ITERS,
    vq_quantize: bool = True,
    weights: bool = True,
) -> PixelBackend | LatentBackend:
    """A backend for "embedded", a diffusers folder or a Hub id (see the module docstring).
    decoder_inversion_iters and vq_quantize apply to latent models only.

    weights=False: the modules are built from their configs on PyTorch's meta device, with no
    weights read into memory (they are still hashed, for `info`) and `device` ignored. Such a
    backend cannot run; it says what a loaded one would (info, settings, resolution, latent
    shape, face mean) by the same code, for a driver that must know what its workers will record
    without a large model's load (pipeline._same_marker_as_committed)."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel, UNet2DModel, VQModel

    if weights:  # else `device` is ignored: a driver without the workers' GPU asks what they will record
        _check_device(device)
    folder, name, revision = _resolve(str(name_or_path))
    dirs = _component_dirs(folder)
    if "unet" not in dirs:
        raise InputError(f"--model {name_or_path}: no unet/config.json or config.json: not a diffusers model folder")
    cfg = _scheduler_config(folder)
    info = {"name": name, "sha256": weights_sha256(folder), "revision": revision or ""}
    prediction_type = cfg.get("prediction_type", "epsilon")
    alphas_cumprod, schedule = _alphas_cumprod(cfg)
    if "vae" not in dirs:
        if "controlnet" in dirs:
            raise InputError(f"--model {name_or_path}: controlnet/ without vae/ or vqvae/: only latent ControlNet models are supported")
        unet = _load({"UNet2DModel": UNet2DModel}, dirs["unet"], "UNet", name_or_path, dtype, weights)
        backend = PixelBackend(unet, alphas_cumprod, prediction_type, info)
        backend.face_mean = read_face_mean(folder, backend.channels)
        backend.schedule = schedule
        return backend.to(device=device) if weights else backend
    unet_classes = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}
    unet = _load(unet_classes, dirs["unet"], "UNet", name_or_path, dtype, weights)
    vae = _load({"VQModel": VQModel, "AutoencoderKL": AutoencoderKL}, dirs["vae"], "autoencoder", name_or_path, dtype,
                weights)
    controlnet = None
    if "controlnet" in dirs:
        controlnet = _load({"ControlNetModel": ControlNetModel}, dirs["controlnet"], "ControlNet", name_or_path, dtype,
                           weights)
    backend = LatentBackend(
        vae, unet, alphas_cumprod, prediction_type, info, controlnet=controlnet,
        decoder_inversion_iters=decoder_inversion_iters, vq_quantize=vq_quantize,
    )
    backend.face_mean = read_face_mean(folder, backend.latent_shape[0])
    backend.schedule = schedule
    return backend.to(device=device) if weights else backend


ANONDATA_CONFIG = "anondata.json"


def read_face_mean(folder: Path, channels: int) -> tuple[float, ...] | None:
    """The model's mean face, one value per latent channel, from FOLDER/anondata.json
    ({"face_mean": [...]}, written by jobs/train_prior.py), or None when the file is absent.

    Why a model carries it: the sign flip averages a face's own colour away, and a model reading
    "no colour" generates a grey face; flipping around the mean face's colour instead gives the
    stranger an average skin tone (scheme.flip, docs/SCHEME.md "The flip's centre")."""
    path = Path(folder) / ANONDATA_CONFIG
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not readable JSON ({e})") from None
    fm = cfg.get("face_mean") if isinstance(cfg, dict) else None
    if (not isinstance(cfg, dict) or set(cfg) - {"face_mean", "about"} or not isinstance(fm, list)
            or len(fm) != channels or not all(type(v) in (int, float) and math.isfinite(v) and abs(v) <= 3 for v in fm)):
        raise InputError(f'{path}: expected {{"face_mean": [{channels} numbers in -3..3]}} (and optionally "about")')
    return tuple(float(v) for v in fm)
