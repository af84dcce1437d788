"""Deterministic sample images, built in memory.

Tests, ``make demo`` and the benchmark corpus all need realistic bodies
without touching the network or shipping binary fixtures, so every generator
here is seeded and returns encoded bytes. Each one produces a case the
imaging pipeline must handle specially (alpha, palettes, animation, CMYK,
EXIF orientation, 16-bit samples, header-only bombs, non-images).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# The animated GIF's first frame is red and the rest are not, so a thumbnail
# shows at a glance whether the first frame was used.
FIRST_FRAME_RGB = (255, 0, 0)
LATER_FRAMES_RGB = ((0, 0, 255), (0, 255, 0))
# Colours of the two halves of ``cmyk_jpeg``, as CMYK and as the RGB they mean.
CMYK_HALVES = ((0, 255, 255, 0), (255, 255, 0, 0))
CMYK_HALVES_RGB = ((255, 0, 0), (0, 0, 255))
# ``png_alpha``: opaque left half, fully transparent right half whose hidden
# RGB is green, so dropping alpha instead of flattening shows up as green.
ALPHA_OPAQUE_RGB = (200, 30, 30)
ALPHA_HIDDEN_RGB = (0, 255, 0)
# ``exif_rotated_jpeg`` content, stored landscape: red left quarter, green top
# band on the rest, blue elsewhere. Displayed (Orientation 6 = rotate 90°
# clockwise) the red band is at the top and the green band on the right.
ROTATED_RED = (255, 0, 0)
ROTATED_GREEN = (0, 255, 0)
ROTATED_BLUE = (0, 0, 255)


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """Photo-like RGB content whose layout depends on the seed, not on the size.

    Layers, coarse to fine: a smooth colour field (a tiny random grid
    upscaled bicubically), soft mid-frequency variation, a few flat shapes
    with hard edges, and mild noise so it compresses like a real photo rather
    than like a cartoon.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    detail = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    # Blend at 1/8 scale and upscale once: same smoothness, a fraction of the cost.
    small = (max(width // 8, 16), max(height // 8, 12))
    field = Image.blend(
        Image.fromarray(coarse).resize(small, Image.Resampling.BICUBIC),
        Image.fromarray(detail).resize(small, Image.Resampling.BICUBIC),
        0.25,
    )
    img = field.resize((width, height), Image.Resampling.BICUBIC)

    draw = ImageDraw.Draw(img)
    for _ in range(10):
        cx, cy = rng.uniform(0.0, 1.0, 2)
        rx, ry = rng.uniform(0.03, 0.25, 2)
        x0, x1 = (cx - rx) * width, (cx + rx) * width
        y0, y1 = (cy - ry) * height, (cy + ry) * height
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)

    noise = rng.integers(-9, 10, (height, width, 3), dtype=np.int16)
    pixels = np.asarray(img, dtype=np.int16) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def photo_jpeg(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    return _encode(_photo(width, height, seed), "JPEG", quality=quality)


def png_alpha(width: int = 200, height: int = 100) -> bytes:
    """RGBA PNG: left half ``ALPHA_OPAQUE_RGB``, right half transparent."""
    img = Image.new("RGBA", (width, height), (*ALPHA_HIDDEN_RGB, 0))
    img.paste((*ALPHA_OPAQUE_RGB, 255), (0, 0, width // 2, height))
    return _encode(img, "PNG")


def gif_palette(width: int = 120, height: int = 80, transparent: bool = False) -> bytes:
    """Palette GIF: top half blue, bottom half yellow (transparent if asked)."""
    img = Image.new("P", (width, height), 0)
    img.putpalette([0, 0, 255, 255, 255, 0] + [0, 0, 0] * 254)
    img.paste(1, (0, height // 2, width, height))
    params: dict[str, object] = {"transparency": 1} if transparent else {}
    return _encode(img, "GIF", **params)


def gif_animated(width: int = 90, height: int = 60) -> bytes:
    """Three-frame GIF: ``FIRST_FRAME_RGB`` then ``LATER_FRAMES_RGB``."""
    frames = [Image.new("RGB", (width, height), c) for c in (FIRST_FRAME_RGB, *LATER_FRAMES_RGB)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def webp(width: int = 300, height: int = 200, seed: int = 0, quality: int = 80) -> bytes:
    return _encode(_photo(width, height, seed), "WEBP", quality=quality)


def cmyk_jpeg(width: int = 200, height: int = 100) -> bytes:
    """CMYK JPEG: left half ``CMYK_HALVES[0]`` (red), right half ``[1]`` (blue)."""
    img = Image.new("CMYK", (width, height), CMYK_HALVES[0])
    img.paste(CMYK_HALVES[1], (width // 2, 0, width, height))
    return _encode(img, "JPEG", quality=95)


def exif_rotated_jpeg(width: int = 400, height: int = 200) -> bytes:
    """Stored ``width``×``height`` with EXIF Orientation 6: displays ``height``×``width``.

    See ``ROTATED_*`` for where the colours are, stored and displayed.
    """
    img = Image.new("RGB", (width, height), ROTATED_BLUE)
    img.paste(ROTATED_RED, (0, 0, width // 4, height))
    img.paste(ROTATED_GREEN, (width // 4, 0, width, height // 5))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(img, "JPEG", quality=95, exif=exif)


def png16(width: int = 64, height: int = 48, value: int = 32768) -> bytes:
    """16-bit greyscale PNG (Pillow mode ``I;16``), every sample ``value``.

    The default 32768 is mid-grey: correct 8-bit scaling gives 128, clipping gives 255.
    """
    return _encode(Image.new("I;16", (width, height), value), "PNG")


def tiff(width: int = 160, height: int = 120, seed: int = 0) -> bytes:
    return _encode(_photo(width, height, seed), "TIFF", compression="tiff_deflate")


def bmp(width: int = 160, height: int = 120, seed: int = 0) -> bytes:
    return _encode(_photo(width, height, seed), "BMP")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A PNG of a few dozen bytes whose header claims ``width``×``height`` grey pixels.

    The pixel data is one deflated empty row: enough for Pillow to identify
    the file, nowhere near enough to decode it.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00"))
        + _png_chunk(b"IEND", b"")
    )


def html_page() -> bytes:
    return (
        b"<!DOCTYPE html>\n<html><head><title>Not an image</title></head>\n"
        b'<body><p>This page was served where an image was expected.</p><img src="x.jpg">'
        b"</body></html>\n"
    )


def sample_set() -> dict[str, tuple[bytes, str]]:
    """File name -> (body, content type): one of each case, plus a byte-identical pair.

    ``photo-1.jpg`` and ``photo-1-copy.jpg`` are the same bytes, to exercise
    deduplication by content hash.
    """
    photo_1 = photo_jpeg(1024, 768, seed=1)
    return {
        "photo-1.jpg": (photo_1, "image/jpeg"),
        "photo-1-copy.jpg": (photo_1, "image/jpeg"),
        "photo-2.jpg": (photo_jpeg(800, 600, seed=2), "image/jpeg"),
        "photo-3.jpg": (photo_jpeg(480, 640, seed=3), "image/jpeg"),
        "alpha.png": (png_alpha(), "image/png"),
        "palette.gif": (gif_palette(), "image/gif"),
        "animated.gif": (gif_animated(), "image/gif"),
        "photo.webp": (webp(), "image/webp"),
        "cmyk.jpg": (cmyk_jpeg(), "image/jpeg"),
        "rotated.jpg": (exif_rotated_jpeg(), "image/jpeg"),
        "grey16.png": (png16(), "image/png"),
        "photo.tif": (tiff(), "image/tiff"),
        "photo.bmp": (bmp(), "image/bmp"),
        "bomb.png": (bomb_png(), "image/png"),
        "page.html": (html_page(), "text/html; charset=utf-8"),
    }


def write_samples(directory: Path) -> list[Path]:
    """Write ``sample_set()`` into ``directory`` (created if needed); returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (body, _content_type) in sample_set().items():
        path = directory / name
        path.write_bytes(body)
        paths.append(path)
    return paths
