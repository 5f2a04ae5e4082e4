"""The scheme of Labarbarie, Itier & Puech (arXiv 2510.01031), made exact. All its math is here.

    anonymize(x) = G_b( flip_s( I_b(x) ) )        restore(y) = G_b( flip_s( I_b(y) ) )

- G_b, generation: deterministic DDIM (eta = 0, Song et al. 2021, eq. 12) from z_T to z_0. Inside
  the face mask the model generates; outside, every step takes the background trajectory b
  (paper, "background preservation"). So pixels outside the mask end where they began.
- I_b, inversion: the exact inverse of G_b. Each DDIM step is z_s = c1 * z_t + c2 * eps(z_t, t);
  plain DDIM inversion guesses eps(z_t) with eps(z_s) and drifts. We solve for z_t by fixed-point
  iteration z_t <- (z_s - c2 * eps(z_t, t)) / c1 inside the mask (`inversion_iters` times, with
  Anderson mixing), with z_t = b_t outside, which is what makes restore work. It also undoes the
  generation's contraction, so restore from 8 bits amplifies rounding by as much as the prior
  contracts (3x on a soft early prior, 16x on the shipped one, 59x on 0.1.0's: docs/SCHEME.md).
- flip_s: multiply the latent inside the mask by the ±1 signs of the record key (keystream.py;
  v3 reflects around c = sqrt(a_T) * the model's mean face instead of 0: `flip`;
  sign cells: one sign per cell, shared by the channels, so the flip keeps the fine detail that the
  contraction above lives in: docs/SCHEME.md, "Sign cells"). It is its own inverse, so restore
  is the same transform as anonymize.
- b, the background trajectory, from the image with the face region set to 0 (mid grey). It depends
  only on pixels outside the mask (and public constants), which anonymize leaves bit-identical, so
  anonymize and restore compute the same b from the original and from the anonymized image.
  "noised" (scheme v3, the default): b_k = sqrt(a_k) z + sqrt(1 - a_k) n, the forward process with
  one fixed public noise n (keystream.background_noise). "inverted" (v1, v2): plain DDIM inversion.
  Why v3 changed it: an inverted background is not what the model saw in training at level k (its
  error grows with the number of steps), and the face generated beside it overshoots: orange,
  oversaturated faces with 19-62% of pixels out of range at 10-50 steps, and key-only restore of an
  aligned face ~10 dB, against faces in range and ~28 dB with the noised path (docs/SCHEME.md,
  "The background path").

Timesteps (`timesteps`), generated from t_{N-1} down; the last step goes to the clean image (alpha = 1):
- "logsnr" (sign cells: v2, v3 with sign_cell >= 1): t_0 = 1 and t_{N-1} = floor((N-1) T / N) + 1, and in between the t whose
  log-SNR log(a_t / (1 - a_t)) is nearest to N points evenly spaced in log-SNR between those two
  (ties to the smaller t), made strictly increasing (up from t_0, then down from t_{N-1}). Evenly spaced levels make every step an
  equally small change for the model, so none is the large, ill-conditioned jump at the clean
  end that "leading" makes (docs/SCHEME.md, "Timesteps").
- "leading" (a sign per value: v1, v3 with sign_cell 0): t_k = floor(k * T / N) + 1 for k = 0..N-1 (DDIM "leading" spacing with offset 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import keystream

SPACINGS = ("logsnr", "leading")
BACKGROUNDS = ("noised", "inverted")


@dataclass(frozen=True)
class Sampler:
    # Defaults from benchmarks/restore_fidelity.py on the embedded prior of the time (step 3,177):
    # 10 steps x 4 Anderson iterations restore at 43.9 dB median through uint8 (benchmarks/README.md),
    # at 60 model calls per transform (10 x (1 + iters) + 10; 70 with v1's inverted background);
    # more steps cost time without a fidelity gain there (as on the shipped prior: 33.4 dB at 10 x 4,
    # 33.5 at 20 x 4, 16 faces). On the shipped prior more iterations help a little: on 64 faces
    # 32.5 dB at 10 x 4, 34.4 at 10 x 8 (100 calls), short of issue 5's 35 either way; releases
    # restore through the lossless residual, so 4 stays.
    steps: int = 10
    inversion_iters: int = 4
    spacing: str = "leading"  # the scheme fixes it: "leading" for a sign per value, "logsnr" for sign cells
    background: str = "noised"  # the scheme fixes it: v3 "noised" (the default), v1/v2 "inverted"

    def __post_init__(self):
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {self.spacing!r}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, got {self.background!r}")
        if not 1 <= self.steps <= 1000:
            raise ValueError(f"steps must be in 1..1000, got {self.steps}")
        if not 0 <= self.inversion_iters <= 100:
            raise ValueError(f"inversion_iters must be in 0..100, got {self.inversion_iters}")


def timesteps(alphas_cumprod: torch.Tensor, steps: int, spacing: str = "leading") -> list[int]:
    """Ascending t_0 < ... < t_{N-1} (module docstring)."""
    T = int(alphas_cumprod.shape[0])
    if steps > T - 1:
        raise ValueError(f"steps ({steps}) must be below the model's {T} training timesteps")
    leading = [k * T // steps + 1 for k in range(steps)]
    if spacing == "leading" or steps == 1:
        return leading
    a = alphas_cumprod.to("cpu", torch.float64)
    lam = torch.log(a / (1.0 - a))  # +inf where a is 1, -inf where it is 0
    lo, hi = float(lam[1]), float(lam[leading[-1]])
    targets = torch.tensor([lo + (hi - lo) * k / (steps - 1) for k in range(steps)], dtype=torch.float64)
    nearest = torch.argmin((lam[None, :] - targets[:, None]).abs(), dim=1).tolist()  # first index on a tie
    out = []
    for t in nearest:
        out.append(t if not out else max(t, out[-1] + 1))
    out[-1] = min(out[-1], leading[-1])  # many steps crowd the clean end: push back down from the top
    for k in range(steps - 2, -1, -1):
        out[k] = min(out[k], out[k + 1] - 1)
    return out


def _coefficients(alphas_cumprod: torch.Tensor, t: int, s: int | None) -> tuple[float, float]:
    """DDIM step t -> s (s=None: the clean image) as z_s = c1 * z_t + c2 * eps."""
    a_t = float(alphas_cumprod[t])
    a_s = 1.0 if s is None else float(alphas_cumprod[s])
    c1 = (a_s / a_t) ** 0.5
    c2 = (1 - a_s) ** 0.5 - (a_s * (1 - a_t) / a_t) ** 0.5
    return c1, c2


def _levels(backend, sampler: Sampler):
    """[(t, s)] for each step, from the clean end: level k+1 is t_k, level k is s."""
    ts = timesteps(backend.alphas_cumprod, sampler.steps, sampler.spacing)
    return [(t, ts[k - 1] if k else None) for k, t in enumerate(ts)]


def background_trajectory(backend, z0: torch.Tensor, mask: torch.Tensor, sampler: Sampler) -> list[torch.Tensor]:
    """b_0..b_N of z0 with the mask region zeroed (module docstring). Only b outside the mask is used."""
    z = torch.where(mask, torch.zeros_like(z0), z0)
    if sampler.background == "noised":
        n = torch.from_numpy(keystream.background_noise(tuple(z.shape[1:])).copy()).to(z.device, z.dtype)
        a = [float(backend.alphas_cumprod[t]) for t, _ in _levels(backend, sampler)]
        return [z] + [a_t**0.5 * z + (1 - a_t) ** 0.5 * n for a_t in a]
    traj = [z]
    for t, s in _levels(backend, sampler):
        c1, c2 = _coefficients(backend.alphas_cumprod, t, s)
        z = (z - c2 * backend.eps(z, t)) / c1
        traj.append(z)
    return traj


def invert_step(backend, z_s: torch.Tensor, t: int, s: int | None, mask: torch.Tensor, b_t: torch.Tensor,
                iters: int) -> torch.Tensor:
    """One level of I_b: the z_t that `generate_step` takes to z_s.

    Solves z = F(z) with F(z) = (z_s - c2 eps(z, t)) / c1 inside the mask, b_t outside. Iterations
    use Anderson mixing of depth 1 (Walker & Ni 2011; as in AIDI, Pan et al. 2023):
    z <- F(z) - g (F(z) - F(z_prev)), with g the per-image least-squares coefficient. On the tiny
    test model it reaches with 4 iterations the residual that plain iteration needs 8 for."""
    c1, c2 = _coefficients(backend.alphas_cumprod, t, s)

    def F(w):
        return torch.where(mask, (z_s - c2 * backend.eps(w, t)) / c1, b_t)

    z = F(z_s)  # plain DDIM inversion: the first guess
    f_prev = r_prev = None
    for _ in range(iters):
        f = F(z)
        r = f - z
        if r_prev is None:
            z = f
        else:
            dr = r - r_prev
            g = (r * dr).flatten(1).sum(1) / (dr * dr).flatten(1).sum(1).clamp_min(1e-30)
            z = f - g.view(-1, *[1] * (f.dim() - 1)) * (f - f_prev)
        f_prev, r_prev = f, r
    return z


def invert(backend, z0: torch.Tensor, mask: torch.Tensor, bg: list[torch.Tensor], sampler: Sampler) -> torch.Tensor:
    """I_b: z_0 -> z_T such that `generate(z_T)` gives back z_0 inside the mask."""
    z = z0
    for k, (t, s) in enumerate(_levels(backend, sampler), start=1):
        z = invert_step(backend, z, t, s, mask, bg[k], sampler.inversion_iters)
    return z


def generate_step(backend, z_t: torch.Tensor, t: int, s: int | None, mask: torch.Tensor, b_s: torch.Tensor) -> torch.Tensor:
    """One DDIM step t -> s inside the mask; the background trajectory outside."""
    c1, c2 = _coefficients(backend.alphas_cumprod, t, s)
    return torch.where(mask, c1 * z_t + c2 * backend.eps(z_t, t), b_s)


def generate(backend, z_T: torch.Tensor, mask: torch.Tensor, bg: list[torch.Tensor], sampler: Sampler) -> torch.Tensor:
    """G_b: deterministic DDIM from z_T, with the background trajectory outside the mask."""
    z = z_T
    levels = _levels(backend, sampler)
    for k in range(len(levels), 0, -1):
        t, s = levels[k - 1]
        z = generate_step(backend, z, t, s, mask, bg[k - 1])
    return z


def top_alpha(backend, sampler: Sampler) -> float:
    """a_T: the cumulative alpha at the top level, where generation starts."""
    return float(backend.alphas_cumprod[_levels(backend, sampler)[-1][0]])


def flip(backend, z_T: torch.Tensor, mask: torch.Tensor, signs: torch.Tensor, sampler: Sampler,
         centre: torch.Tensor | None = None) -> torch.Tensor:
    """flip_s inside the mask: c + s * (z_T - c), with c = sqrt(a_T) * centre per channel (0 without
    one), its own inverse for any fixed c.

    Why a centre: at the top level z_T still holds sqrt(a_T) times the face, and its channel means
    are how the model reads the face's colour there. Flipping around 0 averages those means away,
    so the model sees "no colour" and generates a grey face; around the mean face's colour it
    sees an average one (docs/SCHEME.md, "The flip's centre"). c is public and the same for every
    record of a model, so it tells nothing about the face."""
    if centre is None:
        return torch.where(mask, signs.to(z_T.dtype) * z_T, z_T)
    c = (top_alpha(backend, sampler) ** 0.5 * centre.to(z_T.device, z_T.dtype))[:, :, None, None]
    return torch.where(mask, c + signs.to(z_T.dtype) * (z_T - c), z_T)


def transform(backend, x: torch.Tensor, mask: torch.Tensor, signs: torch.Tensor, sampler: Sampler,
              carry: torch.Tensor | None = None, centre: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """G_b(flip_s(I_b(x))): anonymize with the record's signs, or restore with the same signs.

    x: (N, C, H, W) in [-1, 1] (float, may exceed the range when restoring carried overflow);
    mask: (N, H, W) bool; signs: (N, C', h, w) ±1 at latent shape; centre: (N, C') or None (`flip`).
    Returns (image, final latent z).
    A backend with `prepare` (latent models) supplies z0, the background latent (from pixels outside
    the mask only) and a copy of itself bound to the mask (ControlNet hint); restoring, `carry`
    (from the restore record) turns the stored image back into the latent that generated it.
    See backends.LatentBackend.
    """
    if hasattr(backend, "prepare"):  # latent backends: decoder inversion or carry, mask-bound conditioning
        backend, z0, z_bg = backend.prepare(x, mask, carry)
    else:
        z0 = z_bg = backend.encode(x)
    m = backend.latent_mask(mask).expand_as(z0)
    bg = background_trajectory(backend, z_bg, m, sampler)
    z_T = invert(backend, z0, m, bg, sampler)
    z = generate(backend, flip(backend, z_T, m, signs, sampler, centre), m, bg, sampler)
    return backend.decode(z), z
