"""Nothing lost, nothing done twice: resume after any interruption, and revisits on request."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from crawler import samples
from crawler.models import Failure, ImageJob, ImageResult, Record, ThumbSpec
from crawler.pipeline import crawl
from crawler.pool import MAX_BATCH, ImagePool
from crawler.settings import PoolSettings
from crawler.state import Ledger, Revisit
from crawler.store import TMP_DIR, TMP_PREFIX
from tests.conftest import by_url, entries, make_settings, read_manifest
from tests.server import LocalServer

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def check_store(out: Path) -> None:
    """Every stored file re-hashes to its own name, and no temporary file is left."""
    for path in (out / "images").rglob("*.*"):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.stem, path
    assert not list(out.rglob(f"{TMP_PREFIX}*"))


async def test_a_second_run_fetches_nothing_again(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    urls = [server.add(f"{i}.gif", samples.gif_palette(20 + i, 20)) for i in range(10)]
    urls += [server.url("/status/404"), "not a url", urls[0] + "#same"]
    first = await crawl(entries(urls), make_settings(tmp_path), executor=executor)
    manifest = (tmp_path / "manifest.jsonl").read_text()
    hits = sum(server.hits.values())
    second = await crawl(entries(urls), make_settings(tmp_path), executor=executor)
    assert first.total == 13 and second.total == 0
    assert sum(server.hits.values()) == hits
    assert (tmp_path / "manifest.jsonl").read_text() == manifest
    got = by_url(read_manifest(tmp_path))
    assert got[urls[-1]]["detail"] == f"duplicate of {urls[0]}"


async def test_same_resource_written_two_ways_is_fetched_once(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    plain = server.add("a.gif", samples.gif_palette())
    other = plain.replace("http://", "HTTP://").replace("/img/a.gif", "/img/%61.gif")
    await crawl(entries([plain, other]), make_settings(tmp_path), executor=executor)
    got = by_url(read_manifest(tmp_path))
    assert got[plain]["status"] == "ok"
    assert (got[other]["status"], got[other]["detail"]) == ("skipped", f"duplicate of {plain}")
    assert server.hits["/img/a.gif"] == 1


async def test_exact_duplicates_share_one_file_across_runs(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    body = samples.png_alpha()
    a, b = server.add("a.png", body), server.add("b.png", body)
    await crawl(entries([a]), make_settings(tmp_path), executor=executor)
    await crawl(entries([a, b]), make_settings(tmp_path), executor=executor)
    got = by_url(read_manifest(tmp_path))
    assert got[b]["duplicate_of"] == a and got[b]["path"] == got[a]["path"]
    assert len(list((tmp_path / "images").rglob("*.png"))) == 1


async def test_retry_failed_only_the_kinds_asked_for(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    flaky, gone = server.url("/img/later.gif"), server.url("/status/410")
    await crawl(entries([flaky, gone]), make_settings(tmp_path), executor=executor)
    assert by_url(read_manifest(tmp_path))[flaky]["error"] == "http_404"
    server.add("later.gif", samples.gif_palette())
    await crawl(
        entries([flaky, gone]),
        make_settings(tmp_path),
        executor=executor,
        revisit=Revisit(retry_failed=frozenset({"http_404"})),
    )
    records = read_manifest(tmp_path)
    got = by_url(records)
    assert len(records) == 2
    assert got[flaky]["status"] == "ok" and got[gone]["error"] == "http_410"
    assert server.hits["/status/410"] == 1


async def test_refresh_after_revalidates_with_a_conditional_get(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    url = server.add("a.gif", samples.gif_palette())
    await crawl(entries([url]), make_settings(tmp_path), executor=executor)
    before = read_manifest(tmp_path)
    summary = await crawl(
        entries([url]),
        make_settings(tmp_path),
        executor=executor,
        revisit=Revisit(refresh_before=time.time() + 1),
    )
    assert server.hits["/img/a.gif"] == 2 and server.not_modified == 1
    assert "If-None-Match" in server.headers_seen[-1]
    assert read_manifest(tmp_path) == before
    assert summary.total == 0


async def test_near_duplicates_are_grouped(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    import io

    from PIL import Image

    original = samples.photo_jpeg(800, 600, seed=11)
    with Image.open(io.BytesIO(original)) as im:
        small, recoded = io.BytesIO(), io.BytesIO()
        im.resize((400, 300)).save(small, "JPEG", quality=85)
        im.save(recoded, "JPEG", quality=60)
    names = {
        "orig.jpg": original,
        "small.jpg": small.getvalue(),
        "recoded.jpg": recoded.getvalue(),
        "other.jpg": samples.photo_jpeg(800, 600, seed=12),
    }
    urls = {name: server.add(name, body, "image/jpeg") for name, body in names.items()}
    await crawl(entries(list(urls.values())), make_settings(tmp_path), executor=executor)
    got = by_url(read_manifest(tmp_path))
    group = got[urls["orig.jpg"]]["near_dup_group"]
    assert group is not None
    assert (
        got[urls["small.jpg"]]["near_dup_group"]
        == got[urls["recoded.jpg"]]["near_dup_group"]
        == group
    )
    assert got[urls["other.jpg"]]["near_dup_group"] is None

    result = subprocess.run(
        [sys.executable, "-m", "crawler", "dups", str(tmp_path)],
        capture_output=True, text=True, env=ENV, timeout=60, check=True,
    )  # fmt: skip
    assert result.stdout.splitlines()[0] == "group 1: 3 images"
    assert result.stdout.splitlines()[-1] == "1 groups of near duplicates"


async def test_leftover_temp_files_are_cleared(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    (tmp_path / TMP_DIR).mkdir()
    (tmp_path / TMP_DIR / ".tmp-abc-half.jpg").write_bytes(b"half")
    await crawl(
        entries([server.add("a.gif", samples.gif_palette())]),
        make_settings(tmp_path),
        executor=executor,
    )
    check_store(tmp_path)


def crash(job: ImageJob) -> ImageResult | Failure:
    os._exit(9)  # what the OOM killer or a segfaulting decoder does to a worker


async def test_an_input_that_kills_its_worker_twice_fails_and_the_pool_recovers() -> None:
    pool = ImagePool.from_settings(PoolSettings(workers=1), 10_000_000)
    try:
        job = ImageJob(samples.gif_palette(), ThumbSpec(), 10_000_000, ("GIF",))
        crashing = ImagePool(pool._executor, pool._factory, crash)
        failure = await crashing.process(job)
        assert failure == Failure(
            "worker_crashed", "an image worker died while processing this image"
        )
        assert crashing.rebuilds == 2
        result = await ImagePool(crashing._executor).process(job)
        assert isinstance(result, ImageResult)
    finally:
        await crashing.shutdown()


async def test_a_worker_killed_mid_crawl_is_replaced(
    server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pools: list[ImagePool] = []
    real = ImagePool.from_settings

    def capture(settings: PoolSettings, max_pixels: int) -> ImagePool:
        pools.append(real(settings, max_pixels))
        return pools[-1]

    monkeypatch.setattr(ImagePool, "from_settings", capture)
    urls = [
        server.add(f"{i}.jpg", samples.photo_jpeg(1600, 1200, seed=i), "image/jpeg")
        for i in range(40)
    ]

    async def killer() -> None:
        while not pools or not pools[0].worker_pids():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        os.kill(pools[0].worker_pids()[0], signal.SIGKILL)

    kill = asyncio.create_task(killer())
    summary = await crawl(entries(urls), make_settings(tmp_path, crawl={"concurrency": 8}))
    await kill
    assert summary.by_status == {"ok": 40}
    assert pools[0].rebuilds == 1


async def run_crawler(
    urls_file: Path, out: Path, kill_after_hits: int | None, server: LocalServer
) -> int:
    args = [str(urls_file), "--out", str(out), "--concurrency", "16", "--workers", "2", "--quiet"]
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "crawler", *args, env=ENV)
    if kill_after_hits is not None:
        start = sum(server.hits.values())
        while proc.returncode is None and sum(server.hits.values()) - start < kill_after_hits:
            await asyncio.sleep(0.005)
        if proc.returncode is None:
            proc.kill()
    return await asyncio.wait_for(proc.wait(), 120)


async def test_sigkill_at_any_point_then_resume_gives_the_uninterrupted_result(
    server: LocalServer, tmp_path: Path
) -> None:
    n = 240
    server.delay = 0.01
    urls = [
        server.add(f"{i}.jpg", samples.photo_jpeg(160, 120, seed=i), "image/jpeg") for i in range(n)
    ]
    urls_file, out = write_urls(tmp_path, urls), tmp_path / "out"
    kills = [5, 80, 120]  # early, mid (pool busy), late
    for after in kills:
        code = await run_crawler(urls_file, out, after, server)
        assert code == -signal.SIGKILL
    assert await run_crawler(urls_file, out, None, server) == 0

    records = read_manifest(out)
    assert len(records) == n and len(by_url(records)) == n
    assert {r["status"] for r in records} == {"ok"}
    check_store(out)
    image_hits = sum(v for k, v in server.hits.items() if k.startswith("/img/"))
    # each kill can cost at most what was in flight: 16 fetch slots, the pool's
    # window (2 workers: 3 batches out), 16 being stored
    assert image_hits <= n + len(kills) * (16 + 3 * MAX_BATCH + 16)


def write_urls(tmp_path: Path, urls: list[str]) -> Path:
    urls_file = tmp_path / "urls.txt"
    urls_file.write_text("\n".join(urls) + "\n")
    return urls_file


async def start_slow_crawl(
    server: LocalServer, tmp_path: Path, n: int, delay: float, grace: float, after_hits: int
) -> tuple[asyncio.subprocess.Process, list[str], Path, Path]:
    """A crawl of ``n`` small GIFs served ``delay`` s each, 2 at a time; returns once
    ``after_hits`` requests have arrived (process, urls, urls file, output dir)."""
    server.delay = delay
    urls = [server.add(f"{i}.gif", samples.gif_palette(10 + i, 10)) for i in range(n)]
    urls_file, out = write_urls(tmp_path, urls), tmp_path / "out"
    env = {**ENV, "CRAWLER_CRAWL_GRACE_PERIOD": str(grace), "CRAWLER_HOSTS_PER_HOST": "2"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "crawler", str(urls_file), "--out", str(out), "--workers", "1",
        env=env, stderr=subprocess.PIPE,
    )  # fmt: skip
    while sum(server.hits.values()) < after_hits:
        await asyncio.sleep(0.01)
    return proc, urls, urls_file, out


async def test_sigterm_stops_within_the_grace_period_then_resume_completes(
    server: LocalServer, tmp_path: Path
) -> None:
    proc, urls, urls_file, out = await start_slow_crawl(server, tmp_path, 60, 0.2, 3, 6)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 143, err.decode()
    assert time.monotonic() - sent < 3 + 2
    assert "SIGTERM: stopping" in err.decode()
    partial = read_manifest(out)
    assert 0 < len(partial) < 60 and len(by_url(partial)) == len(partial)

    assert await run_crawler(urls_file, out, None, server) == 0
    records = read_manifest(out)
    assert len(records) == 60 and {r["status"] for r in records} == {"ok"}
    assert json.loads((out / "manifest.jsonl").read_text().splitlines()[0])["url"] == urls[0]


async def test_disk_full_pauses_instead_of_failing_good_images(
    server: LocalServer,
    executor: ProcessPoolExecutor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from crawler import pipeline
    from crawler.store import Store

    monkeypatch.setattr(pipeline, "DISK_FULL_RETRY", 0.05)
    real_save = Store.save
    failures = iter([True, True, True])

    async def flaky_save(
        self: Store, result: ImageResult, body: bytes
    ) -> tuple[str, dict[str, str]]:
        if next(failures, False):
            raise OSError(28, "No space left on device")
        return await real_save(self, result, body)

    monkeypatch.setattr(Store, "save", flaky_save)
    urls = [server.add(f"{i}.gif", samples.gif_palette(10 + i, 10)) for i in range(5)]
    summary = await crawl(entries(urls), make_settings(tmp_path), executor=executor)
    assert summary.by_status == {"ok": 5}
    assert "disk full" in caplog.text and "intake resumed" in caplog.text


def test_workers_exit_when_the_crawler_is_killed(tmp_path: Path) -> None:
    """Workers hold both ends of their task pipe, never see EOF: they must watch the crawler."""
    script = (
        "import os, sys, time\n"
        "from crawler.pool import make_executor\n"
        "from crawler.settings import PoolSettings\n"
        "pool = make_executor(PoolSettings(workers=2), 1000)\n"
        "pool.submit(time.sleep, 0).result()\n"
        "print(' '.join(map(str, pool._processes)), flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=ENV
    )
    assert proc.stdout is not None
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert pids
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.05)
    assert not any(_running(p) for p in pids)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; its forkserver parent reaps it


async def test_a_second_sigint_quits_at_once_and_resume_completes(
    server: LocalServer, tmp_path: Path
) -> None:
    proc, _, urls_file, out = await start_slow_crawl(server, tmp_path, 40, 0.3, 30, 4)
    proc.send_signal(signal.SIGINT)
    await asyncio.sleep(0.2)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 130
    assert time.monotonic() - sent < 2  # not the 30 s grace period
    assert await run_crawler(urls_file, out, None, server) == 0
    records = read_manifest(out)
    assert len(records) == 40 and {r["status"] for r in records} == {"ok"}
    check_store(out)


async def test_the_manifest_rewrite_does_not_hold_every_image_row(tmp_path: Path) -> None:
    # The end of every run groups the near-duplicates of all stored images.
    # Holding each image's row for that cost ~370 bytes per image (370 MB at
    # the end of a million-image crawl); now 40, plus ~90 while numpy groups.
    n = 10_000
    rng = random.Random(1)
    phashes: list[int] = []
    for i in range(n):  # random hashes, far apart; every 100th a copy of the one before
        phashes.append(phashes[-1] if i % 100 == 1 else rng.getrandbits(64))
    rows = [
        (f"u{i}", i, Record(f"u{i}", "ok", sha256=f"{i:064x}", phash=f"{p:016x}").to_json())
        for i, p in enumerate(phashes)
    ]

    def rewrite(ledger: Ledger) -> int:  # on the ledger's thread, which owns its connection
        assert ledger._db is not None
        with ledger._db:  # one transaction
            ledger._db.execute("BEGIN")
            ledger._db.executemany(
                "INSERT INTO urls (url, seq, status, record) VALUES (?, ?, 'ok', ?)", rows
            )
        tracemalloc.start()
        try:
            ledger._write_manifest()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    async with Ledger(tmp_path) as ledger:
        peak = await ledger._call(rewrite, ledger)
    groups = {r["url"]: r["near_dup_group"] for r in read_manifest(tmp_path) if r["near_dup_group"]}
    assert len(groups) == 2 * (n // 100)
    assert groups["u101"] == groups["u100"] == f"{100:064x}"
    assert peak < n * 200, f"{peak / 1e6:.1f} MB for {n} images"
