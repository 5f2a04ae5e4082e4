"""Why key-only restore fails on a sharper prior: error growth level by level through the inversion.

Restore inverts the anonymized image y level by level. This script knows the true trajectory (it
generated y from the flipped latent itself), so at each level it prints how far the inversion is
from the truth (relative error, median over faces) and how well that level's equation is solved
(forward residual ||generate_step(z_t) - z_s|| / ||z_s||). Two starts: y in float (no rounding) and
y rounded to uint8 as it is stored.

Reading it: a small forward residual with a growing error-to-truth means the inversion is solved
and the generation flow itself contracts: any error at the clean end (8-bit rounding, a
half-converged first level) is multiplied level after level, and no solver can undo that. A large
forward residual at one level means the solver failed there. `amplification` = error at z_T /
error at y for the uint8 start.

    python benchmarks/inversion_conditioning.py --model embedded --n 2
    python benchmarks/inversion_conditioning.py --model /path/to/snapshot --n 2 --iters 10
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from anondata import scheme
from anondata.backends import load_backend
from anondata.keystream import signs as key_signs
from anondata.testing import TINY32_DIR
from restore_fidelity import faces


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.median((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)))


def measure(model: str, n: int, steps: int, iters: int, dtype: torch.dtype, report=print,
            spacing: str = scheme.Sampler().spacing, seed: int = 0) -> dict:
    """-> {"rows": [per level: t, err_float, fwd_float, err_uint8], "rounding": error at y, "amplification"}."""
    be = load_backend(model, device="cpu", dtype=dtype)
    sampler = scheme.Sampler(steps, iters, spacing)
    levels = scheme._levels(be, sampler)
    x8, src = faces(be.resolution, n)
    x = torch.from_numpy(x8).permute(0, 3, 1, 2).to(dtype) / 127.5 - 1
    m = torch.ones_like(x, dtype=torch.bool)
    rng = np.random.default_rng(seed)  # fixed keys: how much rounding grows depends on the face and its key
    signs = torch.from_numpy(np.stack([key_signs(rng.bytes(32), tuple(x.shape[1:])) for _ in x])).to(dtype)
    bg = scheme.background_trajectory(be, x, m, sampler)

    truth = [None] * (len(levels) + 1)  # the generation trajectory of the anonymized image
    truth[-1] = signs * scheme.invert(be, x, m, bg, sampler)
    for k in range(len(levels), 0, -1):
        truth[k - 1] = scheme.generate_step(be, truth[k], *levels[k - 1], m, bg[k - 1])
    y_stored = torch.round((truth[0] + 1) * 127.5).clamp(0, 255) / 127.5 - 1

    report(f"faces={len(x)} ({src}) steps={steps} iters={iters} spacing={spacing} dtype={dtype} seed={seed}")
    report("| level | t | error to truth (float y) | forward residual (float y) | error to truth (uint8 y) |")
    report("|---|---|---|---|---|")
    rounding = rel(y_stored, truth[0])
    report(f"| 0 | clean | 0 | - | {rounding:.1e} |")
    rows, zf, zq = [], truth[0], y_stored
    for k, (t, s) in enumerate(levels, start=1):
        z_s = zf
        zf = scheme.invert_step(be, zf, t, s, m, bg[k], iters)
        zq = scheme.invert_step(be, zq, t, s, m, bg[k], iters)
        row = {"t": t, "err_float": rel(zf, truth[k]),
               "fwd_float": rel(scheme.generate_step(be, zf, t, s, m, bg[k - 1]), z_s), "err_uint8": rel(zq, truth[k])}
        rows.append(row)
        report(f"| {k} | {t} | {row['err_float']:.1e} | {row['fwd_float']:.1e} | {row['err_uint8']:.1e} |")
    amplification = rows[-1]["err_uint8"] / rounding
    report(f"amplification (uint8 start): {amplification:.0f}x")
    return {"rows": rows, "rounding": rounding, "amplification": amplification}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="embedded | tiny | a model folder")
    p.add_argument("--n", type=int, default=2, help="faces")
    p.add_argument("--steps", type=int, default=scheme.Sampler().steps)
    p.add_argument("--iters", type=int, default=scheme.Sampler().inversion_iters)
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--spacing", default=scheme.Sampler().spacing, choices=scheme.SPACINGS,
                   help="timesteps: leading (a sign per value, the default) or logsnr (sign cells)")
    p.add_argument("--seed", type=int, default=0, help="the faces' keys (fixed, so settings compare on the same keys)")
    a = p.parse_args(argv)
    print(f"model={a.model}")
    measure(str(TINY32_DIR) if a.model == "tiny" else a.model, a.n, a.steps, a.iters, getattr(torch, a.dtype),
            report=lambda line: print(line, flush=True), spacing=a.spacing, seed=a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
