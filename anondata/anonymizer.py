"""The core API: anonymize and restore batches of face crops at the model's resolution.

Everything here is plumbing around `scheme.transform`: uint8 <-> float, keys -> signs, masks,
batching, and what 8-bit storage loses. Restore always starts from the uint8 image that is stored.

8-bit storage: generated pixels can leave [-1, 1]; clipping them would break restore (the
inversion starts from the wrong image). The clipped-off part (`overflow`, integer levels) goes
into the restore record, so restore starts from the generated image up to rounding. Latent models
lose more (decoding is many-to-one): their records carry the generated latent's difference from
encode(stored image) (backends.LatentBackend.carry).
Lossless mode adds the residual original - key-only restore, and each masked value mod 3, so
restore is bit-exact even where another thread count, batch or device moves a rounded pixel by
one level; the original's sha256 makes anything larger an error, never a silent change.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import numpy as np
import torch

from . import keystream, scheme
from .backends import EARLIER_EMBEDDED, load_backend
from .errors import AnondataError, FormatError, InputError, LosslessMismatch
from .restore_record import FACE_MEAN_UNIT, MAX_BATCH, RestoreRecord, latent_cells, scheme_name, sha256_image, snap

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


# A face needs at least this many secret signs (sign cells its mask touches; v1: masked latent
# values). Detected faces have ~4,700 in v1 and ~410 at cells of 2, full 64 px crops 12,288 and
# 1,024; fewer means a mask too small to hide anything, or an empty one, which would publish the
# input unchanged.
MIN_SECRET_SIGNS = 64

# Key-only records whose restore would fall below this PSNR (over the face mask) keep their
# lossless residual (Anonymizer.anonymize floor_db; the job's --lossy-restore uses it).
RESTORE_FLOOR_DB = 30.0


def _scheme_sampler(sampler: scheme.Sampler, sign_cell: int, background: str) -> scheme.Sampler:
    """The scheme fixes the timesteps ("leading" for a sign per value, "logsnr" for cells) and the
    background path (v3 "noised", v1/v2 "inverted")."""
    return replace(sampler, spacing="logsnr" if sign_cell else "leading", background=background)


class _Made(NamedTuple):
    """What a record was made with besides the model and sampler settings: restore groups records
    by it and runs each group exactly so (face_mean () = no centre, v1/v2)."""

    batch: int
    sign_cell: int
    background: str
    face_mean: tuple[int, ...]

    @classmethod
    def of(cls, rec: RestoreRecord) -> "_Made":
        return cls(rec.batch, rec.sign_cell, rec.background, rec.face_mean or ())


# What a v3 flip reflects around: the model's mean face (anondata.json; 0 without one) or 0.
# Measured on CelebA (docs/EVAL.md, 0.1.0's prior): the mean face gives strangers skin tones (colour shift -5
# levels of red against -27) and keeps a little more identity (98% of faces beyond dlib's 0.6
# against 100%).
FLIP_CENTRES = ("mean-face", "zero")


def _non_finite() -> AnondataError:
    return AnondataError("the model generated non-finite values (NaN or infinity); none were stored: "
                         "check the model, its dtype and device")


def masked_psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """PSNR of two uint8 (R, R, 3) images over the mask's pixels (inf when identical or no mask)."""
    d = a[mask].astype(np.float64) - b[mask].astype(np.float64)
    mse = float(np.mean(d * d)) if d.size else 0.0
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


class Anonymizer:
    """The scheme new records get: `background` "noised" (the default) is v3, "inverted" is what
    v1/v2 did, kept to reproduce older releases (its faces come out oversaturated: docs/SCHEME.md,
    "The background path"). sign_cell 0 (the default): a sign per value, "leading" timesteps;
    >= 1: one sign per cell x cell block of the latent grid, shared by the channels
    (keystream.cell_signs), and log-SNR timesteps, which restores a sharp prior from the key more
    closely but keeps more of the identity (docs/SCHEME.md, "Sign cells"), so it is opt-in. The
    scheme fixes spacing and background, so `sampler`'s are set from it. Restore follows each
    record's own scheme."""

    def __init__(self, backend, sampler: scheme.Sampler, batch_size: int = 8, sign_cell: int | None = None,
                 background: str = "noised", flip_centre: str = "mean-face"):
        if not 1 <= batch_size <= MAX_BATCH:
            raise InputError(f"batch_size must be in 1..{MAX_BATCH}, got {batch_size}")
        if backend.dtype not in _DTYPES.values():  # records name it; half precision is not among them
            raise InputError(f"the backend runs in {backend.dtype}; anondata runs {' or '.join(_DTYPES)} "
                             "(load it with dtype=torch.float32)")
        if sampler.steps >= backend.num_train_timesteps:  # scheme.timesteps: t_k up to (N-1) T / N + 1
            raise InputError(f"steps must be below the model's {backend.num_train_timesteps} training timesteps, "
                             f"got {sampler.steps}")
        # A zero-terminal-SNR schedule (the embedded prior's) has alpha 0 at its last timestep: DDIM
        # cannot step from there (c1 = sqrt(a_s / a_t)), and from T / 2 steps on the first one does.
        ac, T = backend.alphas_cumprod, backend.num_train_timesteps
        if not float(ac[scheme.timesteps(ac, sampler.steps)[-1]]) > 0:
            most = max((n for n in range(1, sampler.steps) if float(ac[(n - 1) * T // n + 1]) > 0), default=0)
            raise InputError(f"at {sampler.steps} steps the first step starts where the model's noise schedule has "
                             f"alpha 0 (zero terminal SNR), which DDIM cannot invert to: use at most {most} steps")
        self.backend = backend
        self.batch_size = batch_size
        grid = self._latent_shape()[-1]
        sign_cell = 0 if sign_cell is None else sign_cell
        if type(sign_cell) is not int or not 0 <= sign_cell <= grid:
            raise InputError(f"sign_cell must be an integer in 0..{grid} (the latent grid), got {sign_cell!r}")
        if background not in scheme.BACKGROUNDS:
            raise InputError(f"background must be one of {scheme.BACKGROUNDS}, got {background!r}")
        if flip_centre not in FLIP_CENTRES:
            raise InputError(f"flip_centre must be one of {FLIP_CENTRES}, got {flip_centre!r}")
        self.sign_cell = sign_cell
        self.background = background
        self.flip_centre = flip_centre
        self.sampler = _scheme_sampler(sampler, sign_cell, background)
        # v3 flips around the model's mean face (scheme.flip), quantized as its records store it
        fm = (flip_centre == "mean-face" and backend.face_mean) or (0.0,) * self._latent_shape()[0]
        self.face_mean = tuple(int(round(v * FACE_MEAN_UNIT)) for v in fm) if background == "noised" else None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = "embedded",
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        steps: int | None = None,
        inversion_iters: int | None = None,
        batch_size: int | None = None,
        sign_cell: int | None = None,
        background: str = "noised",
        flip_centre: str = "mean-face",
        weights: bool = True,
    ) -> "Anonymizer":
        """weights=False: built without loading the weights (backends.load_backend), to read its
        model_info and settings; it cannot anonymize."""
        if dtype not in _DTYPES:
            raise InputError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        backend = load_backend(name_or_path, device=device, dtype=_DTYPES[dtype], weights=weights)
        defaults = scheme.Sampler()
        try:
            sampler = scheme.Sampler(
                steps=defaults.steps if steps is None else steps,
                inversion_iters=defaults.inversion_iters if inversion_iters is None else inversion_iters,
            )
        except ValueError as e:
            raise InputError(str(e)) from None
        if batch_size is None:  # one image per call on a CPU (no gain from more), a full batch on a GPU
            batch_size = 1 if backend.device.type == "cpu" else 16
        return cls(backend, sampler, batch_size=batch_size, sign_cell=sign_cell, background=background,
                   flip_centre=flip_centre)

    def to(self, device=None) -> "Anonymizer":
        self.backend.to(device=device)
        return self

    @property
    def resolution(self) -> int:
        return self.backend.resolution

    @property
    def dtype_name(self) -> str:
        return {v: k for k, v in _DTYPES.items()}[self.backend.dtype]

    @property
    def model_info(self) -> dict:
        return dict(self.backend.info)

    @property
    def settings(self) -> dict:
        return {
            "scheme": scheme_name(self.sign_cell, self.background),
            "sampler": "ddim-eta0-fixedpoint",
            "steps": self.sampler.steps,
            "inversion_iters": self.sampler.inversion_iters,
            "sign_cell": self.sign_cell,
            "background": self.background,
            "face_mean": "none" if self.face_mean is None else ",".join(map(str, self.face_mean)),
            **({"schedule": self.backend.schedule} if self.backend.schedule else {}),
            "dtype": self.dtype_name,
            "resolution": self.resolution,
            **getattr(self.backend, "settings", {}),
        }

    # -- checks -------------------------------------------------------------------------------
    def _check_images(self, images, what: str) -> np.ndarray:
        if isinstance(images, torch.Tensor):
            images = images.cpu().numpy()
        if not isinstance(images, np.ndarray):
            raise InputError(f"{what}: expected a numpy uint8 array (N, H, W, 3), got {type(images).__name__}")
        r = self.resolution
        if images.dtype != np.uint8:
            raise InputError(f"{what}: expected dtype uint8, got {images.dtype}")
        if images.ndim != 4 or images.shape[1:] != (r, r, 3):
            raise InputError(f"{what}: expected shape (N, {r}, {r}, 3) for this model, got {images.shape}")
        if images.shape[0] == 0:
            raise InputError(f"{what}: empty batch")
        return images

    def _check_keys(self, keys, n: int) -> list[bytes]:
        if isinstance(keys, (bytes, bytearray)) or len(keys) != n:
            raise InputError(f"keys: expected a list of {n} keys (one per image)")
        return [keystream.check_key(k, f"keys[{i}]") for i, k in enumerate(keys)]

    def _check_masks(self, masks, n: int) -> np.ndarray:
        """-> a copy: the records keep each mask, and a caller may reuse its buffer before it
        serializes them."""
        r = self.resolution
        if masks is None:
            return np.ones((n, r, r), dtype=bool)
        masks = np.array(masks)
        if masks.dtype != np.bool_ or masks.shape != (n, r, r):
            raise InputError(f"masks: expected bool array of shape ({n}, {r}, {r}), got {masks.dtype} {masks.shape}")
        return masks

    # -- the two operations ---------------------------------------------------------------------
    def secret_signs(self, mask: np.ndarray) -> int:
        """How many independent key signs an (R, R) mask gets: its sign cells (v1: masked latent values)."""
        c, h, w = self._latent_shape()
        m = latent_cells(mask, h)
        if self.sign_cell == 0:
            return int(m.sum()) * c
        g = -(-h // self.sign_cell) * self.sign_cell
        padded = np.zeros((g, g), bool)
        padded[:h, :w] = m
        return int(latent_cells(padded, g // self.sign_cell).sum())

    def _latent_shape(self) -> tuple[int, ...]:
        return getattr(self.backend, "latent_shape", None) or (3, self.resolution, self.resolution)

    def _signs(self, keys: list[bytes], shape: tuple[int, ...], cell: int) -> torch.Tensor:
        s = np.stack([keystream.cell_signs(k, shape, cell) for k in keys])
        return torch.from_numpy(s).to(self.backend.device)

    def _run(self, x: np.ndarray, keys: list[bytes], masks: np.ndarray, overflow: np.ndarray, made: _Made,
             carry: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """transform in batches of exactly `batch` images -> (float levels (N, R, R, 3), unrounded;
        for a latent model when anonymizing, the restore records' carries (N, C, h, w) float16).

        Why a fixed batch: convolution kernels pick algorithms by shape, so one image's floats
        differ (~1e-6) between batch sizes, enough to flip a rounded pixel now and then. With every
        model call at the same shape (the last chunk padded with copies), an image's result does not
        depend on which records shared its batch, so restoring one record reproduces exactly what
        anonymizing it in a batch of many computed, and lossless restore stays bit-exact."""
        dev, dt = self.backend.device, self.backend.dtype
        latent = hasattr(self.backend, "carry")
        batch, cell = made.batch, made.sign_cell
        smp = _scheme_sampler(self.sampler, cell, made.background)
        n, out, carries = len(x), [], []
        centre = None if not made.face_mean else torch.tensor(  # every chunk has `batch` images
            [[v / FACE_MEAN_UNIT for v in made.face_mean]] * batch, dtype=torch.float64).to(dev, dt)
        for i in range(0, n, batch):
            idx = np.minimum(np.arange(i, i + batch), n - 1)  # pad with copies of the last image
            levels = torch.from_numpy(x[idx].astype(np.float64) + overflow[idx]).permute(0, 3, 1, 2)
            xt = (levels / 127.5 - 1).to(dev, dt)
            m = torch.from_numpy(masks[idx]).to(dev)
            signs = self._signs([keys[j] for j in idx], self._latent_shape(), cell)
            c = None if carry is None else torch.from_numpy(carry[idx].astype(np.float32)).to(dev)
            y, z = scheme.transform(self.backend, xt, m, signs, smp, carry=c, centre=centre)
            keep = min(batch, n - i)
            y_levels = (y.double() + 1) * 127.5
            # NaN passes every range check (NaN > x is False) and casts to 0: never store or restore it
            if not bool(torch.isfinite(y_levels[:keep]).all()):
                raise _non_finite()
            out.append(y_levels[:keep].permute(0, 2, 3, 1).cpu().numpy())
            if latent and carry is None:  # what restore will see: rounded levels inside the mask, input outside
                seen = torch.where(m[:, None], torch.round(y_levels), levels.to(y_levels.device, y_levels.dtype))
                carries.append(self.backend.carry(z, (seen / 127.5 - 1).to(dev, dt), m)[:keep].cpu().numpy())
                if not np.isfinite(carries[-1]).all():
                    raise _non_finite()
        return np.concatenate(out), (np.concatenate(carries) if carries else None)

    def anonymize(self, images, keys, masks=None, lossless: bool = False, floor_db: float | None = None):
        """-> (anonymized uint8 (N, R, R, 3), [RestoreRecord]). Pixels outside the masks are the input's.

        floor_db (key-only records): a record whose key-only restore would come back below this
        PSNR over its mask keeps the lossless residual anyway. Key-only restore is not uniformly
        good (one of 16 CelebA faces at 26.5 dB on an early embedded prior, most faces below 15 dB on a
        sharper one, benchmarks/README.md), and a record the owner cannot restore is lost; the
        check costs one restore pass, as lossless mode does."""
        images = self._check_images(images, "images")
        n = len(images)
        keys = self._check_keys(keys, n)
        masks = self._check_masks(masks, n)
        for i, m in enumerate(masks):
            if (k := self.secret_signs(m)) < MIN_SECRET_SIGNS:
                raise InputError(
                    f"masks[{i}]: the face mask gets {k} secret signs, fewer than {MIN_SECRET_SIGNS}: too small to "
                    f"hide a face (an empty mask would publish the input); use a larger mask"
                    + (" or a smaller sign_cell" if self.sign_cell > 1 else "")
                )
        made = _Made(self.batch_size, self.sign_cell, self.background, self.face_mean or ())
        levels, carries = self._run(images, keys, masks, np.zeros(images.shape, np.int16), made)
        levels = np.round(levels)
        m3 = masks[..., None]
        stored = np.where(m3, np.clip(levels, 0, 255), images).astype(np.uint8)
        overflow = np.where(m3, levels - stored, 0)
        if np.abs(overflow).max(initial=0) > np.iinfo(np.int16).max:
            raise AnondataError("the model generated pixel values far out of range; it is not a usable face model")
        records = [
            RestoreRecord(
                model_sha256=self.backend.info["sha256"], resolution=self.resolution,
                steps=self.sampler.steps, inversion_iters=self.sampler.inversion_iters,
                dtype=self.dtype_name, batch=self.batch_size, mask=masks[i], overflow=overflow[i].astype(np.int16),
                carry=None if carries is None else carries[i], sign_cell=self.sign_cell,
                background=self.background, face_mean=self.face_mean,
            )
            for i in range(n)
        ]
        if lossless or floor_db is not None:
            restored = self._restore_levels(stored, keys, records)
            for i, rec in enumerate(records):
                if not lossless and masked_psnr(images[i], restored[i], masks[i]) >= floor_db:
                    continue
                rec.residual = images[i].astype(np.int16) - restored[i].astype(np.int16)
                rec.snap = (images[i][masks[i]] % 3).reshape(-1)
                rec.original_sha256 = sha256_image(images[i])
        return stored, records

    def _restore_levels(self, stored: np.ndarray, keys: list[bytes], records: list[RestoreRecord]) -> np.ndarray:
        out = np.empty_like(stored)
        for made in sorted({_Made.of(r) for r in records}):  # each at the batch shape and scheme it was made with
            sel = [i for i, r in enumerate(records) if _Made.of(r) == made]
            masks = np.stack([records[i].mask for i in sel])
            overflow = np.stack([records[i].overflow for i in sel])
            carry = None if records[sel[0]].carry is None else np.stack([records[i].carry for i in sel])
            levels = np.round(self._run(stored[sel], [keys[i] for i in sel], masks, overflow, made, carry)[0])
            out[sel] = np.where(masks[..., None], np.clip(levels, 0, 255), stored[sel])
        return out

    def restore(self, anonymized, keys, records, names: list[str] | None = None) -> np.ndarray:
        """-> restored uint8 (N, R, R, 3). A wrong key gives another face, not an error: keys cannot be checked.

        names: what errors call each crop (default "record i"); photo restore names the photo and
        face, since its crops of many photos share one call."""
        anonymized = self._check_images(anonymized, "anonymized")
        n = len(anonymized)
        keys = self._check_keys(keys, n)
        if len(records) != n:
            raise InputError(f"records: expected {n} restore records, got {len(records)}")
        label = (lambda i: names[i]) if names is not None else (lambda i: f"record {i}")  # noqa: E731
        parsed = []
        for i, r in enumerate(records):
            try:
                parsed.append(r if isinstance(r, RestoreRecord) else RestoreRecord.from_bytes(r, self.resolution))
            except (FormatError, InputError) as e:
                raise type(e)(f"{label(i)}: {e}") from None
            self._check_compatible(parsed[-1], label(i))
        records = parsed
        out = self._restore_levels(anonymized, keys, records)
        for i, rec in enumerate(records):
            if rec.residual is not None:
                exact = out[i].astype(np.int16) + rec.residual
                exact[rec.mask] = snap(exact[rec.mask].reshape(-1), rec.snap).reshape(-1, 3)
                if exact.min() < 0 or exact.max() > 255 or sha256_image(exact.astype(np.uint8)) != rec.original_sha256:
                    raise LosslessMismatch(
                        f"{label(i)}: lossless restore does not reproduce the original (hash mismatch): wrong key, "
                        "a changed image, or a different device/dtype than the one that anonymized it"
                    )
                out[i] = exact.astype(np.uint8)
        return out

    def check_model(self, sha256: str, what: str) -> None:
        """Refuse to restore `what` (made with weights `sha256`) with other weights; name the
        anondata version to install when they are an earlier embedded prior."""
        if sha256 != self.backend.info["sha256"]:
            earlier = EARLIER_EMBEDDED.get(sha256)
            hint = (f"; that is the embedded prior of anondata {earlier}: restore with pip install "
                    f"'anondata=={earlier}', or --model a copy of its models/embedded folder") if earlier else ""
            raise InputError(
                f"{what} was anonymized with model sha256 {sha256[:12]}…, this is "
                f"{self.backend.info['sha256'][:12]}… ({self.backend.info['name']}): restore with the same --model{hint}"
            )

    def _check_compatible(self, rec: RestoreRecord, what: str) -> None:
        self.check_model(rec.model_sha256, what)
        latent_shape = getattr(self.backend, "latent_shape", None)
        theirs = None if rec.carry is None else tuple(rec.carry.shape)
        if theirs != latent_shape:
            space = lambda shape: "pixel space" if shape is None else f"latent space {shape}"  # noqa: E731
            raise InputError(
                f"{what} was made in {space(theirs)}, this model works in {space(latent_shape)}: "
                "restore with the same --model"
            )
        mine = (self.resolution, self.sampler.steps, self.sampler.inversion_iters, self.dtype_name)
        theirs = (rec.resolution, rec.steps, rec.inversion_iters, rec.dtype)
        if mine != theirs:
            raise InputError(
                f"{what} needs resolution/steps/inversion_iters/dtype {theirs}, this anonymizer has {mine}: "
                "restore with the settings in the manifest"
            )
