"""Record keys and the sign keystream (scheme version `anondata-signflip/1`).

Why a keystream and not a seeded torch generator: the paper's helper seeds torch with at most
32 bits, so the sign pattern could be brute-forced. Here every record has its own 256-bit key
from `secrets`, and the ±1 signs are the bits of a ChaCha20 keystream under a subkey derived
with HKDF-SHA256, so the derivation is fixed, documented (docs/FORMAT.md) and has test vectors.

Derivation (v1):
    stream_key = HKDF-SHA256(ikm=record_key, salt=b"", info=b"anondata/signs/v1", L=32)
    stream     = ChaCha20(stream_key, nonce=16 zero bytes)  # RFC 7539 block counter starts at 0
    bit i      = (stream[i // 8] >> (i % 8)) & 1             # LSB first
    sign i     = +1 if bit i == 0 else -1
for i over the latent tensor (C, H, W) in C order. Per-face keys of a photo:
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


def keystream(key: bytes, nbytes: int) -> bytes:
    """`nbytes` of the v1 sign keystream of `key`."""
    stream_key = _hkdf(check_key(key), SIGNS_INFO)
    enc = Cipher(algorithms.ChaCha20(stream_key, b"\x00" * 16), mode=None).encryptor()
    return enc.update(b"\x00" * nbytes)


def sign_bits(key: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Bits (0/1, uint8) of the keystream for a tensor of `shape`, LSB first."""
    n = math.prod(shape)
    stream = np.frombuffer(keystream(key, (n + 7) // 8), dtype=np.uint8)
    return np.unpackbits(stream, bitorder="little")[:n].reshape(shape)


def signs(key: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """±1 (int8) of `shape`: +1 where the keystream bit is 0."""
    return (1 - 2 * sign_bits(key, shape).astype(np.int8)).astype(np.int8)
