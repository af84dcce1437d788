"""Decode, hash and thumbnail one image body: the CPU half of the crawler.

Runs inside ``ProcessPoolExecutor`` workers, so everything here is synchronous
and :func:`process` turns every outcome into a picklable value made of
builtins: an exception escaping a worker would either break the pool or need
our classes to unpickle in the parent.

Speed comes from never touching more pixels than the output needs: JPEGs are
decoded at a reduced scale; after one mode conversion and one resize to the
largest thumbnail, everything else (orientation, alpha flattening, the
perceptual hash, the smaller thumbnails) works on that small image.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
import zlib

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageFile, UnidentifiedImageError

from crawler.errors import ErrorKind
from crawler.models import Failure, ImageJob, ImageResult, ThumbSpec
from crawler.probe import EXTENSIONS, Limits, check_geometry

# A JPEG carrying a multi-picture index opens as "MPO"; its first picture is
# an ordinary JPEG and is what a browser shows.
_FORMAT_ALIASES = {"MPO": "JPEG"}

# What Pillow raises for data it cannot make sense of. Anything else is a bug
# (ours or Pillow's) and is reported as ``internal``.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)

# The same table as ``ImageOps.exif_transpose``; applied by hand so it can run
# on the reduced image instead of the full decode.
_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_HIGH_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

# imagehash.phash with hash_size=8, highfreq_factor=4: a 32x32 greyscale
# image, of whose 2-D DCT-II only the 8x8 lowest frequencies are kept. Rows of
# _DCT8 are the first 8 DCT-II basis vectors in scipy.fftpack's scaling, so
# _DCT8 @ X @ _DCT8.T is exactly that corner of dct(dct(X, axis=0), axis=1).
_PHASH_SIDE = 32
_HASH_SIDE = 8
_DCT8: NDArray[np.float64] = 2.0 * np.cos(
    np.pi
    * np.arange(_HASH_SIDE)[:, None]
    * (2 * np.arange(_PHASH_SIDE)[None, :] + 1)
    / (2 * _PHASH_SIDE)
)

# Shrink by whole factors with reduce() (a box filter) as far as the target
# allows, then Lanczos for the rest. Measured on photo-like 640x480..3000x2000
# JPEGs: 40-60% less time than Pillow's default gap of 2.0, and after the
# thumbnail's own JPEG q85 encoding it is within 0.3 dB PSNR of a full Lanczos.
_REDUCING_GAP = 1.0


def init_worker(max_pixels: int) -> None:
    """Pool initializer: make Pillow's own bomb guard agree with ours and fail loudly.

    :func:`process` checks ``max_pixels`` itself; this is the second line, for
    code paths inside Pillow that look at sizes we never see.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    # Pillow's UserWarnings ("Corrupt EXIF data", "Truncated File Read", ...)
    # are about one hostile body each; the outcome already lands in its record.
    warnings.filterwarnings("ignore", category=UserWarning, module="PIL")


def process(job: ImageJob) -> ImageResult | Failure:
    """Hash, measure and thumbnail ``job.data``. Never raises."""
    try:
        return _process(job)
    except _BOMB_ERRORS as exc:
        return _failure(ErrorKind.DECOMPRESSION_BOMB, str(exc))
    except MemoryError as exc:
        # Spelled out because an allowed but huge image can cause it: it must
        # cost that one image, never the worker, whatever happens to the line below.
        return _failure(ErrorKind.INTERNAL, f"MemoryError: {exc}")
    except Exception as exc:
        return _failure(ErrorKind.INTERNAL, f"{type(exc).__name__}: {exc}")


def _failure(kind: ErrorKind, detail: str) -> Failure:
    # A plain str, not the enum member: results must unpickle without our modules.
    return Failure(kind.value, detail)


def _process(job: ImageJob) -> ImageResult | Failure:
    spec = job.thumbs
    # Never decode smaller than the perceptual hash needs.
    box = max((*spec.sizes, _PHASH_SIDE))
    decoded = _decode(job, box)
    if isinstance(decoded, Failure):
        return decoded
    im, fmt, (width, height) = decoded

    orientation = _orientation(im)
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    # The fetcher checked the header as stored; this is the authoritative check,
    # as displayed, and the only one for headers the fetcher could not read.
    limits = Limits(job.max_pixels, job.min_width, job.min_height, job.max_aspect_ratio)
    if failure := check_geometry(width, height, limits):
        return failure

    base = _fit(_to_working_mode(im), box)
    if orientation in _TRANSPOSE:
        base = base.transpose(_TRANSPOSE[orientation])
    if base.mode == "RGBA":
        base = _flatten(base, spec.background)

    encoded: dict[int, bytes] = {}
    current = base
    for size in sorted(set(spec.sizes), reverse=True):
        current = _fit(current, size)
        encoded[size] = _encode(current, spec)

    return ImageResult(
        sha256=hashlib.sha256(job.data).hexdigest(),
        phash=phash_hex(base),
        width=width,
        height=height,
        format=fmt,
        ext=EXTENSIONS.get(fmt, fmt.lower()),
        thumbnails=tuple((size, encoded[size]) for size in spec.sizes),
    )


def _decode(job: ImageJob, box: int) -> tuple[Image.Image, str, tuple[int, int]] | Failure:
    """Open, vet and load the first frame; returns the image, its format and full size."""
    try:
        im = Image.open(io.BytesIO(job.data), formats=job.formats)
    except UnidentifiedImageError:
        allowed = ", ".join(job.formats)
        return _failure(ErrorKind.NOT_AN_IMAGE, f"not a recognised image (allowed: {allowed})")
    except _DECODE_ERRORS as exc:
        return _failure(ErrorKind.NOT_AN_IMAGE, f"unreadable header: {exc}")

    fmt = im.format or "unknown"
    fmt = _FORMAT_ALIASES.get(fmt, fmt)
    width, height = im.size
    if width * height > job.max_pixels:
        return _failure(
            ErrorKind.DECOMPRESSION_BOMB,
            f"{width}x{height} = {width * height} pixels, limit {job.max_pixels}",
        )
    try:
        if fmt == "JPEG":
            # Lets libjpeg decode at 1/2, 1/4 or 1/8 scale, never below box x box.
            im.draft("RGB", (box, box))
        im.load()
    except _DECODE_ERRORS as exc:
        return _failure(ErrorKind.NOT_AN_IMAGE, f"cannot decode {fmt}: {exc}")
    return im, fmt, (width, height)


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_ORIENTATION, 1)
    except Exception:
        # A mangled EXIF block should not cost us an image that decodes fine.
        return 1
    return value if isinstance(value, int) else 1


def _to_working_mode(im: Image.Image) -> Image.Image:
    """Convert to L, RGB or RGBA: the modes that resample well and encode as JPEG/WebP.

    Alpha is kept (and flattened only after resizing, which Pillow does on
    premultiplied alpha) so the flattening touches as few pixels as possible.
    """
    mode = im.mode
    if mode in _HIGH_BIT_MODES:
        return _to_8bit(im)
    if mode == "1":
        return im.convert("L")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        return im if mode == "RGBA" else im.convert("RGBA")
    if mode in ("L", "RGB"):
        return im
    # P, CMYK, YCbCr, LAB, HSV, RGBX...: Pillow knows how to get to RGB.
    return im.convert("RGB")


def _to_8bit(im: Image.Image) -> Image.Image:
    """Scale high-bit-depth greyscale to 0..255 (Pillow's own convert clips instead).

    16-bit data (including the 0..65535 range that some decoders hand back
    as mode "I") is divided by 257; floats in 0..1 are multiplied by 255;
    anything else is stretched from its minimum to its maximum.
    """
    pixels = np.asarray(im, dtype=np.float32)
    lo, hi = float(pixels.min()), float(pixels.max())
    if im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and hi <= 65535):
        lo, hi = 0.0, 65535.0
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    grey = np.clip((pixels - lo) * scale + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L")


def _fit(im: Image.Image, size: int) -> Image.Image:
    """Shrink to fit a size x size box, keeping the aspect ratio; never enlarge."""
    width, height = im.size
    if width <= size and height <= size:
        return im
    scale = size / max(width, height)
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    return im.resize(target, Image.Resampling.LANCZOS, reducing_gap=_REDUCING_GAP)


def _flatten(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    flat = Image.new("RGB", im.size, background)
    flat.paste(im, mask=im.getchannel("A"))
    return flat


def _encode(im: Image.Image, spec: ThumbSpec) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG" if spec.format == "jpeg" else "WEBP", quality=spec.quality)
    return buf.getvalue()


def phash_hex(img: Image.Image) -> str:
    """``str(imagehash.phash(img))``, computed with numpy alone."""
    grey = img.convert("L").resize((_PHASH_SIDE, _PHASH_SIDE), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    # Flat or symmetric images have coefficients that are exactly zero in
    # scipy's DCT but come out of a matrix product as +-1e-12 noise, which
    # would decide their bits at random. Rounding far below any real
    # difference (coefficients reach ~1e6) makes them zero again, so such
    # images hash as imagehash does, and the same on every machine.
    low = np.round(_DCT8 @ pixels @ _DCT8.T, 6)
    bits = low > np.median(low)
    # Row-major, most significant bit first: the order imagehash prints in.
    return np.packbits(bits).tobytes().hex()


def hamming(a: str, b: str) -> int:
    """Number of differing bits between two hex hashes of the same length."""
    if len(a) != len(b):
        msg = f"hash lengths differ: {len(a)} != {len(b)}"
        raise ValueError(msg)
    return (int(a, 16) ^ int(b, 16)).bit_count()
