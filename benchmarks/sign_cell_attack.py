"""Sign cells (scheme v2) against scheme v1: restore fidelity, identity change, and the attack
that coarse cells open, on the same faces in one run.

Per sign cell (0 = v1, one sign per value): key-only restore PSNR through uint8; dlib identity
distance original <-> anonymized; and the best an attacker with the public image does:
- the boundary attack (anondata/eval/attacks.py): invert the stored image, vote on the relative
  signs of neighbouring cells from the products across their boundary, solve for the grid. Its
  restores are scored with an oracle (the better of the two global signs, the smaller identity
  distance to the original), so the figure is an upper bound of what the attack gets;
- for scale, the same oracle over 4 random keys.
dlib distances: 128-d ResNet embedding of the 4x bicubic upscale, HOG box or the centre; >= 0.6
is another person by dlib's threshold.

    python benchmarks/sign_cell_attack.py --model embedded --n 16 --cells 0,4
    python benchmarks/sign_cell_attack.py --model tiny --n 2 --cells 0,2     # a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from restore_fidelity import SHARED, faces, psnr  # noqa: E402

from anondata import Anonymizer, scheme  # noqa: E402
from anondata.eval import attacks, identity  # noqa: E402
from anondata.keystream import cell_grid, expand_cells, new_key  # noqa: E402
from anondata.testing import TINY32_DIR  # noqa: E402


def embedding(img: np.ndarray) -> np.ndarray:
    up = np.asarray(Image.fromarray(img).resize((img.shape[1] * 4, img.shape[0] * 4), Image.BICUBIC))
    s = up.shape[0]
    box, _ = identity.face_box(up, fallback=(s // 8, s // 8, s - s // 8, s - s // 8))
    return identity.embed(up, box)


def distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(embedding(a) - embedding(b)))


def invert_stored(anon: Anonymizer, img: np.ndarray) -> np.ndarray:
    """What the attacker computes: z_T of a stored image (whole crop as the mask, pixel models)."""
    be, smp = anon.backend, anon.sampler
    x = (torch.from_numpy(img.astype(np.float64)).permute(0, 3, 1, 2) / 127.5 - 1).to(be.device, be.dtype)
    m = torch.ones_like(x, dtype=torch.bool)
    bg = scheme.background_trajectory(be, x, m, smp)  # anon.sampler: spacing of anon's scheme
    return scheme.invert(be, x, m, bg, smp).double().cpu().numpy()


def restore_with_grid(anon: Anonymizer, stored, rec, grid: np.ndarray) -> np.ndarray:
    """Restore one record with the attacker's cell grid in place of the key's."""
    cell = anon.sign_cell
    anon._signs = lambda keys, shape, _cell: torch.from_numpy(expand_cells(grid, shape, cell)[None].copy())
    try:
        return anon.restore(stored, [bytes(32)], [rec])[0]
    finally:
        del anon._signs


def lag1(z: np.ndarray) -> float:
    p = (z * z).mean()
    return float(((z[..., :, 1:] * z[..., :, :-1]).mean() + (z[..., 1:, :] * z[..., :-1, :]).mean()) / (2 * p))


def measure(model: str, cell: int, x: np.ndarray, seed: int) -> dict:
    anon = Anonymizer.from_pretrained(model, sign_cell=cell)
    if hasattr(anon.backend, "latent_shape"):
        raise SystemExit("sign_cell_attack.py measures pixel models only")
    rng = np.random.default_rng(seed)
    keys = [rng.bytes(32) for _ in x]  # fixed per seed, so cells compare on the same keys
    stored, recs = anon.anonymize(x, keys)
    restored = anon.restore(stored, keys, recs)
    row = {
        "sign_cell": cell,
        "restore_db": [round(float(v), 2) for v in psnr(restored, x)],
        "anon_distance": [round(distance(a, b), 3) for a, b in zip(x, stored)],
        "random_best_of_4_distance": [],
    }
    for i in range(len(x)):
        outs = anon.restore(np.repeat(stored[i : i + 1], 4, 0), [new_key() for _ in range(4)], [recs[i]] * 4)
        row["random_best_of_4_distance"].append(round(min(distance(x[i], o) for o in outs), 3))
    if cell:
        za = invert_stored(anon, stored)
        row["z_neighbour_correlation"] = round(lag1(za), 3)
        row["attack_cells_right"], row["attack_best_distance"], row["attack_best_db"] = [], [], []
        for i in range(len(x)):
            guess = attacks.signs_from_evidence(*attacks.boundary_evidence(za[i], cell))
            true = cell_grid(keys[i], za[i].shape, cell)
            row["attack_cells_right"].append(round(attacks.cells_right(guess, true), 3))
            outs = [restore_with_grid(anon, stored[i : i + 1], recs[i], g) for g in (guess, -guess)]
            row["attack_best_distance"].append(round(min(distance(x[i], o) for o in outs), 3))
            row["attack_best_db"].append(round(float(max(psnr(o[None], x[i : i + 1])[0] for o in outs)), 2))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="embedded | tiny | a model folder")
    p.add_argument("--n", type=int, default=16, help="faces")
    p.add_argument("--cells", default="0,4", help="sign cells to compare (0 = scheme v1)")
    p.add_argument("--faces", type=Path, default=SHARED, help="Parquet of aligned CelebA photos (column image)")
    p.add_argument("--seed", type=int, default=0, help="record keys (the same for every cell)")
    p.add_argument("--json", help="write the rows here too")
    a = p.parse_args(argv)
    model = str(TINY32_DIR) if a.model == "tiny" else a.model
    res = Anonymizer.from_pretrained(model).resolution
    x, src = faces(res, a.n, a.faces)
    print(f"model={a.model} faces: {len(x)} from {src}, {res}px, torch={torch.__version__}")
    print("| sign cell | restore dB median / min | anonymized: distance median, beyond 0.6 | best of 4 random keys: "
          "distance median / min | z_T neighbour corr. | attack: cells right median / max | attack (oracle): "
          "distance median / min, beyond 0.6 | attack: restore dB median / max |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for cell in (int(c) for c in a.cells.split(",")):
        r = measure(model, cell, x, a.seed)
        rows.append(r)
        med = lambda k: float(np.median(r[k]))  # noqa: E731
        beyond = lambda k: f"{sum(d >= 0.6 for d in r[k])}/{len(r[k])}"  # noqa: E731
        line = (f"| {cell or '0 (v1)'} | {med('restore_db'):.1f} / {min(r['restore_db']):.1f} | "
                f"{med('anon_distance'):.3f}, {beyond('anon_distance')} | "
                f"{med('random_best_of_4_distance'):.3f} / {min(r['random_best_of_4_distance']):.3f} | ")
        if cell:
            line += (f"{r['z_neighbour_correlation']:.3f} | {med('attack_cells_right'):.3f} / "
                     f"{max(r['attack_cells_right']):.3f} | {med('attack_best_distance'):.3f} / "
                     f"{min(r['attack_best_distance']):.3f}, {beyond('attack_best_distance')} | "
                     f"{med('attack_best_db'):.1f} / {max(r['attack_best_db']):.1f} |")
        else:
            line += "n/a | n/a | n/a | n/a |"
        print(line, flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "n": len(x), "seed": a.seed, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
