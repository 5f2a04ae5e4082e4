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
  p = 1 is the key-only restore.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..anonymizer import Anonymizer
from ..faces import key_only_record as key_only  # noqa: F401  (re-exported: the photo layer owns its record)
from ..keystream import check_key, signs


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
        super().__init__(anon.backend, anon.sampler, batch_size=anon.batch_size)
        self.p = p
        self.seed = seed

    def guess(self, key: bytes, shape: tuple[int, ...]) -> np.ndarray:
        s = signs(key, shape).copy()
        n = s.size
        wrong = int(round((1.0 - self.p) * n))
        if wrong:
            h = int.from_bytes(hashlib.sha256(key).digest()[:8], "big")
            rng = np.random.default_rng([self.seed, h])
            flat = s.reshape(-1)
            flat[rng.choice(n, size=wrong, replace=False)] *= -1
        return s

    def _signs(self, keys, shape):  # the core's one place where keys become signs
        import torch

        s = np.stack([self.guess(k, shape) for k in keys])
        return torch.from_numpy(s).to(self.backend.device)
