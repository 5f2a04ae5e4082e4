"""Identities (NAME.key) and recipients (NAME.pub): who may open envelopes and who signs.

An identity bundles an HPKE private key (X25519, or the ML-KEM-768 + X25519 hybrid) with an
Ed25519 signing key, so one file lets its holder both restore records and sign releases.
Both files are canonical JSON (docs/FORMAT.md, "Identity files"); parsing is strict because a
key file that is silently misread would seal a dataset to nobody.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519

from . import canonical
from .errors import FormatError, IntegrityError, KeyError_
from .files import fsync_dir, make_dirs, read_bounded, temp_for

IDENTITY_FORMAT = "anondata-identity"
RECIPIENT_FORMAT = "anondata-recipient"
VERSION = 1

KEM_X25519 = "X25519"
KEM_HYBRID = "MLKEM768-X25519"

# Raw key lengths per KEM: (secret, public, HPKE enc).
_MLKEM_SEED, _MLKEM_PUB = 64, 1184
KEM_SIZES = {
    KEM_X25519: (32, 32, 32),
    KEM_HYBRID: (_MLKEM_SEED + 32, _MLKEM_PUB + 32, 1088 + 32),
}
_HPKE_KEM = {KEM_X25519: hpke.KEM.X25519, KEM_HYBRID: hpke.KEM.MLKEM768_X25519}

MAX_KEY_FILE = 64 * 1024
_NAME_RE = re.compile(r"^[^\x00-\x1f\x7f]{0,128}\Z")

# Degenerate public keys, refused at load (docs/FORMAT.md, "Identity files"); the blocklists are
# libsodium's (ge25519_has_small_order, and has_small_order for X25519).
_P25519 = 2**255 - 19
_ORDER8_Y = ("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
             "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")
_ORDER8_U = ("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
             "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157")
# Ed25519: y of the 8 points of order 1, 2, 4, 8 (bit 255, the sign of x, is ignored). An
# Ed25519 key of small order verifies forged signatures.
_SMALL_ORDER_Y = frozenset([0, 1, _P25519 - 1] + [int.from_bytes(bytes.fromhex(h), "little") for h in _ORDER8_Y])
# X25519: u of order 1, 2, 4, 8 on the curve or its twist (p and p + 1 fail the range check).
# A low-order key makes the HPKE shared secret one that everybody knows.
_LOW_ORDER_U = frozenset([0, 1, _P25519 - 1] + [int.from_bytes(bytes.fromhex(h), "little") for h in _ORDER8_U])


def _degenerate_public_key(kem_public: bytes, sign_public: bytes) -> str | None:
    """Which public key is a degenerate encoding, or None (constant blocklists and ranges)."""
    y = int.from_bytes(sign_public, "little") & ((1 << 255) - 1)
    if y >= _P25519 or y in _SMALL_ORDER_Y:
        return "sign_public is not a valid public key (a small-order or non-canonical Ed25519 point)"
    u = int.from_bytes(kem_public[-32:], "little")  # the X25519 part of both KEMs
    if u >= _P25519 or u in _LOW_ORDER_U:  # u >= p includes every value with bit 255 set
        return "kem_public is not a valid public key (an X25519 value of low order, >= 2^255-19 or with bit 255 set)"
    return None


def _load_kem_private(kem: str, raw: bytes):
    if kem == KEM_X25519:
        return x25519.X25519PrivateKey.from_private_bytes(raw)
    ml = mlkem.MLKEM768PrivateKey.from_seed_bytes(raw[:_MLKEM_SEED])
    xk = x25519.X25519PrivateKey.from_private_bytes(raw[_MLKEM_SEED:])
    return hpke.MLKEM768X25519PrivateKey(ml, xk)


def _load_kem_public(kem: str, raw: bytes):
    if kem == KEM_X25519:
        return x25519.X25519PublicKey.from_public_bytes(raw)
    ml = mlkem.MLKEM768PublicKey.from_public_bytes(raw[:_MLKEM_PUB])
    xk = x25519.X25519PublicKey.from_public_bytes(raw[_MLKEM_PUB:])
    return hpke.MLKEM768X25519PublicKey(ml, xk)


def _kem_public_bytes(kem: str, secret: bytes) -> bytes:
    if kem == KEM_X25519:
        return x25519.X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes_raw()
    ml = mlkem.MLKEM768PrivateKey.from_seed_bytes(secret[:_MLKEM_SEED])
    xk = x25519.X25519PrivateKey.from_private_bytes(secret[_MLKEM_SEED:])
    return ml.public_key().public_bytes_raw() + xk.public_key().public_bytes_raw()


def hpke_suite(kem: str) -> hpke.Suite:
    """The one HPKE suite per KEM that format version 1 allows."""
    return hpke.Suite(_HPKE_KEM[kem], hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)


@dataclass(frozen=True, eq=False)
class Recipient:
    """Public half: seal envelopes to it, check its signatures. Equality is by key, not name."""

    kem: str
    kem_public: bytes
    sign_public: bytes
    name: str = ""
    fingerprint: str = field(init=False)

    def __post_init__(self):
        _check_name(self.name, "recipient")
        if self.kem not in KEM_SIZES:
            raise FormatError(f"recipient {self.name!r}: unknown kem {self.kem!r}")
        if len(self.kem_public) != KEM_SIZES[self.kem][1] or len(self.sign_public) != 32:
            raise FormatError(f"recipient {self.name!r}: key has the wrong length")
        bad = _degenerate_public_key(self.kem_public, self.sign_public)
        if bad:
            raise FormatError(f"recipient {self.name!r}: {bad}")
        try:
            object.__setattr__(self, "_hpke_public", _load_kem_public(self.kem, self.kem_public))
            object.__setattr__(
                self, "_verify_key", ed25519.Ed25519PublicKey.from_public_bytes(self.sign_public)
            )
        except ValueError as e:
            raise FormatError(f"recipient {self.name!r}: invalid public key ({e})") from None
        body = {
            "format": RECIPIENT_FORMAT,
            "kem": self.kem,
            "kem_public": canonical.b64e(self.kem_public),
            "sign_public": canonical.b64e(self.sign_public),
            "version": VERSION,
        }
        fp = hashlib.sha256(canonical.dumps(body)).hexdigest()[:32]
        object.__setattr__(self, "fingerprint", fp)

    def __eq__(self, other):
        return isinstance(other, Recipient) and other.fingerprint == self.fingerprint

    def __hash__(self):
        return hash(self.fingerprint)

    def __repr__(self):
        return f"Recipient({self.name!r}, {self.kem}, {self.fingerprint})"

    @property
    def label(self) -> str:
        """For messages: name and fingerprint."""
        return f"{self.name} ({self.fingerprint})" if self.name else self.fingerprint

    @property
    def hpke_public(self):
        return self._hpke_public

    def verify(self, signature: bytes, data: bytes, what: str) -> None:
        """Raise IntegrityError unless `signature` is this key's Ed25519 signature of `data`."""
        if not isinstance(signature, bytes) or len(signature) != 64:
            got = f"{len(signature)} bytes" if isinstance(signature, bytes) else type(signature).__name__
            raise IntegrityError(f"{what}: signature must be 64 bytes, got {got}")
        try:
            self._verify_key.verify(signature, data)
        except InvalidSignature:
            raise IntegrityError(
                f"{what}: Ed25519 signature does not verify for signer {self.label}"
            ) from None

    def to_json(self) -> dict:
        return {
            "format": RECIPIENT_FORMAT,
            "kem": self.kem,
            "kem_public": canonical.b64e(self.kem_public),
            "name": self.name,
            "sign_public": canonical.b64e(self.sign_public),
            "version": VERSION,
        }

    def to_bytes(self) -> bytes:
        return canonical.dumps(self.to_json()) + b"\n"

    @classmethod
    def from_json(cls, obj, what: str = "recipient") -> Recipient:
        _require_keys(obj, {"format", "kem", "kem_public", "name", "sign_public", "version"}, what)
        if obj["format"] != RECIPIENT_FORMAT:
            raise FormatError(f"{what}: format is {obj['format']!r:.40}, expected {RECIPIENT_FORMAT!r}")
        _check_version(obj["version"], what)
        if not isinstance(obj["kem"], str) or not isinstance(obj["name"], str):
            raise FormatError(f"{what}: kem and name must be strings")
        kem_public = canonical.b64d(obj["kem_public"], f"{what}.kem_public")
        sign_public = canonical.b64d(obj["sign_public"], f"{what}.sign_public")
        try:
            return cls(kem=obj["kem"], kem_public=kem_public, sign_public=sign_public, name=obj["name"])
        except FormatError as e:  # name the file, not only the key's label
            raise FormatError(f"{what}: {e}") from None

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "recipient") -> Recipient:
        return cls.from_json(_parse_file(data, what), what)


class Identity:
    """Private half. Never printed, never written except by `save` (mode 0600)."""

    def __init__(self, kem: str, kem_secret: bytes, sign_secret: bytes, name: str = ""):
        _check_name(name, "identity")
        if kem not in KEM_SIZES:
            raise FormatError(f"identity {name!r}: unknown kem {kem!r}")
        if len(kem_secret) != KEM_SIZES[kem][0] or len(sign_secret) != 32:
            raise FormatError(f"identity {name!r}: key has the wrong length")
        try:
            self._kem_private = _load_kem_private(kem, kem_secret)
            self._sign_key = ed25519.Ed25519PrivateKey.from_private_bytes(sign_secret)
            kem_public = _kem_public_bytes(kem, kem_secret)
        except ValueError as e:
            raise FormatError(f"identity {name!r}: invalid private key ({e})") from None
        self.kem = kem
        self.name = name
        self._kem_secret = bytes(kem_secret)
        self._sign_secret = bytes(sign_secret)
        self.recipient = Recipient(
            kem=kem,
            kem_public=kem_public,
            sign_public=self._sign_key.public_key().public_bytes_raw(),
            name=name,
        )

    def __repr__(self):  # never the secrets
        return f"Identity({self.name!r}, {self.kem}, {self.recipient.fingerprint})"

    @property
    def fingerprint(self) -> str:
        return self.recipient.fingerprint

    @property
    def hpke_private(self):
        return self._kem_private

    def sign(self, data: bytes) -> bytes:
        return self._sign_key.sign(data)

    def to_bytes(self) -> bytes:
        return (
            canonical.dumps(
                {
                    "format": IDENTITY_FORMAT,
                    "kem": self.kem,
                    "kem_secret": canonical.b64e(self._kem_secret),
                    "name": self.name,
                    "sign_secret": canonical.b64e(self._sign_secret),
                    "version": VERSION,
                }
            )
            + b"\n"
        )

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "identity") -> Identity:
        obj = _parse_file(data, what)
        if isinstance(obj, dict) and obj.get("format") == RECIPIENT_FORMAT:
            raise FormatError(f"{what}: this is a public key (.pub): pass the identity (.key) file")
        _require_keys(obj, {"format", "kem", "kem_secret", "name", "sign_secret", "version"}, what)
        if obj["format"] != IDENTITY_FORMAT:
            raise FormatError(f"{what}: format is {obj['format']!r:.40}, expected {IDENTITY_FORMAT!r}")
        _check_version(obj["version"], what)
        if not isinstance(obj["kem"], str) or not isinstance(obj["name"], str):
            raise FormatError(f"{what}: kem and name must be strings")
        kem_secret = canonical.b64d(obj["kem_secret"], f"{what}.kem_secret")
        sign_secret = canonical.b64d(obj["sign_secret"], f"{what}.sign_secret")
        try:
            return cls(obj["kem"], kem_secret, sign_secret, obj["name"])
        except FormatError as e:  # name the file, not only the key's label (as Recipient.from_json)
            raise FormatError(f"{what}: {e}") from None

    def save(self, key_path, pub_path) -> None:
        """Write NAME.key (0600) and NAME.pub; refuse to overwrite either."""
        key_path, pub_path = Path(key_path), Path(pub_path)
        for p in (key_path, pub_path):
            if p.exists() or p.is_symlink():
                raise KeyError_(f"{p} already exists: refusing to overwrite a key; pick another name")
        _write_new(key_path, self.to_bytes(), 0o600)
        try:
            _write_new(pub_path, self.recipient.to_bytes(), 0o644)
        except BaseException:
            key_path.unlink(missing_ok=True)
            raise


def generate_identity(pq: bool = False, name: str = "") -> Identity:
    """Fresh keys from the OS CSPRNG. `pq`: ML-KEM-768 + X25519 hybrid KEM."""
    if pq:
        kem_secret = secrets.token_bytes(_MLKEM_SEED) + x25519.X25519PrivateKey.generate().private_bytes_raw()
        return Identity(KEM_HYBRID, kem_secret, secrets.token_bytes(32), name)
    return Identity(KEM_X25519, x25519.X25519PrivateKey.generate().private_bytes_raw(), secrets.token_bytes(32), name)


def load_identity(path) -> Identity:
    """Read NAME.key. Refuses a file whose mode grants group/others any permission (like ssh): a
    leaked key opens everything."""
    path = Path(path)
    data = read_bounded(path, "identity", MAX_KEY_FILE, KeyError_)
    try:
        ident = Identity.from_bytes(data, str(path))
    except FormatError as e:
        raise KeyError_(f"not a usable identity file: {e}") from None
    if os.name == "posix":
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            raise KeyError_(
                f"{path}: key file is accessible by group/others (mode {mode:o}); run `chmod 600 {path}`"
            )
    return ident


def load_recipient(path) -> Recipient:
    """Read NAME.pub (a NAME.key is refused: pass public keys around, not secrets)."""
    path = Path(path)
    data = read_bounded(path, "recipient", MAX_KEY_FILE, KeyError_)
    try:
        return Recipient.from_bytes(data, str(path))
    except FormatError as e:
        hint = ""
        if b'"anondata-identity"' in data:
            hint = " (this is a private .key file: pass the .pub file)"
        raise KeyError_(f"not a usable public key file: {e}{hint}") from None


# ---- helpers -----------------------------------------------------------------


def _check_name(name, what):
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise FormatError(f"{what}: name must be at most 128 characters without control characters")


def _check_version(v, what):
    if type(v) is not int or v != VERSION:
        raise FormatError(f"{what}: unsupported version {v!r:.20} (this anondata reads version {VERSION})")


def _require_keys(obj, keys: set, what: str) -> None:
    if not isinstance(obj, dict):
        raise FormatError(f"{what}: expected a JSON object")
    missing, extra = keys - obj.keys(), obj.keys() - keys
    if missing:
        raise FormatError(f"{what}: missing field(s) {', '.join(sorted(missing))}")
    if extra:
        raise FormatError(f"{what}: unknown field(s) {', '.join(sorted(extra))}")


def _parse_file(data: bytes, what: str):
    """Key files are one canonical JSON object followed by exactly one newline."""
    if not isinstance(data, (bytes, bytearray)) or not data.endswith(b"\n") or data.endswith(b"\n\n"):
        raise FormatError(f"{what}: expected one canonical JSON object followed by a single newline")
    return canonical.loads(bytes(data[:-1]), what)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write to a temp name in the same folder, then link into place: atomic, never overwrites,
    durable (the folder is fsynced, and a folder made for it in its parent: the caller reports the
    key written once this returns)."""
    make_dirs(path.parent)
    fd, tmp = temp_for(path)
    try:
        os.fchmod(fd, mode) if hasattr(os, "fchmod") else None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise KeyError_(f"{path} already exists: refusing to overwrite a key") from None
    finally:
        os.unlink(tmp)
    fsync_dir(path.parent)
