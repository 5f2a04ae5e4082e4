"""Image bytes <-> RGB uint8 pixels, with a clear error for anything we cannot handle.

Why this module exists: every record goes through it, so every decision about odd inputs is
made once, here, and documented:

- EXIF orientation is applied, so the pixels are the photo as a viewer shows it. The
  orientation tag, like all other metadata, is not carried into the output.
- Grayscale, palette, CMYK, YCbCr and LAB become RGB (CMYK without colour management).
- 16-bit samples become 8-bit by keeping the high byte (v >> 8), the rounding-free mapping
  that PIL itself uses for 48-bit PNGs. Float images are rejected: their range is unknown.
- Alpha: fully opaque alpha is dropped losslessly; any transparency is composited over
  white. Pixels under transparent alpha are discarded, which also removes a face hidden
  there. Neither the public nor the restored image has an alpha channel.
- Multi-frame files (animated GIF/PNG/WebP, multi-page TIFF) are rejected: anonymizing one
  frame and dropping the rest would silently change the record. A camera MPO's first frame
  is its primary picture, so MPO is accepted.
- Size bounds: under 8x8 px cannot hold a face; over `MAX_PIXELS` (50 MP) is refused from
  the header, before decoding, so a decompression bomb cannot exhaust memory.
- PostScript (EPS) is not opened: PIL renders it by running Ghostscript, an interpreter with a
  history of remote-code-execution bugs, on the dataset's bytes where it is installed.

Output is always PNG (lossless, so the anonymized pixels and the restore record agree
exactly), written from a fresh pixel array: no EXIF, GPS, XMP, ICC, text chunks or
timestamps can reach the public file.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import InputError

MIN_SIDE = 8
MAX_PIXELS = 50_000_000

_TO_RGB = {"1", "L", "P", "RGB", "CMYK", "YCbCr", "LAB", "HSV"}
_ALPHA = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ORIENTATIONS = (2, 3, 4, 5, 6, 7, 8)  # EXIF orientations that transpose the pixels


@dataclass(frozen=True)
class ImageFormat:
    """What the input was, for the manifest and for choosing the output encoding."""

    format: str  # PIL format name of the input ("JPEG", "PNG", ...)
    mode: str  # PIL mode of the input ("RGB", "L", "I;16", "RGBA", ...)
    width: int  # as displayed (after EXIF orientation)
    height: int
    orientation: int = 1  # EXIF orientation that was applied (1 = none)
    notes: tuple[str, ...] = field(default_factory=tuple)  # conversions that changed pixels

    @property
    def lossless(self) -> bool:
        return self.format in {"PNG", "BMP", "TIFF", "PPM", "TGA", "QOI"}


_NEVER_OPENED = {"EPS"}  # see the module docstring


def _formats() -> list[str]:
    Image.init()
    return [f for f in Image.OPEN if f not in _NEVER_OPENED]


def _fail(record_id: str, what: str, fix: str) -> InputError:
    return InputError(f"record {record_id!r}: {what}; {fix}")


# A bytes repr in a decoder's message: PIL quotes what it choked on (a PPM header token, a PNG chunk
# name), which may be pixel data, and the message becomes the record's public quarantine reason.
_BYTES_REPR = re.compile(r"b'(?:[^'\\]|\\.)*'" + r'|b"(?:[^"\\]|\\.)*"')


def _said(e: Exception) -> str:
    return _BYTES_REPR.sub("…", str(e))


def _open(data: bytes, record_id: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own bound (checked from the header next) replaces PIL's warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=_formats())
    except Image.DecompressionBombError:
        raise _fail(
            record_id, "image header declares more pixels than allowed",
            f"downscale it below {MAX_PIXELS // 1_000_000} MP or quarantine the record",
        ) from None
    except UnidentifiedImageError:
        raise _fail(record_id, "not a recognised image file", "check that the column holds image bytes") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise _fail(record_id, f"unreadable image header ({_said(e)})", "re-export the image") from None


def decode_image(data: bytes, record_id: str, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, ImageFormat]:
    """Bytes -> (RGB uint8 HxWx3, ImageFormat). Raises InputError naming the record."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _fail(record_id, f"image is {type(data).__name__}, not bytes", "pass the encoded image bytes")
    data = bytes(data)
    if not data:
        raise _fail(record_id, "image bytes are empty", "check the image column")
    im = _open(data, record_id)
    w, h = im.size
    if w * h > max_pixels:
        raise _fail(
            record_id, f"image is {w}x{h} ({w * h / 1e6:.1f} MP), over the {max_pixels / 1e6:.0f} MP bound",
            "downscale it first or quarantine the record",
        )
    if min(w, h) < MIN_SIDE:
        raise _fail(record_id, f"image is {w}x{h} px, too small to hold a face", "remove or quarantine the record")
    fmt_name = im.format or "unknown"
    try:  # counting walks every frame's header: a damaged later one raises PIL's TypeError, KeyError...
        frames = getattr(im, "n_frames", 1)
    except Exception as e:  # noqa: BLE001 - all mean "corrupt"
        raise _fail(record_id, f"corrupt image ({type(e).__name__}: {_said(e)})", "re-export the image") from None
    if frames > 1 and fmt_name != "MPO":
        raise _fail(
            record_id, f"{fmt_name} has {frames} frames; only single-frame images are supported",
            "extract the frame to anonymize, or quarantine the record",
        )
    # verify() checks structure (e.g. PNG CRCs) without decoding; it consumes the object.
    try:
        im.verify()
    except Exception as e:  # PIL raises many types here; all mean "corrupt"
        raise _fail(record_id, f"corrupt image ({type(e).__name__}: {_said(e)})", "re-export the image") from None
    im = _open(data, record_id)
    # 48/64-bit RGB(A) decodes straight to 8-bit (high byte); only the raw tile mode tells.
    deep = any(";16" in str(getattr(t, "args", None) or t[3]) for t in (im.tile or []))
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # a process-wide switch other code may set
        raise _fail(record_id, "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set in this process, so a truncated image "
                    "would decode without an error (its missing rows grey)", "do not set it where anondata runs")
    try:
        im.load()
        # What exif_transpose applies: only a tag equal to 2..8 (a "6" string leaves the pixels as
        # stored, so it must not be reported as applied).
        tag = im.getexif().get(0x0112, 1)
        im = ImageOps.exif_transpose(im)
        orientation = int(tag) if tag in _ORIENTATIONS else 1
    except Exception as e:
        raise _fail(record_id, f"cannot decode image ({type(e).__name__}: {_said(e)})", "re-export the image") from None
    mode = im.mode
    arr, notes = _to_rgb(im, record_id)
    if deep and mode not in _SIXTEEN:
        notes.append("16-bit samples reduced to 8-bit (high byte)")
    if orientation != 1:
        notes.append(f"EXIF orientation {orientation} applied")
    fmt = ImageFormat(fmt_name, mode, arr.shape[1], arr.shape[0], orientation, tuple(notes))
    return arr, fmt


def _to_rgb(im: Image.Image, record_id: str) -> tuple[np.ndarray, list[str]]:
    mode = im.mode
    notes: list[str] = []
    if mode in _SIXTEEN:
        a = np.asarray(im)
        if a.dtype.kind not in "ui" or (a.size and (a.min() < 0 or a.max() > 65535)):
            raise _fail(record_id, f"mode {mode} samples are outside 0..65535", "convert the image to 8-bit RGB")
        # Mode "I" also holds 8-bit data promoted by some writers; we treat it as 16-bit, as PIL's PNG reader does.
        g = (a.astype(np.uint32) >> 8).astype(np.uint8)
        notes.append(f"{mode} reduced to 8-bit (high byte)")
        return np.ascontiguousarray(np.repeat(g[:, :, None], 3, axis=2)), notes
    if mode == "F":
        raise _fail(record_id, "floating-point image (mode F) has no defined 0..255 range", "convert it to 8-bit RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in _ALPHA:
        rgba = im.convert("RGBA")
        a = np.asarray(rgba)
        alpha = a[:, :, 3]
        if alpha.min() == 255:
            return np.ascontiguousarray(a[:, :, :3]), notes
        # Composite over white with exact integer rounding.
        rgb = a[:, :, :3].astype(np.uint32)
        al = alpha.astype(np.uint32)[:, :, None]
        out = (rgb * al + 255 * (255 - al) + 127) // 255
        notes.append("transparency composited over white")
        return out.astype(np.uint8), notes
    if mode in _TO_RGB:
        if mode == "CMYK":
            notes.append("CMYK converted to RGB without colour management")
        elif mode not in ("RGB", "L", "1", "P"):
            notes.append(f"{mode} converted to RGB")
        return np.ascontiguousarray(np.asarray(im.convert("RGB"))), notes
    raise _fail(record_id, f"unsupported image mode {mode}", "convert the image to 8-bit RGB")


def encode_image(arr: np.ndarray, fmt: ImageFormat | None = None) -> bytes:
    """RGB uint8 HxWx3 -> PNG bytes with no metadata at all.

    Always PNG: lossy output would break the exact link between the public pixels and the
    restore record, and PNG is lossless for every input we accept. `fmt` is accepted for
    symmetry with decode_image; it carries nothing into the file.
    """
    del fmt
    a = np.asarray(arr)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise InputError(f"encode_image needs RGB uint8 HxWx3, got {a.dtype} {a.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a), "RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
