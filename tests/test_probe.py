"""Format sniffing and header geometry from body prefixes: no event loop, no decoding."""

from __future__ import annotations

import io
import random
import struct
from functools import cache

import pytest
from PIL import Image

from crawler import samples
from crawler.models import Failure
from crawler.probe import SNIFF_BYTES, Limits, check_geometry, dimensions, sniff

FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def jpeg_with_segments(jpeg: bytes, *segments: bytes) -> bytes:
    """``jpeg`` with ``segments`` (marker bytes included) inserted right after SOI."""
    return jpeg[:2] + b"".join(segments) + jpeg[2:]


def app_segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def bmp_bytes(width: int, height: int, header_size: int) -> bytes:
    """An uncompressed 24-bit BMP; a negative ``height`` stores rows top-down."""
    row = (width * 3 + 3) & ~3
    pixels = bytes(row * abs(height))
    if header_size == 12:
        dib = struct.pack("<IHHHH", 12, width, height, 1, 24)
    else:
        dib = struct.pack(
            "<IiiHHIIiiII", header_size, width, height, 1, 24, 0, len(pixels), 0, 0, 0, 0
        )
        dib = dib.ljust(header_size, b"\x00")
    offset = 14 + len(dib)
    return struct.pack("<2sIHHI", b"BM", offset + len(pixels), 0, 0, offset) + dib + pixels


def tiff_bytes(order: str, width: int, height: int, size_type: int) -> bytes:
    """An uncompressed 8-bit grey TIFF whose size tags have type ``size_type`` (3 SHORT, 4 LONG)."""
    tags = [
        (256, size_type, width),
        (257, size_type, height),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 0),  # patched below once the IFD length is known
        (277, 3, 1),
        (278, size_type, height),
        (279, 4, width * height),
    ]
    pixel_offset = 8 + 2 + 12 * len(tags) + 4
    head = struct.pack(order + "2sHI", b"II" if order == "<" else b"MM", 42, 8)
    ifd = struct.pack(order + "H", len(tags))
    for tag, kind, given in tags:
        value = pixel_offset if tag == 273 else given
        # A SHORT value is left-justified in the entry's four value bytes.
        fmt = "H2x" if kind == 3 else "I"
        ifd += struct.pack(order + "HHI" + fmt, tag, kind, 1, value)
    return head + ifd + b"\x00\x00\x00\x00" + bytes(width * height)


@cache
def images() -> dict[str, tuple[bytes, str]]:
    """Name -> (body, Pillow format): every sample plus the variants the parsers branch on."""
    with Image.open(io.BytesIO(samples.photo_jpeg(64, 48, seed=5))) as im:
        photo = im.convert("RGB")
    rgba = Image.new("RGBA", (37, 29), (10, 20, 30, 100))
    frames = [Image.new("RGB", (41, 23), c) for c in ("red", "blue")]
    plain_jpeg = encode(photo, "JPEG")
    return {
        "photo_jpeg": (samples.photo_jpeg(320, 240, seed=1), "JPEG"),
        "progressive_jpeg": (encode(photo, "JPEG", progressive=True), "JPEG"),
        "cmyk_jpeg": (samples.cmyk_jpeg(), "JPEG"),
        "exif_rotated_jpeg": (samples.exif_rotated_jpeg(), "JPEG"),
        "big_exif_jpeg": (encode(photo, "JPEG", exif=b"Exif\x00\x00" + bytes(60_000)), "JPEG"),
        "big_icc_jpeg": (encode(photo, "JPEG", icc_profile=bytes(200_000)), "JPEG"),
        "jpeg_app_com_fill": (
            jpeg_with_segments(
                plain_jpeg,
                app_segment(0xE1, b"x" * 65_000),
                b"\xff\xff\xff",  # fill bytes before the next marker
                app_segment(0xFE, b"a comment"),
                app_segment(0xED, b"Photoshop 3.0\x00"),
            ),
            "JPEG",
        ),
        "png_alpha": (samples.png_alpha(), "PNG"),
        "png16": (samples.png16(), "PNG"),
        "bomb_png": (samples.bomb_png(), "PNG"),
        "gif_palette": (samples.gif_palette(), "GIF"),
        "gif_animated": (samples.gif_animated(), "GIF"),
        "webp_lossy": (samples.webp(), "WEBP"),
        "webp_lossless": (encode(photo, "WEBP", lossless=True), "WEBP"),
        "webp_alpha_vp8x": (encode(rgba, "WEBP"), "WEBP"),
        "webp_animated": (
            encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
            "WEBP",
        ),
        "tiff_le": (samples.tiff(), "TIFF"),
        "tiff_be": (encode(Image.new("I;16B", (33, 21)), "TIFF"), "TIFF"),
        "tiff_le_short": (tiff_bytes("<", 70, 50, 3), "TIFF"),
        "tiff_be_short": (tiff_bytes(">", 70, 50, 3), "TIFF"),
        "tiff_be_long": (tiff_bytes(">", 71, 51, 4), "TIFF"),
        "bmp": (samples.bmp(), "BMP"),
        "bmp_core": (bmp_bytes(30, 20, 12), "BMP"),
        "bmp_top_down": (bmp_bytes(30, -20, 40), "BMP"),
        "bmp_v5": (bmp_bytes(31, 21, 124), "BMP"),
    }


IMAGE_NAMES = list(images())
NOT_IMAGES: dict[str, bytes] = {
    "html": samples.html_page(),
    "empty": b"",
    "bm_text": b"BMx hello",
    "bm_long_text": b"BM is a nice pair of letters to start a sentence with.",
    "json": b'{"error": "not found", "status": 404}',
    "text": b"Hello, world!\n",
    "pdf": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n",
    "zip": b"PK\x03\x04\x14\x00\x00\x00\x08\x00",
    "svg": b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10"/>',
    "riff_wave": b"RIFF$\x00\x00\x00WAVEfmt \x10\x00\x00\x00",
    "jpeg_soi_only": b"\xff\xd8",
}


@pytest.fixture(autouse=True)
def pillow_opens_bombs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow is the reference for sizes here, including the 40000x40000 header-only bomb."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)


def pillow_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.size


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_sniff_recognises_each_image(name: str) -> None:
    data, fmt = images()[name]
    assert sniff(data) == fmt
    assert sniff(data[:SNIFF_BYTES]) == fmt
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == fmt


@pytest.mark.parametrize("name", list(NOT_IMAGES))
def test_sniff_rejects_non_images(name: str) -> None:
    assert sniff(NOT_IMAGES[name]) is None


def test_sniff_rejects_near_misses() -> None:
    # An HTML page whose first bytes happen to be "BM" plus a bogus header size.
    assert sniff(b"BM" + bytes(12) + struct.pack("<I", 41) + b"<html>") is None
    assert sniff(b"GIF88a" + bytes(20)) is None


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_dimensions_match_pillow(name: str) -> None:
    data, fmt = images()[name]
    assert dimensions(data, fmt) == pillow_size(data)


@pytest.mark.parametrize(
    "name", ["photo_jpeg", "progressive_jpeg", "cmyk_jpeg", "exif_rotated_jpeg"]
)
def test_jpeg_dimensions_from_a_small_prefix(name: str) -> None:
    data, _ = images()[name]
    assert dimensions(data[:4096], "JPEG") == pillow_size(data)


def test_jpeg_frame_header_behind_big_segments_needs_a_longer_prefix() -> None:
    data, _ = images()["jpeg_app_com_fill"]
    assert dimensions(data[:4096], "JPEG") is None
    assert dimensions(data[: 70 * 1024], "JPEG") == (64, 48)


def test_tiff_ifd_outside_the_prefix_is_unknown() -> None:
    data, _ = images()["tiff_le"]
    ifd = struct.unpack_from("<I", data, 4)[0]
    assert ifd > 4096  # Pillow writes the IFD after the strips.
    assert dimensions(data[:4096], "TIFF") is None
    assert dimensions(data[: ifd + 2 + 12 * 20], "TIFF") == pillow_size(data)


def test_bomb_png_dimensions_without_decoding() -> None:
    data = samples.bomb_png(40_000, 40_000)
    assert dimensions(data[:SNIFF_BYTES], "PNG") is None
    assert dimensions(data[:24], "PNG") == (40_000, 40_000)
    failure = check_geometry(40_000, 40_000, Limits(max_pixels=100_000_000))
    assert failure == Failure(
        "decompression_bomb", "40000x40000 = 1600000000 pixels, limit 100000000"
    )


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_short_prefixes_give_none(name: str) -> None:
    data, fmt = images()[name]
    for n in (0, 1, 5, 9):
        assert dimensions(data[:n], fmt) is None


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_every_prefix_gives_none_or_the_right_size(name: str) -> None:
    data, fmt = images()[name]
    expected = pillow_size(data)
    lengths = [*range(min(len(data), 700)), *range(700, len(data), 997), len(data)]
    seen = False
    for n in lengths:
        got = dimensions(data[:n], fmt)
        assert got in (None, expected), n
        # Once the header is in the prefix, more bytes cannot lose it.
        assert got == expected or not seen, n
        seen = got is not None
    assert seen


@pytest.mark.parametrize("fmt", FORMATS)
def test_wrong_format_or_non_image_never_raises(fmt: str) -> None:
    bodies = [data for data, _ in images().values()] + list(NOT_IMAGES.values())
    for data in bodies:
        got = dimensions(data[:2048], fmt)
        assert got is None or all(isinstance(v, int) and v >= 0 for v in got)
    assert dimensions(b"\x89PNG\r\n\x1a\n", "SVG") is None


@pytest.mark.parametrize("seed", range(4))
def test_random_garbage_never_raises(seed: int) -> None:
    rng = random.Random(seed)
    magics = [b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\0\0\0\0WEBP"]
    magics += [b"II*\x00", b"MM\x00*", b"BM" + bytes(12) + struct.pack("<I", 40)]
    for _ in range(500):
        data = rng.choice(magics) + rng.randbytes(rng.randrange(64))
        sniff(data)
        for fmt in FORMATS:
            got = dimensions(data, fmt)
            assert got is None or all(v >= 0 for v in got)


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_corrupted_headers_never_raise(name: str) -> None:
    data, fmt = images()[name]
    rng = random.Random(name)
    head = data[:512]
    for _ in range(300):
        mutated = bytearray(head)
        for _ in range(rng.randrange(1, 6)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        cut = bytes(mutated[: rng.randrange(len(mutated) + 1)])
        assert sniff(cut) in (*FORMATS, None)
        got = dimensions(cut, fmt)
        assert got is None or all(v >= 0 for v in got)


SOI = b"\xff\xd8"
SOF0 = app_segment(0xC0, struct.pack(">BHHB", 8, 48, 64, 1) + b"\x01\x11\x00")


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("length_past_the_end", SOI + b"\xff\xe0\xff\xf0JFIF\x00" + SOF0),
        ("length_zero", SOI + b"\xff\xe0\x00\x00" + SOF0),
        ("length_one", SOI + b"\xff\xe0\x00\x01" + SOF0),
        ("sof_cut_short", SOI + SOF0[:7]),
        ("sof_length_too_small", SOI + b"\xff\xc0\x00\x04\x08\x00\x30\x00\x40"),
        ("sos_before_sof", SOI + app_segment(0xDA, b"\x01\x01\x00\x00\x3f\x00") + SOF0),
        ("eoi_before_sof", SOI + b"\xff\xd9" + SOF0),
        ("junk_instead_of_marker", SOI + b"\x00\x00" + SOF0),
        ("stuffed_zero", SOI + b"\xff\x00" + SOF0),
        ("only_fill_bytes", SOI + b"\xff" * 100_000),
        ("too_many_markers", SOI + b"\xff\xe0\x00\x02" * 1000 + SOF0),
        ("no_soi", SOF0),
    ],
)
def test_hostile_jpeg_segments_give_none(name: str, data: bytes) -> None:
    assert dimensions(data, "JPEG") is None


def test_jpeg_skips_dht_and_standalone_markers_before_sof() -> None:
    dht = app_segment(0xC4, bytes(17))
    data = SOI + b"\xff\xd0\xff\x01" + dht + app_segment(0xCC, b"\x00\x01") + SOF0
    assert dimensions(data, "JPEG") == (64, 48)
    sof2 = b"\xff\xc2" + SOF0[2:]
    assert dimensions(SOI + sof2, "JPEG") == (64, 48)


@pytest.mark.parametrize(
    ("width", "height", "limits", "kind"),
    [
        (10_000, 10_000, Limits(max_pixels=100_000_000), None),
        (10_000, 10_001, Limits(max_pixels=100_000_000), "decompression_bomb"),
        (0, 100, Limits(max_pixels=100_000_000), "decompression_bomb"),
        (100, 0, Limits(max_pixels=100_000_000), "decompression_bomb"),
        (50, 40, Limits(max_pixels=10**8, min_width=50, min_height=40), None),
        (49, 40, Limits(max_pixels=10**8, min_width=50, min_height=40), "too_small"),
        (50, 39, Limits(max_pixels=10**8, min_width=50, min_height=40), "too_small"),
        (1, 1, Limits(max_pixels=10**8, min_width=2), "too_small"),
        (300, 100, Limits(max_pixels=10**8, max_aspect_ratio=3.0), None),
        (100, 300, Limits(max_pixels=10**8, max_aspect_ratio=3.0), None),
        (301, 100, Limits(max_pixels=10**8, max_aspect_ratio=3.0), "bad_aspect_ratio"),
        (100, 301, Limits(max_pixels=10**8, max_aspect_ratio=3.0), "bad_aspect_ratio"),
        (100_000, 1, Limits(max_pixels=10**8), None),
        # The bomb check comes first: it is the one that protects the pool.
        (
            1,
            200_000_000,
            Limits(max_pixels=10**8, min_width=2, max_aspect_ratio=2),
            "decompression_bomb",
        ),
    ],
)
def test_check_geometry(width: int, height: int, limits: Limits, kind: str | None) -> None:
    failure = check_geometry(width, height, limits)
    assert (failure.kind if failure else None) == kind
    if failure is not None:
        assert type(failure.kind) is str
        assert f"{width}x{height}" in failure.detail


def test_check_geometry_details_give_the_numbers() -> None:
    too_small = check_geometry(1, 1, Limits(max_pixels=100, min_width=16, min_height=8))
    assert too_small == Failure("too_small", "1x1, minimum 16x8")
    stretched = check_geometry(1000, 10, Limits(max_pixels=10**6, max_aspect_ratio=20))
    assert stretched == Failure("bad_aspect_ratio", "1000x10: aspect ratio 100.00, limit 20")


def test_limits_are_frozen() -> None:
    limits = Limits(max_pixels=1)
    with pytest.raises(AttributeError):
        limits.max_pixels = 2  # type: ignore[misc]
