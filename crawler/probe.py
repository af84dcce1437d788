"""Recognise an image and read its size from the first bytes of a body, without decoding.

Runs on the event loop while the body is still streaming, so a page served
as ``image/jpeg``, a decompression bomb or a 1x1 tracking pixel can be
refused before the rest is downloaded or the process pool is involved. That
is why everything here is plain byte parsing with bounded work: it reads
only the prefix it is given, never decodes, and answers ``None`` rather than
raising when the bytes are short or hostile. ``None`` from :func:`dimensions`
means "don't know yet": the caller may retry with more bytes, and the full
decoder still checks the size either way.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

from crawler.models import Failure

# bytes, or the bytearray a download is collected in (probed without copying it)
Buffer = bytes | bytearray

# The formats we can store, and their file extensions.
EXTENSIONS: dict[str, str] = {
    "JPEG": "jpg",
    "PNG": "png",
    "GIF": "gif",
    "WEBP": "webp",
    "BMP": "bmp",
    "TIFF": "tif",
}
DEFAULT_FORMATS: tuple[str, ...] = tuple(EXTENSIONS)

# The BMP test reads the DIB header size at offset 14..18; everything else needs less.
SNIFF_BYTES = 18

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Text that happens to start with "BM" must not pass for a bitmap, so we also
# require one of the DIB header sizes Pillow knows how to read.
_BMP_HEADER_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})

# Real files have a handful of APPn segments (EXIF, XMP, ICC in chunks) before
# the frame header; a hostile one could have thousands of tiny ones.
_MAX_JPEG_MARKERS = 256
# Real first IFDs hold a few dozen entries; the count field itself can claim 65535.
_MAX_TIFF_ENTRIES = 256
# Markers that stand alone, without a length: TEM, RST0-7 and SOI.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})
# C4 (DHT), C8 (JPG) and CC (DAC) sit in the SOF range but carry no frame size.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Fill bytes may precede any marker; matching them in C keeps a run of 0xFF cheap.
_JPEG_MARKER = re.compile(rb"\xff++([^\xff])")


def sniff(head: Buffer) -> str | None:
    """Pillow's name for the format the magic bytes announce, or ``None`` if not one we take."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(_PNG_SIGNATURE):
        return "PNG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if (
        head.startswith(b"BM")
        and len(head) >= 18
        and struct.unpack_from("<I", head, 14)[0] in _BMP_HEADER_SIZES
    ):
        return "BMP"
    return None


def _png(data: Buffer) -> tuple[int, int] | None:
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack_from(">II", data, 16)
    return width, height


def _gif(data: Buffer) -> tuple[int, int] | None:
    # The logical screen; Pillow widens it if the first frame overhangs it.
    if len(data) < 10:
        return None
    width, height = struct.unpack_from("<HH", data, 6)
    return width, height


def _webp(data: Buffer) -> tuple[int, int] | None:
    if len(data) < 30 or data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8 ":
        # Only a key frame has the start code and sizes; the top two bits are a scale.
        if data[20] & 1 or data[23:26] != b"\x9d\x01\x2a":
            return None
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        if data[20] != 0x2F:
            return None
        bits = struct.unpack_from("<I", data, 21)[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        # The canvas, which is what Pillow reports for animations too.
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    return None


def _bmp(data: Buffer) -> tuple[int, int] | None:
    if len(data) < 18:
        return None
    header_size = struct.unpack_from("<I", data, 14)[0]
    if header_size == 12:
        if len(data) < 22:
            return None
        width, height = struct.unpack_from("<HH", data, 18)
        return width, height
    if header_size not in _BMP_HEADER_SIZES or len(data) < 26:
        return None
    width, height = struct.unpack_from("<ii", data, 18)
    # A negative height only means the rows are stored top-down.
    return (width, abs(height)) if width >= 0 else None


def _jpeg(data: Buffer) -> tuple[int, int] | None:
    if not data.startswith(b"\xff\xd8"):
        return None
    pos = 2
    for _ in range(_MAX_JPEG_MARKERS):
        # No match also covers junk where a marker belongs: leave that file to the decoder.
        match = _JPEG_MARKER.match(data, pos)
        if match is None:
            return None
        marker = match.group(1)[0]
        pos = match.end()
        if marker in _JPEG_STANDALONE:
            continue
        # A stuffed zero is entropy-coded data, and EOI or SOS come after the
        # frame header: either way there is no header left to find.
        if marker in (0x00, 0xD9, 0xDA) or pos + 2 > len(data):
            return None
        length = struct.unpack_from(">H", data, pos)[0]
        if marker in _JPEG_SOF:
            if length < 7 or pos + 7 > len(data):
                return None
            height, width = struct.unpack_from(">HH", data, pos + 3)
            return width, height
        if length < 2:
            return None
        pos += length
    return None


def _tiff(data: Buffer) -> tuple[int, int] | None:
    if data.startswith(b"II*\x00"):
        order = "<"
    elif data.startswith(b"MM\x00*"):
        order = ">"
    else:
        return None
    if len(data) < 8:
        return None
    ifd = struct.unpack_from(order + "I", data, 4)[0]
    if ifd < 8 or ifd + 2 > len(data):
        return None
    count = min(struct.unpack_from(order + "H", data, ifd)[0], _MAX_TIFF_ENTRIES)
    found: dict[int, int] = {}
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        if entry + 12 > len(data):
            return None
        tag, kind = struct.unpack_from(order + "HH", data, entry)
        if tag not in (256, 257):
            continue
        # A value of four bytes or less sits in the entry itself, left-justified.
        if kind == 3:
            found[tag] = struct.unpack_from(order + "H", data, entry + 8)[0]
        elif kind == 4:
            found[tag] = struct.unpack_from(order + "I", data, entry + 8)[0]
        else:
            return None
        if len(found) == 2:
            return found[256], found[257]
    return None


_PARSERS: dict[str, Callable[[Buffer], tuple[int, int] | None]] = {
    "PNG": _png,
    "GIF": _gif,
    "WEBP": _webp,
    "BMP": _bmp,
    "JPEG": _jpeg,
    "TIFF": _tiff,
}


def dimensions(data: Buffer, fmt: str) -> tuple[int, int] | None:
    """``(width, height)`` from the header at the start of ``data``, a ``fmt`` file's prefix.

    ``None`` when the prefix is too short or the header is not what it should
    be. The size is the stored one: EXIF orientation is not applied.
    """
    parser = _PARSERS.get(fmt)
    return parser(data) if parser is not None else None


@dataclass(frozen=True, slots=True)
class Limits:
    """Geometry an image must have to be worth downloading and decoding. 0 = no limit."""

    max_pixels: int
    min_width: int = 0
    min_height: int = 0
    max_aspect_ratio: float = 0.0


def check_geometry(width: int, height: int, limits: Limits) -> Failure | None:
    """The first limit ``width`` x ``height`` breaks, as a failure; ``None`` if it passes."""
    size = f"{width}x{height}"
    pixels = width * height
    if width <= 0 or height <= 0:
        # Nothing to decode either way, and a real encoder never writes this.
        return Failure("decompression_bomb", f"{size}: an image with no pixels")
    if pixels > limits.max_pixels:
        return Failure("decompression_bomb", f"{size} = {pixels} pixels, limit {limits.max_pixels}")
    if width < limits.min_width or height < limits.min_height:
        return Failure("too_small", f"{size}, minimum {limits.min_width}x{limits.min_height}")
    ratio = max(width, height) / min(width, height)
    if limits.max_aspect_ratio > 0 and ratio > limits.max_aspect_ratio:
        return Failure(
            "bad_aspect_ratio",
            f"{size}: aspect ratio {ratio:.2f}, limit {limits.max_aspect_ratio:g}",
        )
    return None
