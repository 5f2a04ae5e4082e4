"""Key-only restore under scheme variants that no record format holds: is there a cheaper route to 35 dB?

Restore on a sharp prior loses most at the clean end (`inversion_conditioning.py`: the jump
t = 101 -> 1 of "leading" timesteps). Two ways to spend less than `--inversion-iters 16` there,
each measured against the default on the same faces and keys as `restore_fidelity.py --mask
ellipse` (aligned CelebA faces, the job's face ellipse, keys from --seed):

- `logsnr`: log-SNR timesteps with a sign per value (scheme v3 fixes "leading" for a sign per value);
- `clean-end K x N`: N inversion iterations at the K levels nearest the clean image, the default
  elsewhere (records carry one iteration count).

Neither can be released: a record could not say it was made so. The script swaps
`anondata.scheme.invert` / the anonymizer's timestep choice for the length of one row, and puts
them back.

    python benchmarks/inversion_variants.py --n 16 --variants default,logsnr,clean-end:2x16
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from anondata import Anonymizer, anonymizer, scheme
from anondata.faces import aligned_mask
from restore_fidelity import SHARED, faces, psnr


@contextlib.contextmanager
def variant(name: str):
    """Run the anonymizer under one variant (module docstring)."""
    saved = scheme.invert, anonymizer._scheme_sampler
    if name == "logsnr":
        anonymizer._scheme_sampler = lambda s, cell, bg: replace(s, spacing="logsnr", background=bg)
    elif name.startswith("clean-end:"):
        k, n = (int(v) for v in name.split(":", 1)[1].split("x"))

        def invert(backend, z0, mask, bg, sampler):
            z = z0
            for level, (t, s) in enumerate(scheme._levels(backend, sampler), start=1):
                z = scheme.invert_step(backend, z, t, s, mask, bg[level], n if level <= k else sampler.inversion_iters)
            return z

        scheme.invert = invert
    elif name != "default":
        raise SystemExit(f"error: unknown variant {name!r}: default, logsnr or clean-end:KxN")
    try:
        yield
    finally:
        scheme.invert, anonymizer._scheme_sampler = saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded")
    p.add_argument("--n", type=int, default=16, help="faces")
    p.add_argument("--variants", default="default,logsnr,clean-end:2x16", help="comma-separated (module docstring)")
    p.add_argument("--seed", type=int, default=0, help="record keys, as restore_fidelity.py --seed")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    anon = Anonymizer.from_pretrained(a.model)  # the default sampler, 10 x 4
    x, src = faces(anon.resolution, a.n, SHARED)
    masks = np.broadcast_to(aligned_mask(anon.resolution), (len(x),) + (anon.resolution,) * 2)
    rng = np.random.default_rng(a.seed)
    keys = [rng.bytes(32) for _ in x]
    print(f"model={a.model} faces: {len(x)} from {src} threads={torch.get_num_threads()} seed={a.seed}")
    print("| variant | restore dB median | restore dB min | below 30 dB | s/img anonymize+restore |")
    print("|---|---|---|---|---|")
    for name in a.variants.split(","):
        with variant(name):
            t0 = time.perf_counter()
            y, recs = anon.anonymize(x, keys, masks)
            restored = anon.restore(y, keys, recs)
            secs = (time.perf_counter() - t0) / len(x)
        each = psnr(restored, x, masks)
        print(f"| {name} | {np.median(each):.1f} | {each.min():.1f} | {int((each < 30).sum())} | {secs:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
