"""Record keys, the sign keystream (schemes `anondata-signflip/1`, `/2`, `/3`), and the public
background noise of scheme v3.

Why a keystream and not a seeded torch generator: the paper's helper seeds torch with at most
32 bits, so the sign pattern could be brute-forced. Here every record has its own 256-bit key
from `secrets`, and the ±1 signs are the bits of a ChaCha20 keystream under a subkey derived
with HKDF-SHA256, so the derivation is fixed, documented (docs/SCHEME.md, "Keys and the sign
keystream") and has test vectors.

Derivation (v1):
    stream_key = HKDF-SHA256(ikm=record_key, salt=b"", info=b"anondata/signs/v1", L=32)
    stream     = ChaCha20(stream_key, nonce=16 zero bytes)  # RFC 7539 block counter starts at 0
    bit i      = (stream[i // 8] >> (i % 8)) & 1             # LSB first
    sign i     = +1 if bit i == 0 else -1
for i over the latent tensor (C, H, W) in C order. v2 (`cell_signs`, docs/SCHEME.md "Sign cells")
takes the same construction with info b"anondata/signs/v2" and one sign per cell x cell block of
the latent grid, shared by all channels. Per-face keys of a photo:
    face_key(record_key, j) = HKDF-SHA256(ikm=record_key, salt=b"", info=b"anondata/face/v1" || u32be(j), L=32)
v3 signs are v1's (cell 0) or v2's (cells); what v3 adds is `background_noise`: the same keystream
construction under the all-zero (public) key and info b"anondata/background/v3", turned into
standard normal values by Box-Muller (docs/SCHEME.md, "Keys and the sign keystream").
"""

from __future__ import annotations

import functools
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
BACKGROUND_INFO = b"anondata/background/v3"


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


@functools.lru_cache(maxsize=8)
def _background_noise(shape: tuple[int, ...]) -> np.ndarray:
    n = math.prod(shape)
    pairs = (n + 1) // 2
    u = np.frombuffer(keystream(bytes(KEY_BYTES), 8 * pairs, BACKGROUND_INFO), dtype="<u4").astype(np.float64)
    u = (u + 0.5) / 2.0**32  # in (0, 1): log(u1) is finite
    r = np.sqrt(-2.0 * np.log(u[0::2]))
    theta = 2.0 * np.pi * u[1::2]
    out = np.empty(2 * pairs, np.float64)
    out[0::2], out[1::2] = r * np.cos(theta), r * np.sin(theta)
    a = out[:n].astype(np.float32).reshape(shape)
    a.flags.writeable = False
    return a


def background_noise(shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 of `shape` (C, H, W), the same for every record (scheme v3).

    Public on purpose: the background path must be computable from what restore has (the
    background pixels and public constants), and a fixed noise keeps v3's threat model that of
    v1/v2, in which the background path is public too. Values, C order: u_k = (w_k + 0.5) / 2^32
    with w_k the k-th little-endian u32 of the stream; pair i is r cos(2 pi u_{2i+1}), r sin(...)
    with r = sqrt(-2 ln u_{2i}); computed in float64, rounded to float32. Read-only, cached."""
    if not shape or any(type(d) is not int or d < 1 for d in shape):
        raise InputError(f"background noise: shape must be positive integers, got {shape!r}")
    return _background_noise(tuple(shape))
