"""End to end, in process: a real local server, the real pipeline, a real process pool."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from crawler import samples
from crawler.models import ImageJob, UrlEntry
from crawler.pipeline import Engine, crawl
from crawler.store import TMP_PREFIX
from tests.conftest import by_url, entries, make_settings, read_manifest
from tests.server import LocalServer

SCHEMA = {
    "url", "status", "error", "detail", "http_status", "final_url", "content_type", "bytes",
    "sha256", "phash", "width", "height", "format", "path", "thumbnails", "duplicate_of",
    "near_dup_group",
    "meta", "fetched_at", "elapsed_ms", "attempts",
}  # fmt: skip
INVALID = [
    "file:///etc/passwd",
    "ftp://example.com/a.jpg",
    "javascript:alert(1)",
    "not a url",
    "http://",
]


async def test_every_kind_of_input_ends_as_the_right_record(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    photo = samples.photo_jpeg(1200, 900, seed=5)
    u = {
        "jpeg": server.add("photo.jpg", photo, "image/jpeg"),
        "copy": server.add("copy.jpg", photo, "image/jpeg"),
        "alpha": server.add("alpha.png", samples.png_alpha(), "image/png"),
        "palette": server.add("palette.gif", samples.gif_palette(), "image/gif"),
        "animated": server.add("animated.gif", samples.gif_animated(), "image/gif"),
        "webp": server.add("photo.webp", samples.webp(), "image/webp"),
        "cmyk": server.add("cmyk.jpg", samples.cmyk_jpeg(), "image/jpeg"),
        "rotated": server.add("rotated.jpg", samples.exif_rotated_jpeg(400, 200), "image/jpeg"),
        "grey16": server.add("grey16.png", samples.png16(), "image/png"),
        "html": server.add("page.html", samples.html_page(), "text/html"),
        "bomb": server.add("bomb.png", samples.bomb_png(), "image/png"),
        "missing": server.url("/img/missing.jpg"),
    }
    repeat = u["jpeg"] + "#again"
    out = tmp_path / "out"
    summary = await crawl(
        entries([*u.values(), repeat, *INVALID]), make_settings(out), executor=executor
    )

    records = read_manifest(out)
    got = by_url(records)
    assert len(records) == len(u) + 1 + len(INVALID)
    assert all(set(r) == SCHEMA for r in records)
    assert summary.total == len(records)

    for key in (
        "jpeg",
        "copy",
        "alpha",
        "palette",
        "animated",
        "webp",
        "cmyk",
        "rotated",
        "grey16",
    ):
        r = got[u[key]]
        assert r["status"] == "ok", (key, r)
        assert r["error"] is None and r["http_status"] == 200 and r["attempts"] == 1
        assert len(r["sha256"]) == 64 and len(r["phash"]) == 16
        stored = (out / r["path"]).read_bytes()
        assert hashlib.sha256(stored).hexdigest() == r["sha256"] == Path(r["path"]).stem
        assert r["bytes"] == len(stored)
        assert r["fetched_at"] and r["elapsed_ms"] >= 0
        with Image.open(out / r["thumbnails"]["256"]) as thumb:
            assert thumb.format == "JPEG"
            assert max(thumb.size) == min(256, max(r["width"], r["height"]))
            # aspect ratio kept, to within rounding
            assert abs(thumb.width / thumb.height - r["width"] / r["height"]) < 0.05

    assert got[u["jpeg"]]["format"] == "JPEG" and got[u["jpeg"]]["path"].endswith(".jpg")
    assert (got[u["jpeg"]]["width"], got[u["jpeg"]]["height"]) == (1200, 900)
    assert got[u["webp"]]["path"].endswith(".webp") and got[u["alpha"]]["path"].endswith(".png")
    assert got[u["grey16"]]["content_type"] == "image/png"

    rotated = got[u["rotated"]]
    assert (rotated["width"], rotated["height"]) == (200, 400)
    with Image.open(out / rotated["thumbnails"]["256"]) as thumb:
        assert thumb.height > thumb.width
        top = thumb.convert("RGB").getpixel((thumb.width // 2, 5))
        assert isinstance(top, tuple) and top[0] > 200 and top[2] < 60  # the red band is on top

    # byte-identical pair: one file, and the later record names the first
    pair = [got[u["jpeg"]], got[u["copy"]]]
    assert pair[0]["sha256"] == pair[1]["sha256"] and pair[0]["path"] == pair[1]["path"]
    assert sorted(str(r["duplicate_of"]) for r in pair) == sorted(
        [str(None), next(r["url"] for r in pair if r["duplicate_of"] is None)]
    )
    assert len(list((out / "images").rglob("*.jpg"))) == 3  # photo, cmyk, rotated
    assert summary.duplicates == 1

    assert got[repeat]["status"] == "skipped"
    assert got[repeat]["detail"] == f"duplicate of {u['jpeg']}"
    assert server.hits["/img/photo.jpg"] == 1

    expected_errors = {"html": "not_an_image", "bomb": "decompression_bomb", "missing": "http_404"}
    for key, kind in expected_errors.items():
        assert (got[u[key]]["status"], got[u[key]]["error"]) == ("failed", kind)
    assert got[u["missing"]]["http_status"] == 404
    for raw in INVALID:
        assert (got[raw]["status"], got[raw]["error"]) == ("failed", "invalid_url")
        assert got[raw]["detail"]
    assert summary.by_error == {
        "invalid_url": 5,
        "not_an_image": 1,
        "decompression_bomb": 1,
        "http_404": 1,
    }
    assert not list(out.rglob(f"{TMP_PREFIX}*"))


async def test_default_pool_forkserver_end_to_end(server: LocalServer, tmp_path: Path) -> None:
    """No executor injected: the crawl starts its own forkserver pool and shuts it down."""
    urls = [
        server.add(f"p{i}.jpg", samples.photo_jpeg(320, 240, seed=i), "image/jpeg")
        for i in range(4)
    ]
    settings = make_settings(tmp_path, image={"thumb_sizes": [64, 128], "thumb_format": "webp"})
    assert settings.pool.start_method == "forkserver"
    summary = await crawl(entries(urls), settings)
    assert summary.by_status == {"ok": 4}
    for r in read_manifest(tmp_path):
        assert set(r["thumbnails"]) == {"64", "128"}
        for size, rel in r["thumbnails"].items():
            assert rel.startswith(f"thumbs/{size}/") and rel.endswith(".webp")
            with Image.open(tmp_path / rel) as thumb:
                assert thumb.format == "WEBP" and max(thumb.size) == int(size)


async def test_meta_travels_to_the_record(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    url = server.add("a.png", samples.png_alpha(), "image/png")
    given = [UrlEntry(url, {"id": "7", "caption": "red"}, 2), UrlEntry("nope", {"id": "8"}, 3)]
    await crawl(entries(given), make_settings(tmp_path), executor=executor)
    got = by_url(read_manifest(tmp_path))
    assert got[url]["meta"] == {"id": "7", "caption": "red"}
    assert got["nope"]["meta"] == {"id": "8"}


async def test_input_is_read_only_as_fast_as_it_is_fetched(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    """With every request held, the reader stops at queue + workers: it never slurps the list."""
    server.add("one.gif", samples.gif_palette(), "image/gif")
    server.gate.clear()
    pulled = 0

    async def endless() -> AsyncIterator[UrlEntry]:
        nonlocal pulled
        for i in range(100_000):
            pulled += 1
            yield UrlEntry(server.url(f"/held/one.gif?n={i}"), None, i)

    settings = make_settings(tmp_path, crawl={"concurrency": 4, "max_pending": 14})
    task = asyncio.create_task(crawl(endless(), settings, executor=executor))
    await asyncio.sleep(0.5)
    assert 4 + 10 <= pulled <= 4 + 10 + 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_bug_in_one_url_is_recorded_as_internal(
    server: LocalServer,
    executor: ProcessPoolExecutor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    good = server.add("ok.gif", samples.gif_palette(), "image/gif")
    bad = server.add("bad.gif", samples.gif_animated(), "image/gif")
    real = ImageJob

    def explode(data: bytes, *args: object) -> object:
        if data == samples.gif_animated():
            raise RuntimeError("boom")
        return real(data, *args)  # type: ignore[arg-type]

    monkeypatch.setattr("crawler.pipeline.ImageJob", explode)
    await crawl(entries([good, bad]), make_settings(tmp_path), executor=executor)
    got = by_url(read_manifest(tmp_path))
    assert got[good]["status"] == "ok"
    assert (got[bad]["status"], got[bad]["error"], got[bad]["detail"]) == (
        "failed",
        "internal",
        "RuntimeError: boom",
    )


async def test_jobs_on_one_engine_share_hosts_fairly(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    """A small crawl started after a big one on the same host finishes long before it."""
    server.delay = 0.02
    server.add("a.gif", samples.gif_palette(), "image/gif")
    big = [server.url(f"/img/a.gif?big={i}") for i in range(120)]
    small = [server.url(f"/img/a.gif?small={i}") for i in range(5)]
    settings = make_settings(tmp_path, hosts={"per_host": 2, "adaptive": False})
    done: dict[str, float] = {}

    async with Engine(settings, executor) as engine:

        async def job(name: str, urls: list[str], delay: float) -> None:
            await asyncio.sleep(delay)
            job_settings = make_settings(tmp_path / name, hosts={"per_host": 2})
            await engine.crawl(entries(urls), job_settings)
            done[name] = asyncio.get_running_loop().time()

        await asyncio.gather(job("big", big, 0), job("small", small, 0.1))
    assert len(read_manifest(tmp_path / "big")) == 120
    assert len(read_manifest(tmp_path / "small")) == 5
    # alone, the big job takes ~1.2 s; taking turns, the small one needs ~10 of its slots
    assert done["big"] - done["small"] > 0.6


async def test_a_cancelled_crawl_leaves_the_engine_to_the_others(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    server.add("a.gif", samples.gif_palette(), "image/gif")
    server.gate.clear()
    settings = make_settings(tmp_path)
    async with Engine(settings, executor) as engine:
        held = asyncio.create_task(
            engine.crawl(entries([server.url(f"/held/a.gif?n={i}") for i in range(50)]),
                         make_settings(tmp_path / "held"))
        )  # fmt: skip
        await asyncio.sleep(0.3)
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        assert engine.scheduler.in_flight == 0
        server.gate.set()
        urls = [server.url(f"/img/a.gif?n={i}") for i in range(10)]
        summary = await engine.crawl(entries(urls), make_settings(tmp_path / "next"))
    assert summary.by_status == {"ok": 10}
