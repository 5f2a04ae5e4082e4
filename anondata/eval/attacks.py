"""What an attacker without the right key gets: restores with wrong keys and with partly right signs.

Why at this level: a wrong key is not an error (keys cannot be checked), so "restore with a wrong
key" is just the core transform with another sign pattern. Two things stand in the way and are
removed here, for the evaluation only:
- lossless records hold a residual and the original's hash; restore refuses a wrong key on the
  hash, which is right for users but hides what the pixels would be. `key_only` drops them
  (photo record and every core record), leaving what the key alone restores.
- a partly right guess is not any key's keystream, so `GuessAnonymizer` swaps the sign pattern of
  each face key for the right one with a random (1 - p) share of the signs flipped: over a face
  region of n signs, about p*n agree with the true pattern. p = 0.5 is as good as a random key,
  p = 1 is the key-only restore. With sign cells (scheme v2) the secret is one sign per cell, so
  the guess flips cells, not elements.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..anonymizer import Anonymizer
from ..faces import key_only_record as key_only  # noqa: F401  (re-exported: the photo layer owns its record)
from ..keystream import cell_grid, check_key, expand_cells, signs


def flip_bits(key: bytes, k: int, rng: np.random.Generator) -> bytes:
    """`key` with `k` distinct random bits flipped."""
    key = check_key(key)
    bits = np.unpackbits(np.frombuffer(key, np.uint8))
    idx = rng.choice(bits.size, size=k, replace=False)
    bits[idx] ^= 1
    return np.packbits(bits).tobytes()


def random_key(rng: np.random.Generator) -> bytes:
    """A wrong key for the experiments (not a record key: those come from `secrets`)."""
    return rng.bytes(32)


class GuessAnonymizer(Anonymizer):
    """The same model and sampler as `anon`; every key's signs come out with a (1 - p) share flipped.

    The flipped positions are drawn from a generator seeded by (seed, sha256 of the key), so a
    face gets the same guess in every batch and run."""

    def __init__(self, anon: Anonymizer, p: float, seed: int = 0):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        super().__init__(anon.backend, anon.sampler, batch_size=anon.batch_size, sign_cell=anon.sign_cell,
                         background=anon.background, flip_centre=anon.flip_centre)
        self.p = p
        self.seed = seed

    def guess(self, key: bytes, shape: tuple[int, ...], cell: int = 0) -> np.ndarray:
        s = (signs(key, shape) if cell == 0 else cell_grid(key, shape, cell)).copy()
        n = s.size
        wrong = int(round((1.0 - self.p) * n))
        if wrong:
            h = int.from_bytes(hashlib.sha256(key).digest()[:8], "big")
            rng = np.random.default_rng([self.seed, h])
            flat = s.reshape(-1)
            flat[rng.choice(n, size=wrong, replace=False)] *= -1
        return s if cell == 0 else expand_cells(s, shape, cell)

    def _signs(self, keys, shape, cell):  # the core's one place where keys become signs
        import torch

        s = np.stack([self.guess(k, shape, cell) for k in keys])
        return torch.from_numpy(s).to(self.backend.device)


# -- reading sign cells off the public image (scheme v2) ---------------------------------------
def boundary_evidence(z: np.ndarray, cell: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, V): for each pair of neighbouring cells of a (C, h, w) latent, the sum over the shared
    boundary of products of the two facing values (H: left-right, (g, g-1); V: top-bottom, (g-1, g)).

    Why: the attacker inverts the public image and gets z_a = s * z with one unknown sign per cell.
    If the original's noise z is spatially correlated, a boundary product is positive more often
    when both cells have the same sign, so it votes on their relative sign."""
    _, h, w = z.shape
    gh, gw = -(-h // cell), -(-w // cell)
    H = np.zeros((gh, gw - 1))
    V = np.zeros((gh - 1, gw))
    rows = np.arange(h) // cell
    cols = np.arange(w) // cell
    for j in range(gw - 1):
        x = (j + 1) * cell
        np.add.at(H[:, j], rows, (z[:, :, x - 1] * z[:, :, x]).sum(0))
    for i in range(gh - 1):
        y = (i + 1) * cell
        np.add.at(V[i, :], cols, (z[:, y - 1, :] * z[:, y, :]).sum(0))
    return H, V


def signs_from_evidence(H: np.ndarray, V: np.ndarray) -> np.ndarray:
    """±1 cell grid that best agrees with the boundary votes, up to a global sign: the leading
    eigenvector of the vote matrix (a spectral relaxation of the Ising ground state)."""
    gh, gw = V.shape[0] + 1, H.shape[1] + 1
    W = np.zeros((gh * gw, gh * gw))
    idx = np.arange(gh * gw).reshape(gh, gw)
    W[idx[:, :-1].ravel(), idx[:, 1:].ravel()] = H.ravel()
    W[idx[:-1, :].ravel(), idx[1:, :].ravel()] = V.ravel()
    W = W + W.T
    vec = np.linalg.eigh(W)[1][:, -1]
    return np.where(vec >= 0, 1, -1).astype(np.int8).reshape(gh, gw)


def cells_right(guess: np.ndarray, true: np.ndarray) -> float:
    """Share of cells a guess gets right, up to the global sign the attack cannot fix."""
    return float(max((guess == true).mean(), (guess == -true).mean()))
