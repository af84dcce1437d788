"""The pool-side image pipeline, called directly: no event loop, no pool (bar one test)."""

from __future__ import annotations

import hashlib
import io
import pickle
import random
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from functools import cache
from typing import Literal

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFile, ImageOps

from crawler import samples
from crawler.errors import ErrorKind
from crawler.imaging import hamming, init_worker, phash_hex, process
from crawler.models import Failure, ImageJob, ImageResult, ThumbSpec
from crawler.probe import DEFAULT_FORMATS, EXTENSIONS

MAX_PIXELS = 50_000_000
RGB = tuple[int, int, int]


def make_job(
    data: bytes,
    thumbs: ThumbSpec | None = None,
    max_pixels: int = MAX_PIXELS,
    formats: tuple[str, ...] = DEFAULT_FORMATS,
) -> ImageJob:
    return ImageJob(data=data, thumbs=thumbs or ThumbSpec(), max_pixels=max_pixels, formats=formats)


def ok(
    data: bytes,
    thumbs: ThumbSpec | None = None,
    max_pixels: int = MAX_PIXELS,
    formats: tuple[str, ...] = DEFAULT_FORMATS,
) -> ImageResult:
    result = process(make_job(data, thumbs, max_pixels, formats))
    assert isinstance(result, ImageResult), result
    return result


def failed(
    data: bytes,
    thumbs: ThumbSpec | None = None,
    max_pixels: int = MAX_PIXELS,
    formats: tuple[str, ...] = DEFAULT_FORMATS,
) -> Failure:
    result = process(make_job(data, thumbs, max_pixels, formats))
    assert isinstance(result, Failure), result
    return result


def thumb(result: ImageResult, index: int = 0) -> Image.Image:
    im = Image.open(io.BytesIO(result.thumbnails[index][1]))
    im.load()
    return im


def rgb_at(im: Image.Image, x: float, y: float) -> RGB:
    """Pixel at a fraction of the width/height, as RGB whatever the mode."""
    pixel = im.convert("RGB").getpixel((int(x * im.width), int(y * im.height)))
    assert isinstance(pixel, tuple)
    return (pixel[0], pixel[1], pixel[2])


def close(actual: RGB, expected: RGB, tolerance: int = 12) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


@cache
def photo(width: int, height: int, seed: int) -> bytes:
    return samples.photo_jpeg(width, height, seed)


# name -> (body, displayed size, Pillow format)
DECODES: dict[str, tuple[Callable[[], bytes], tuple[int, int], str]] = {
    "jpeg": (lambda: photo(640, 480, 1), (640, 480), "JPEG"),
    "png-alpha": (samples.png_alpha, (200, 100), "PNG"),
    "gif-palette": (samples.gif_palette, (120, 80), "GIF"),
    "gif-animated": (samples.gif_animated, (90, 60), "GIF"),
    "webp": (samples.webp, (300, 200), "WEBP"),
    "jpeg-cmyk": (samples.cmyk_jpeg, (200, 100), "JPEG"),
    "jpeg-exif-rotated": (samples.exif_rotated_jpeg, (200, 400), "JPEG"),
    "png-16bit": (samples.png16, (64, 48), "PNG"),
    "tiff": (samples.tiff, (160, 120), "TIFF"),
    "bmp": (samples.bmp, (160, 120), "BMP"),
}


@pytest.mark.parametrize("name", DECODES)
def test_each_format_decodes(name: str) -> None:
    make, (width, height), fmt = DECODES[name]
    data = make()
    result = ok(data)
    assert (result.width, result.height) == (width, height)
    assert result.format == fmt
    assert result.ext == EXTENSIONS[fmt]
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert len(result.phash) == 16
    assert [size for size, _ in result.thumbnails] == [256]
    im = thumb(result)
    assert im.format == "JPEG"
    assert max(im.size) == min(256, max(width, height))
    # Orientation and aspect survive: same shape as the displayed image.
    assert abs(im.width / im.height - width / height) < 0.02


def test_extension_table() -> None:
    assert DEFAULT_FORMATS == ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
    assert [EXTENSIONS[f] for f in DEFAULT_FORMATS] == ["jpg", "png", "gif", "webp", "bmp", "tif"]


def test_exif_rotation_puts_content_where_it_is_displayed() -> None:
    result = ok(samples.exif_rotated_jpeg(400, 200))
    assert (result.width, result.height) == (200, 400)
    im = thumb(result)
    assert im.size == (128, 256)
    # Pixels already upright: a viewer must not rotate the thumbnail again.
    assert 0x0112 not in im.getexif()
    # Stored left quarter (red) is displayed on top, stored top band (green) on the right.
    assert close(rgb_at(im, 0.5, 0.1), samples.ROTATED_RED)
    assert close(rgb_at(im, 0.9, 0.6), samples.ROTATED_GREEN)
    assert close(rgb_at(im, 0.3, 0.6), samples.ROTATED_BLUE)


@pytest.mark.parametrize("background", [(255, 255, 255), (10, 200, 30)])
def test_alpha_flattened_onto_background(background: RGB) -> None:
    result = ok(samples.png_alpha(), thumbs=ThumbSpec(background=background))
    im = thumb(result)
    assert im.mode == "RGB"
    assert close(rgb_at(im, 0.25, 0.5), samples.ALPHA_OPAQUE_RGB)
    # Transparent half: the background, not the hidden green it holds.
    assert close(rgb_at(im, 0.75, 0.5), background)


def _la_png() -> bytes:
    im = Image.new("LA", (100, 50), (0, 0))
    im.paste((40, 255), (0, 0, 50, 50))
    return encode(im, "PNG")


@pytest.mark.parametrize(
    ("make", "opaque"),
    [
        (lambda: samples.gif_palette(transparent=True), (0, 0, 255)),
        (_la_png, (40, 40, 40)),
    ],
    ids=["gif-palette-transparency", "png-la"],
)
def test_other_transparency_flattened(make: Callable[[], bytes], opaque: RGB) -> None:
    background = (250, 120, 0)
    im = thumb(ok(make(), thumbs=ThumbSpec(background=background)))
    # gif_palette: top half opaque, bottom transparent; _la_png: left opaque.
    assert close(rgb_at(im, 0.25, 0.25), opaque)
    assert close(rgb_at(im, 0.75, 0.75), background)


@pytest.mark.parametrize(
    ("mode", "fmt", "value", "expected"),
    [
        ("I;16", "PNG", 32768, 128),
        ("I;16", "PNG", 65535, 255),
        ("I;16", "TIFF", 8000, 31),
        ("I", "TIFF", 32768, 128),
        ("F", "TIFF", 0.5, 128),
    ],
)
def test_high_bit_depth_grey_scaled_not_clipped(
    mode: str, fmt: str, value: float, expected: int
) -> None:
    data = encode(Image.new(mode, (64, 48), value), fmt)
    im = thumb(ok(data))
    assert im.mode == "L"
    assert abs(rgb_at(im, 0.5, 0.5)[0] - expected) <= 2


def test_png16_sample_is_mid_grey() -> None:
    assert Image.open(io.BytesIO(samples.png16())).mode == "I;16"
    assert abs(rgb_at(thumb(ok(samples.png16())), 0.5, 0.5)[0] - 128) <= 2


@pytest.mark.parametrize(
    ("mode", "thumb_mode"),
    [("1", "L"), ("L", "L"), ("P", "RGB"), ("RGB", "RGB"), ("CMYK", "RGB"), ("RGBA", "RGB")],
)
def test_modes_end_up_encodable(mode: str, thumb_mode: str) -> None:
    im = Image.new("RGB", (80, 60), (90, 160, 30)).convert(mode)
    fmt = "JPEG" if mode in ("L", "RGB", "CMYK") else "PNG"
    assert thumb(ok(encode(im, fmt))).mode == thumb_mode


def test_cmyk_colours_come_out_right() -> None:
    im = thumb(ok(samples.cmyk_jpeg()))
    left, right = samples.CMYK_HALVES_RGB
    assert close(rgb_at(im, 0.25, 0.5), left)
    assert close(rgb_at(im, 0.75, 0.5), right)


def test_multi_picture_jpeg_counts_as_jpeg() -> None:
    first, second = (Image.new("RGB", (300, 200), c) for c in ((200, 10, 10), (10, 10, 200)))
    data = encode(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    result = ok(data, formats=("JPEG",))
    assert (result.format, result.ext) == ("JPEG", "jpg")
    assert close(rgb_at(thumb(result), 0.5, 0.5), (200, 10, 10))


def test_animated_gif_uses_first_frame() -> None:
    assert getattr(Image.open(io.BytesIO(samples.gif_animated())), "n_frames", 1) >= 3
    im = thumb(ok(samples.gif_animated()))
    assert close(rgb_at(im, 0.5, 0.5), samples.FIRST_FRAME_RGB)


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_several_sizes_in_requested_order(fmt: Literal["jpeg", "webp"]) -> None:
    sizes = (64, 512, 256, 32)
    result = ok(photo(2048, 1536, 2), thumbs=ThumbSpec(sizes=sizes, format=fmt, quality=80))
    assert [size for size, _ in result.thumbnails] == list(sizes)
    for index, size in enumerate(sizes):
        im = thumb(result, index)
        assert im.format == fmt.upper()
        assert im.size == (size, size * 3 // 4)


def test_portrait_fits_box_on_its_long_side() -> None:
    result = ok(photo(600, 1000, 3), thumbs=ThumbSpec(sizes=(200,)))
    assert (result.width, result.height) == (600, 1000)
    assert thumb(result).size == (120, 200)


def test_small_image_not_upscaled() -> None:
    result = ok(photo(100, 80, 4), thumbs=ThumbSpec(sizes=(256, 64)))
    assert thumb(result, 0).size == (100, 80)
    assert thumb(result, 1).size == (64, 51)


def test_no_thumbnail_sizes_still_hashes() -> None:
    result = ok(photo(640, 480, 5), thumbs=ThumbSpec(sizes=()))
    assert result.thumbnails == ()
    assert len(result.phash) == 16


def _reference_phash(data: bytes) -> str:
    full = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    return str(imagehash.phash(full))


# Up to 2048x1536 so the JPEG draft path decodes at 1/2, 1/4 and 1/8 scale.
PHASH_SIZES = [(320, 240), (640, 480), (1024, 768), (1536, 2048), (2048, 1536)]


@pytest.mark.parametrize(("width", "height"), PHASH_SIZES)
@pytest.mark.parametrize("seed", [11, 12])
def test_phash_of_reduced_decode_is_close_to_imagehash(width: int, height: int, seed: int) -> None:
    data = photo(width, height, seed)
    assert hamming(ok(data).phash, _reference_phash(data)) <= 4


@pytest.mark.parametrize("thumb_size", [16, 128])
def test_phash_never_computed_from_a_tiny_image(thumb_size: int) -> None:
    data = photo(1024, 768, 13)
    result = ok(data, thumbs=ThumbSpec(sizes=(thumb_size,)))
    assert hamming(result.phash, _reference_phash(data)) <= 4


def test_rotated_phash_follows_the_displayed_image() -> None:
    data = samples.exif_rotated_jpeg()
    assert hamming(ok(data).phash, _reference_phash(data)) <= 4


def test_distinct_photos_have_distant_phashes() -> None:
    hashes = [ok(photo(640, 480, seed)).phash for seed in range(20, 28)]
    distances = [hamming(a, b) for i, a in enumerate(hashes) for b in hashes[:i]]
    assert min(distances) > 10


def _stripes() -> Image.Image:
    im = Image.new("L", (64, 64), 0)
    draw = ImageDraw.Draw(im)
    for x in range(0, 64, 8):
        draw.rectangle((x, 0, x + 3, 63), fill=255)
    return im


def _opened(make: Callable[[], bytes]) -> Callable[[], Image.Image]:
    return lambda: Image.open(io.BytesIO(make()))


def _photo_image(seed: int) -> Callable[[], Image.Image]:
    return _opened(lambda: photo(160 + 40 * seed, 120 + 10 * seed, seed))


PHASH_IMAGES: dict[str, Callable[[], Image.Image]] = {
    **{f"photo-{seed}": _photo_image(seed) for seed in range(6)},
    # Flat and symmetric pictures: their zero DCT coefficients are where a
    # plain matrix-product DCT would disagree with scipy's.
    "white": lambda: Image.new("RGB", (100, 80), (255, 255, 255)),
    "grey": lambda: Image.new("L", (33, 47), 90),
    "stripes": _stripes,
    "png-alpha": _opened(samples.png_alpha),
    "gif-palette": _opened(samples.gif_palette),
    "gif-animated": _opened(samples.gif_animated),
    "cmyk": _opened(samples.cmyk_jpeg),
    "png-16bit": _opened(samples.png16),
}


@pytest.mark.parametrize("name", PHASH_IMAGES)
def test_phash_hex_equals_imagehash_exactly(name: str) -> None:
    im = PHASH_IMAGES[name]()
    assert phash_hex(im) == str(imagehash.phash(im))


def test_hamming() -> None:
    assert hamming("0" * 16, "0" * 16) == 0
    assert hamming("0000000000000000", "ffffffffffffffff") == 64
    assert hamming("8000000000000001", "0000000000000000") == 2
    with pytest.raises(ValueError, match="lengths differ"):
        hamming("00", "000")


@pytest.mark.parametrize(
    ("make", "formats"),
    [
        (samples.html_page, DEFAULT_FORMATS),
        (lambda: b"just some text\n", DEFAULT_FORMATS),
        (lambda: b"", DEFAULT_FORMATS),
        (lambda: photo(640, 480, 6)[:20_000], DEFAULT_FORMATS),
        (lambda: photo(640, 480, 6), ("PNG",)),
        (samples.png_alpha, ("JPEG", "GIF")),
    ],
    ids=["html", "text", "empty", "truncated-jpeg", "jpeg-not-allowed", "png-not-allowed"],
)
def test_not_an_image(make: Callable[[], bytes], formats: tuple[str, ...]) -> None:
    failure = failed(make(), formats=formats)
    assert failure.kind == ErrorKind.NOT_AN_IMAGE
    assert failure.detail


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(
    ("make", "max_pixels"),
    [
        # Beyond twice Pillow's default limit: Pillow refuses it while opening.
        (samples.bomb_png, MAX_PIXELS),
        # Pillow's default limit only warns here; our own header check refuses.
        (lambda: samples.bomb_png(10_000, 10_000), MAX_PIXELS),
        # A real image between max_pixels and 2 * max_pixels.
        (lambda: photo(120, 100, 7), 10_000),
        (lambda: photo(120, 100, 7), 11_999),
    ],
    ids=["header-40000x40000", "header-10000x10000", "real-1.2x", "real-just-over"],
)
def test_decompression_bomb_without_init_worker(make: Callable[[], bytes], max_pixels: int) -> None:
    failure = failed(make(), max_pixels=max_pixels)
    assert failure.kind == ErrorKind.DECOMPRESSION_BOMB


def test_bomb_png_is_tiny_but_opens() -> None:
    data = samples.bomb_png()
    assert len(data) < 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(Image.DecompressionBombError):
            Image.open(io.BytesIO(data))
    assert Image.open(io.BytesIO(samples.bomb_png(300, 200))).size == (300, 200)


def test_image_exactly_at_the_limit_is_fine() -> None:
    assert ok(photo(120, 100, 7), max_pixels=12_000).width == 120


@pytest.fixture
def worker_globals(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Let a test call init_worker without leaking Pillow settings into the others."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", ImageFile.LOAD_TRUNCATED_IMAGES)
    with warnings.catch_warnings():
        yield


@pytest.mark.usefixtures("worker_globals")
@pytest.mark.parametrize("size", [(120, 100), (200, 150)], ids=["pillow-warns", "pillow-errors"])
def test_pillow_bomb_guard_is_a_second_line(size: tuple[int, int]) -> None:
    init_worker(10_000)
    # The job itself would allow it: only Pillow's limit set by init_worker objects.
    failure = failed(photo(*size, 8), max_pixels=1_000_000)
    assert failure.kind == ErrorKind.DECOMPRESSION_BOMB


@pytest.mark.usefixtures("worker_globals")
def test_init_worker_settings() -> None:
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    init_worker(1_000_000)
    assert Image.MAX_IMAGE_PIXELS == 1_000_000
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(Image.DecompressionBombWarning):
        warnings.warn("boom", Image.DecompressionBombWarning, stacklevel=1)
    # Truncated data is still refused once the worker is set up.
    assert failed(photo(640, 480, 6)[:20_000]).kind == ErrorKind.NOT_AN_IMAGE


def _garbage() -> Iterator[bytes]:
    rnd = random.Random(1234)
    magics = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00"]
    for magic in magics:
        for _ in range(5):
            yield magic + rnd.randbytes(rnd.randint(0, 200))
    for body, _content_type in samples.sample_set().values():
        for fraction in (0.05, 0.3, 0.6, 0.95):
            yield body[: int(len(body) * fraction)]


@pytest.mark.filterwarnings("ignore")
def test_never_raises_on_garbage() -> None:
    expected = {ErrorKind.NOT_AN_IMAGE, ErrorKind.DECOMPRESSION_BOMB}
    for data in _garbage():
        result = process(make_job(data))
        # Truncated animations and PNGs missing only their end still hold a whole first image.
        if isinstance(result, Failure):
            assert result.kind in expected, (data[:16], result)
        else:
            assert isinstance(result, ImageResult)


def test_unexpected_errors_become_internal_failures() -> None:
    # A format name Pillow has never heard of is a configuration bug, not bad input.
    failure = failed(photo(64, 48, 1), formats=("NO-SUCH-FORMAT",))
    assert failure.kind == ErrorKind.INTERNAL
    assert failure.detail.startswith("KeyError: ")


def test_values_pickle_as_builtins() -> None:
    job = make_job(samples.png_alpha(), ThumbSpec(sizes=(64, 32), format="webp"))
    assert pickle.loads(pickle.dumps(job)) == job
    result = process(job)
    assert pickle.loads(pickle.dumps(result)) == result
    failure = process(make_job(b"nope"))
    assert isinstance(failure, Failure)
    # A plain str, not an ErrorKind: the parent must not need our enum to unpickle it.
    assert type(failure.kind) is str
    assert pickle.loads(pickle.dumps(failure)) == failure


def test_runs_in_a_process_pool() -> None:
    jobs = [make_job(photo(320, 240, 9)), make_job(samples.bomb_png(200, 200), max_pixels=100)]
    with ProcessPoolExecutor(1, initializer=init_worker, initargs=(MAX_PIXELS,)) as pool:
        result, failure = pool.map(process, jobs)
    assert isinstance(result, ImageResult)
    assert result.sha256 == hashlib.sha256(jobs[0].data).hexdigest()
    assert isinstance(failure, Failure)
    assert failure.kind == ErrorKind.DECOMPRESSION_BOMB


def test_sample_set() -> None:
    sample_set = samples.sample_set()
    assert len(sample_set) >= 12
    bodies = [body for body, _ in sample_set.values()]
    assert len(set(bodies)) == len(bodies) - 1
    assert sample_set["photo-1.jpg"][0] == sample_set["photo-1-copy.jpg"][0]
    assert sample_set["page.html"][1].startswith("text/html")
    # Deterministic: same seed, same bytes.
    assert samples.photo_jpeg(64, 48, 3) == samples.photo_jpeg(64, 48, 3)


def test_photo_compresses_like_a_photo() -> None:
    data = photo(2048, 1536, 10)
    bits_per_pixel = len(data) * 8 / (2048 * 1536)
    assert 1.0 <= bits_per_pixel <= 3.0
    pixels = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float64)
    assert pixels.std() > 20
