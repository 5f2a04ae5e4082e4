"""Record keys and the sign keystream (schemes `anondata-signflip/1` and `/2`).

Why a keystream and not a seeded torch generator: the paper's helper seeds torch with at most
32 bits, so the sign pattern could be brute-forced. Here every record has its own 256-bit key
from `secrets`, and the ±1 signs are the bits of a ChaCha20 keystream under a subkey derived
with HKDF-SHA256, so the derivation is fixed, documented (docs/FORMAT.md) and has test vectors.

Derivation (v1):
    stream_key = HKDF-SHA256(ikm=record_key, salt=b"", info=b"anondata/signs/v1", L=32)
    stream     = ChaCha20(stream_key, nonce=16 zero bytes)  # RFC 7539 block counter starts at 0
    bit i      = (stream[i // 8] >> (i % 8)) & 1             # LSB first
    sign i     = +1 if bit i == 0 else -1
for i over the latent tensor (C, H, W) in C order. v2 (`cell_signs`, docs/SCHEME.md "Sign cells")
takes the same construction with info b"anondata/signs/v2" and one sign per cell x cell block of
the latent grid, shared by all channels. Per-face keys of a photo:
    face_key(record_key, j) = HKDF-SHA256(ikm=record_key, salt=b"", info=b"anondata/face/v1" || u32be(j), L=32)
"""

from __future__ import annotations

import math
import secrets

import numpy as np

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import InputError

KEY_BYTES = 32
SIGNS_INFO = b"anondata/signs/v1"
SIGNS_INFO_V2 = b"anondata/signs/v2"
FACE_INFO = b"anondata/face/v1"


def new_key() -> bytes:
    """A fresh 256-bit record key from the OS CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


def check_key(key: object, what: str = "key") -> bytes:
    if not isinstance(key, (bytes, bytearray)):
        raise InputError(f"{what}: expected {KEY_BYTES} bytes, got {type(key).__name__}")
    if len(key) != KEY_BYTES:
        raise InputError(f"{what}: expected {KEY_BYTES} bytes, got {len(key)}")
    return bytes(key)


def _hkdf(key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(key)


def face_key(record_key: bytes, index: int) -> bytes:
    """The key of face `index` of a photo: independent sign patterns per face from one record key."""
    check_key(record_key, "record key")
    if not 0 <= index < 2**32:
        raise InputError(f"face index {index} out of range")
    return _hkdf(record_key, FACE_INFO + index.to_bytes(4, "big"))


def keystream(key: bytes, nbytes: int, info: bytes = SIGNS_INFO) -> bytes:
    """`nbytes` of the sign keystream of `key` (v1; v2 with info=SIGNS_INFO_V2)."""
    stream_key = _hkdf(check_key(key), info)
    enc = Cipher(algorithms.ChaCha20(stream_key, b"\x00" * 16), mode=None).encryptor()
    return enc.update(b"\x00" * nbytes)


def sign_bits(key: bytes, shape: tuple[int, ...], info: bytes = SIGNS_INFO) -> np.ndarray:
    """Bits (0/1, uint8) of the keystream for a tensor of `shape`, LSB first."""
    n = math.prod(shape)
    stream = np.frombuffer(keystream(key, (n + 7) // 8, info), dtype=np.uint8)
    return np.unpackbits(stream, bitorder="little")[:n].reshape(shape)


def signs(key: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """±1 (int8) of `shape`: +1 where the keystream bit is 0."""
    return (1 - 2 * sign_bits(key, shape).astype(np.int8)).astype(np.int8)


def cell_grid(key: bytes, shape: tuple[int, ...], cell: int) -> np.ndarray:
    """±1 (int8) of (ceil(H / cell), ceil(W / cell)): the v2 signs of a (C, H, W) latent, one per cell."""
    _, h, w = shape
    return (1 - 2 * sign_bits(key, (-(-h // cell), -(-w // cell)), SIGNS_INFO_V2).astype(np.int8)).astype(np.int8)


def expand_cells(grid: np.ndarray, shape: tuple[int, ...], cell: int) -> np.ndarray:
    """A cell grid of signs -> (C, H, W): every element takes its cell's sign, in every channel."""
    c, h, w = shape
    plane = grid.repeat(cell, axis=0).repeat(cell, axis=1)[:h, :w]
    return np.ascontiguousarray(np.broadcast_to(plane, (c, h, w)))


def cell_signs(key: bytes, shape: tuple[int, ...], cell: int) -> np.ndarray:
    """±1 (int8) of `shape` (C, H, W), v2: one sign per cell x cell block, the same in every channel.

    Why cells: a flip that keeps each block's pattern across channels and pixels up to one sign maps
    the directions the generation contracts (fine, chromatic detail) onto themselves, so the 8-bit
    rounding error that inversion blows up there stays where generation shrinks it again; per-element
    signs scatter it into coarse structure (docs/SCHEME.md, "Sign cells"). cell 0 is v1 (`signs`)."""
    if cell == 0:
        return signs(key, shape)
    return expand_cells(cell_grid(key, shape, cell), shape, cell)

