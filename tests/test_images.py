from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from anondata.errors import InputError
from anondata.images import MAX_PIXELS, decode_image, encode_image


def _bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(h=24, w=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_png_roundtrip_is_exact():
    a = _rgb()
    arr, fmt = decode_image(_bytes(Image.fromarray(a), "PNG"), "r1")
    assert arr.dtype == np.uint8 and arr.shape == (24, 32, 3)
    assert np.array_equal(arr, a)
    assert (fmt.format, fmt.mode, fmt.width, fmt.height, fmt.notes) == ("PNG", "RGB", 32, 24, ())
    back, _ = decode_image(encode_image(arr, fmt), "r1")
    assert np.array_equal(back, a)


def test_exif_orientation_applied_and_metadata_stripped():
    a = _rgb(20, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    exif[0x013B] = "Jane Doe"  # Artist
    exif[0x8825] = {1: "N", 2: (52.0, 31.0, 12.0)}  # GPS IFD
    data = _bytes(Image.fromarray(a), "PNG", exif=exif)
    assert Image.open(io.BytesIO(data)).getexif()[0x013B] == "Jane Doe"
    arr, fmt = decode_image(data, "r1")
    assert arr.shape == (40, 20, 3)  # rotated for display
    assert np.array_equal(arr, np.rot90(a, k=-1))
    assert fmt.orientation == 6 and any("orientation" in n for n in fmt.notes)
    out = encode_image(arr, fmt)
    im = Image.open(io.BytesIO(out))
    assert im.format == "PNG" and not im.getexif() and "exif" not in im.info and "icc_profile" not in im.info
    assert b"Jane" not in out and b"eXIf" not in out and b"tEXt" not in out and b"iTXt" not in out


def _jpeg_with_orientation(a: np.ndarray, entry: bytes) -> bytes:
    """A JPEG whose EXIF holds one IFD0 entry (12 bytes, big-endian), written by hand: PIL would
    normalise the value."""
    ifd = b"MM\x00*" + b"\x00\x00\x00\x08" + b"\x00\x01" + entry + b"\x00\x00\x00\x00"
    app1 = b"Exif\x00\x00" + ifd
    j = _bytes(Image.fromarray(a), "JPEG", quality=95)
    return j[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + j[2:]


def test_orientation_reported_only_when_applied():
    """An orientation tag written as the text "6" is not applied by PIL, so the pixels stay as
    stored; it was reported as "EXIF orientation 6 applied". Now the format says what was done."""
    a = _rgb(20, 40)
    short6 = _jpeg_with_orientation(a, b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00")
    arr, fmt = decode_image(short6, "r")
    assert arr.shape == (40, 20, 3) and fmt.orientation == 6 and "EXIF orientation 6 applied" in fmt.notes
    text6 = _jpeg_with_orientation(a, b"\x01\x12\x00\x02\x00\x00\x00\x02\x36\x00\x00\x00")
    arr, fmt = decode_image(text6, "r")
    assert arr.shape == (20, 40, 3) and fmt.orientation == 1 and not any("orientation" in n for n in fmt.notes)


def test_jpeg_exif_gps_not_in_output():
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"
    exif[0x8825] = {1: "N", 2: (52.0, 31.0, 12.0)}
    data = _bytes(Image.fromarray(_rgb(32, 32)), "JPEG", exif=exif, quality=95)
    arr, fmt = decode_image(data, "r1")
    assert fmt.format == "JPEG" and not fmt.lossless
    out = encode_image(arr, fmt)
    assert out.startswith(b"\x89PNG") and b"CameraMaker" not in out


def test_grayscale_and_palette_become_rgb():
    g = np.arange(16 * 16, dtype=np.uint8).reshape(16, 16)
    arr, fmt = decode_image(_bytes(Image.fromarray(g, "L"), "PNG"), "g")
    assert fmt.mode == "L" and np.array_equal(arr, np.repeat(g[:, :, None], 3, 2))
    p = Image.fromarray(_rgb(16, 16)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    arr, _ = decode_image(_bytes(p, "PNG"), "p")
    assert np.array_equal(arr, np.asarray(p.convert("RGB")))


def test_sixteen_bit_keeps_high_byte():
    v = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 251).astype(np.uint16)
    im = Image.fromarray(v)
    assert im.mode.startswith("I;16")
    arr, fmt = decode_image(_bytes(im, "PNG"), "deep")
    assert np.array_equal(arr[:, :, 0], (v >> 8).astype(np.uint8))
    assert np.array_equal(arr[:, :, 0], arr[:, :, 2])
    assert any("8-bit" in n for n in fmt.notes)


def test_48_bit_rgb_keeps_high_byte_and_says_so():
    cv2 = pytest.importorskip("cv2")
    a = (np.arange(16 * 16 * 3).reshape(16, 16, 3) * 80).astype(np.uint16)
    for ext in (".png", ".tiff"):
        ok, buf = cv2.imencode(ext, a[:, :, ::-1])
        arr, fmt = decode_image(buf.tobytes(), "deep")
        assert np.array_equal(arr, (a >> 8).astype(np.uint8))
        assert any("16-bit" in n for n in fmt.notes)


def test_rgba_opaque_is_exact_and_transparent_is_composited_over_white():
    a = _rgb(16, 16)
    opaque = np.dstack([a, np.full((16, 16), 255, np.uint8)])
    arr, fmt = decode_image(_bytes(Image.fromarray(opaque, "RGBA"), "PNG"), "o")
    assert np.array_equal(arr, a) and fmt.notes == ()
    alpha = np.zeros((16, 16), np.uint8)
    alpha[:, 8:] = 128
    hidden = np.dstack([a, alpha])
    arr, fmt = decode_image(_bytes(Image.fromarray(hidden, "RGBA"), "PNG"), "t")
    assert (arr[:, :8] == 255).all()  # pixels under alpha 0 are gone, not leaked
    expect = (a[:, 8:].astype(int) * 128 + 255 * 127 + 127) // 255
    assert np.array_equal(arr[:, 8:], expect)
    assert any("white" in n for n in fmt.notes)


def test_cmyk_jpeg_decodes():
    im = Image.fromarray(_rgb(16, 16)).convert("CMYK")
    arr, fmt = decode_image(_bytes(im, "JPEG"), "c")
    assert arr.shape == (16, 16, 3) and fmt.mode == "CMYK"


@pytest.mark.parametrize(
    "data, needle",
    [
        (b"", "empty"),
        (b"not an image at all", "not a recognised image"),
        (_bytes(Image.fromarray(_rgb(64, 64)), "JPEG")[:300], "re-export"),
        (_bytes(Image.fromarray(_rgb(4, 4)), "PNG"), "too small"),
        (_bytes(Image.fromarray(np.zeros((9, 9), np.float32), "F"), "TIFF"), "floating-point"),
    ],
)
def test_bad_inputs_name_the_record(data, needle):
    with pytest.raises(InputError) as e:
        decode_image(data, "rec-42")
    assert "rec-42" in str(e.value) and needle in str(e.value)


def test_postscript_is_never_handed_to_ghostscript(monkeypatch):
    """PIL renders EPS by running Ghostscript on the bytes (where it is installed): a dataset's
    bytes must not reach that interpreter. Refused as not an image, Ghostscript never called."""
    from PIL import EpsImagePlugin

    called = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: called.append(a) or Image.new("RGB", (64, 64)))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n0 0 moveto showpage\n%%EOF\n"
    with pytest.raises(InputError, match="'ps1': not a recognised image file"):
        decode_image(eps, "ps1")
    assert called == []
    decode_image(_bytes(Image.fromarray(_rgb()), "PNG"), "ok")  # the other formats still open


def test_truncated_jpeg_is_refused_even_where_pil_is_told_to_load_truncated_images(monkeypatch):
    """PIL.ImageFile.LOAD_TRUNCATED_IMAGES (process-wide, set by some libraries) makes a truncated
    JPEG decode without an error, its missing rows grey: such a record would be anonymized from
    half a photo and its restore could never match. While it is set, every record is refused."""
    from PIL import ImageFile

    data = _bytes(Image.fromarray(_rgb(64, 64)), "JPEG")
    cut = data[: len(data) * 2 // 3]
    with pytest.raises(InputError, match="'t1'"):
        decode_image(cut, "t1")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(InputError, match="'t1'.*LOAD_TRUNCATED_IMAGES"):
        decode_image(cut, "t1")


def test_corrupt_png_crc_is_rejected():
    data = bytearray(_bytes(Image.fromarray(_rgb(16, 16)), "PNG"))
    data[-20] ^= 0xFF  # inside the IDAT payload/CRC
    with pytest.raises(InputError, match="rec"):
        decode_image(bytes(data), "rec")


def test_not_bytes():
    with pytest.raises(InputError, match="not bytes"):
        decode_image(np.zeros(3), "x")  # type: ignore[arg-type]


def test_animated_gif_is_rejected():
    frames = [Image.fromarray(_rgb(16, 16, s)).convert("P") for s in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(InputError, match="3 frames"):
        decode_image(buf.getvalue(), "anim")


def _png_header_only(w: int, h: int) -> bytes:
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_pixel_bound_checked_from_header_before_decoding():
    # A 10000x6000 header with no pixel data: refused on size alone, never decoded.
    with pytest.raises(InputError, match="over the 50 MP bound") as e:
        decode_image(_png_header_only(10000, 6000), "bomb")
    assert "bomb" in str(e.value)
    with pytest.raises(InputError, match="header declares more pixels|over the"):
        decode_image(_png_header_only(60000, 60000), "bomb2")
    with pytest.raises(InputError, match="bound"):
        decode_image(_bytes(Image.fromarray(_rgb(40, 40)), "PNG"), "small", max_pixels=1000)
    assert MAX_PIXELS >= 6000 * 4000


def test_large_photo_decodes():
    a = np.zeros((4000, 6000, 3), np.uint8)
    a[::7, ::5] = 200
    arr, fmt = decode_image(_bytes(Image.fromarray(a), "PNG", compress_level=1), "big")
    assert arr.shape == (4000, 6000, 3) and (fmt.width, fmt.height) == (6000, 4000)


def test_encode_rejects_non_rgb():
    with pytest.raises(InputError):
        encode_image(np.zeros((8, 8), np.uint8))
    with pytest.raises(InputError):
        encode_image(np.zeros((8, 8, 3), np.float32))


@pytest.mark.filterwarnings("ignore")
def test_every_cut_of_a_multi_frame_file_is_an_input_error_naming_the_record():
    """Counting frames walks every page's header: a damaged later page raised PIL's TypeError,
    KeyError or SyntaxError out of decode_image instead of the InputError its callers catch."""
    pages = [Image.fromarray(_rgb(16, 16, s)) for s in range(2)]
    data = _bytes(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    for cut in range(8, len(data)):
        with pytest.raises(InputError, match="'cut'"):
            decode_image(data[:cut], "cut")


def test_decoder_messages_carry_no_bytes_of_the_image_into_the_reason():
    """The error becomes the record's public quarantine reason, which carries no image bytes
    (docs/ARCHITECTURE.md): PIL quotes the bytes it choked on (a PPM header token: pixel data)."""
    bad = b"P6\n24\x1e255\n" + bytes(range(40, 240))
    long_token = b"P6 255" + bytes([0x8E, 0xFE, 0xE3, 0x21, 0x78, 0xF2, 0xBC, 0x05]) + b"\n" + bytes(200)
    for data in (bad, long_token):
        with pytest.raises(InputError, match="'ppm'") as e:
            decode_image(data, "ppm")
        assert "b'" not in str(e.value) and 'b"' not in str(e.value), str(e.value)
