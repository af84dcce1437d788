"""The real web's failure modes, against a local fault server, through the whole crawl.

Each test checks that the crawl finishes, the record has the right status and
kind, and the time stays bounded. Timeouts are scaled down so the suite stays fast.
"""

from __future__ import annotations

import socket
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from crawler import samples
from crawler.pipeline import crawl
from tests.conftest import by_url, entries, make_settings, read_manifest
from tests.server import LocalServer

FAST: dict[str, Any] = {
    "connect_timeout": 1.0,
    "read_timeout": 0.5,
    "total_timeout": 2.0,
    "min_rate": 1000,
    "min_rate_grace": 0.5,
    "backoff_base": 0.01,
    "backoff_max": 0.05,
}


async def crawl_one(
    url: str, tmp_path: Path, executor: ProcessPoolExecutor, **sections: dict[str, Any]
) -> tuple[dict[str, Any], float]:
    fetch = {**FAST, **sections.pop("fetch", {})}
    settings = make_settings(tmp_path, fetch=fetch, **sections)
    started = time.monotonic()
    await crawl(entries([url]), settings, executor=executor)
    (record,) = read_manifest(tmp_path)
    return record, time.monotonic() - started


def outcome(record: dict[str, Any]) -> tuple[str, str | None, int]:
    return record["status"], record["error"], record["attempts"]


async def test_slow_drip_is_cut_by_the_minimum_rate(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    """One byte every 0.2 s never trips the 0.5 s read timeout; the rate floor ends it."""
    record, took = await crawl_one(server.url("/drip?every=0.2"), tmp_path, executor)
    assert outcome(record) == ("failed", "timeout", 3)
    assert "min_rate" in record["detail"]
    assert took < 4
    assert server.hits["/drip"] == 3


async def test_drip_under_the_rate_floor_hits_the_total_deadline(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    """With the rate floor off, the per-attempt deadline is the watchdog."""
    record, took = await crawl_one(
        server.url("/drip?every=0.1"), tmp_path, executor, fetch={"min_rate": 0, "max_attempts": 1}
    )
    assert outcome(record) == ("failed", "timeout", 1)
    assert "within 2s" in record["detail"]
    assert 1.9 < took < 3


async def test_hang_times_out(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    record, took = await crawl_one(server.url("/hang"), tmp_path, executor)
    assert outcome(record) == ("failed", "timeout", 3)
    assert took < 3


@pytest.mark.parametrize(
    ("path", "kind"),
    [("/reset", "connection"), ("/reset-mid-body", "truncated"), ("/short-body", "truncated"),
     # aiohttp 3.14 never ends the body stream after a bad chunk-size line (nor
     # does its read timeout fire): the per-attempt deadline is what ends it.
     ("/broken-chunked", "timeout")],
)  # fmt: skip
async def test_broken_transfers_are_retried_and_store_nothing(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path, path: str, kind: str
) -> None:
    record, took = await crawl_one(server.url(path), tmp_path, executor)
    assert outcome(record) == ("failed", kind, 3), record["detail"]
    # aiohttp itself resends an idempotent request once when the server drops
    # the connection before answering (a stale keep-alive race, usually).
    assert server.hits[path] == 3 * (2 if path == "/reset" else 1)
    assert not (tmp_path / "images").exists()
    assert took < 7


async def test_endless_body_is_cut_at_the_cap(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    cap = 8 * 1024 * 1024
    record, _ = await crawl_one(
        server.url("/endless"), tmp_path, executor, fetch={"max_bytes": cap}
    )
    assert outcome(record) == ("failed", "too_large", 1)
    # The server wrote the cap plus what loopback socket buffers (autotuned to
    # several MiB each way) took in before the connection closed; then it stopped.
    assert server.sent["/endless"] < cap + 16 * 1024 * 1024


async def test_gzip_bomb_is_cut_at_the_cap_with_flat_memory(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    # Peak of Python allocations during this crawl only (the process's maxrss
    # is a lifetime figure that earlier tests may already have raised).
    tracemalloc.start()
    try:
        record, _ = await crawl_one(
            server.url("/gzip-bomb"), tmp_path, executor, fetch={"max_bytes": 5_000_000}
        )
        peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert outcome(record) == ("failed", "too_large", 1)
    assert peak_mb < 60  # it inflates to 200 MB


async def test_429_with_retry_after_waits_then_succeeds(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    server.add("a.gif", samples.gif_palette(), "image/gif")
    record, _ = await crawl_one(server.url("/429-then-ok/a.gif"), tmp_path, executor)
    assert outcome(record) == ("ok", None, 2)
    first, second = server.times["/429-then-ok/a.gif"]
    assert 0.95 <= second - first < 1.5


async def test_503_twice_then_ok(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    server.add("a.gif", samples.gif_palette(), "image/gif")
    record, _ = await crawl_one(server.url("/503-twice-then-ok/a.gif"), tmp_path, executor)
    assert outcome(record) == ("ok", None, 3)
    assert record["http_status"] == 200


async def test_retry_after_beyond_the_ceiling_fails_as_rate_limited(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    record, took = await crawl_one(
        server.url("/429-for-an-hour"), tmp_path, executor, fetch={"retry_after_max": 5}
    )
    assert outcome(record) == ("failed", "rate_limited", 1)
    assert record["http_status"] == 429
    assert took < 2


@pytest.mark.parametrize(("code", "attempts"), [(404, 1), (410, 1), (500, 3)])
async def test_http_errors(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path, code: int, attempts: int
) -> None:
    record, _ = await crawl_one(server.url(f"/status/{code}"), tmp_path, executor)
    assert outcome(record) == ("failed", f"http_{code}", attempts)
    assert server.hits[f"/status/{code}"] == attempts


@pytest.mark.parametrize(
    ("path", "status", "kind"),
    [
        ("/redirect-loop", "failed", "too_many_redirects"),
        ("/redirect-to-file", "failed", "invalid_url"),
        ("/redirect/3/a.gif", "ok", None),
    ],
)
async def test_redirects(
    server: LocalServer,
    executor: ProcessPoolExecutor,
    tmp_path: Path,
    path: str,
    status: str,
    kind: str | None,
) -> None:
    server.add("a.gif", samples.gif_palette(), "image/gif")
    record, _ = await crawl_one(server.url(path), tmp_path, executor)
    assert (record["status"], record["error"]) == (status, kind)
    if status == "ok":
        assert record["final_url"] == server.url("/img/a.gif")


async def test_the_request_carries_the_url_as_normalised_not_requoted(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    """Escapes the normaliser keeps (``%3D``, ``%2A``, ``%26``) reach the server as
    they are: a signed URL's signature covers them. A ``%`` that starts no escape
    cannot go bare on the wire: it is sent as ``%25``."""
    server.add("a*b=c.gif", samples.gif_palette(), "image/gif")
    server.add("50%off.gif", samples.gif_palette(), "image/gif")
    urls = [
        server.url("/img/a%2Ab%3dc.gif?sig=x%3D%3D&a=%26"),
        server.url("/img/50%off.gif"),
    ]
    settings = make_settings(tmp_path, fetch=FAST)
    await crawl(entries(urls), settings, executor=executor)
    records = by_url(read_manifest(tmp_path))
    assert [records[u]["status"] for u in urls] == ["ok", "ok"]
    sent = sorted(t for t in server.targets if t.startswith("/img/"))
    assert sent == ["/img/50%25off.gif", "/img/a%2Ab%3Dc.gif?sig=x%3D%3D&a=%26"]


async def test_html_served_as_jpeg_is_not_an_image(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    record, _ = await crawl_one(server.url("/html-as-jpeg"), tmp_path, executor)
    assert outcome(record) == ("failed", "not_an_image", 1)
    assert record["content_type"] == "image/jpeg"
    assert "not an image" in record["detail"]


async def test_header_declared_bomb_stops_the_download(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    record, _ = await crawl_one(server.url("/header-bomb"), tmp_path, executor)
    assert outcome(record) == ("failed", "decompression_bomb", 1)
    assert "40000x40000" in record["detail"]
    assert server.sent["/header-bomb"] < 10 * 1024 * 1024  # of 20 MiB on offer


async def test_too_small_and_extreme_aspect(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    small = server.add("small.png", samples.png_alpha(20, 10), "image/png")
    strip = server.add("strip.gif", samples.gif_palette(400, 10), "image/gif")
    fine = server.add("fine.gif", samples.gif_palette(), "image/gif")
    image = {"min_width": 32, "min_height": 8, "max_aspect_ratio": 10}
    await crawl(
        entries([small, strip, fine]), make_settings(tmp_path, image=image), executor=executor
    )
    got = by_url(read_manifest(tmp_path))
    assert (got[small]["status"], got[small]["error"]) == ("failed", "too_small")
    assert (got[strip]["status"], got[strip]["error"]) == ("failed", "bad_aspect_ratio")
    assert got[fine]["status"] == "ok"


async def test_robots_txt_disallow_skips_and_is_fetched_once(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    server.robots = "User-agent: *\nDisallow: /private/\n"
    server.add("a.gif", samples.gif_palette(), "image/gif")
    urls = [server.url("/private/img/a.gif"), server.url("/img/a.gif")] + [
        server.url(f"/img/a.gif?n={i}") for i in range(10)
    ]
    await crawl(entries(urls), make_settings(tmp_path), executor=executor)
    got = by_url(read_manifest(tmp_path))
    assert (got[urls[0]]["status"], got[urls[0]]["error"]) == ("skipped", "robots")
    assert all(got[u]["status"] == "ok" for u in urls[1:])
    assert server.hits["/robots.txt"] == 1
    assert server.hits["/private/img/a.gif"] == 0


async def test_robots_can_be_ignored(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    server.robots = "User-agent: *\nDisallow: /\n"
    server.add("a.gif", samples.gif_palette(), "image/gif")
    record, _ = await crawl_one(
        server.url("/img/a.gif"), tmp_path, executor, hosts={"respect_robots": False}
    )
    assert record["status"] == "ok"
    assert server.hits["/robots.txt"] == 0


async def test_x_robots_tag_noai_is_an_opt_out(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    server.add("a.gif", samples.gif_palette(), "image/gif")
    record, _ = await crawl_one(server.url("/noai/a.gif"), tmp_path, executor)
    assert (record["status"], record["error"]) == ("skipped", "opt_out")
    assert record["detail"] == "X-Robots-Tag: noindex, noai"
    record, _ = await crawl_one(
        server.url("/noai/a.gif"), tmp_path / "2", executor, hosts={"respect_opt_out": False}
    )
    assert record["status"] == "ok"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_dead_host_trips_the_breaker_and_live_hosts_finish(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    server.add("a.gif", samples.gif_palette(), "image/gif")
    port = closed_port()
    dead = [f"http://127.0.0.1:{port}/img/{i}.gif" for i in range(25)]
    live = [server.url(f"/img/a.gif?n={i}") for i in range(25)]
    mixed = [u for pair in zip(dead, live, strict=True) for u in pair]
    settings = make_settings(
        tmp_path, fetch=FAST, hosts={"breaker_threshold": 5, "breaker_cooldown": 60}
    )
    started = time.monotonic()
    await crawl(entries(mixed), settings, executor=executor)
    took = time.monotonic() - started
    records = read_manifest(tmp_path)
    kinds = [r["error"] for r in records if r["url"] in dead]
    assert len(kinds) == 25
    # The first failures open the breaker; their retries and every later URL
    # of the host then fail fast without a request.
    assert set(kinds) == {"host_unreachable"}
    assert sum(r["attempts"] for r in records if r["url"] in dead) <= 5 + 8
    assert [r for r in records if r["url"] in live and r["status"] != "ok"] == []
    assert took < 5


async def test_per_host_limit_is_held_across_hosts(
    executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    async with LocalServer(addresses=("127.0.0.1", "127.0.0.2", "127.0.0.3")) as srv:
        srv.delay = 0.05
        srv.add("a.gif", samples.gif_palette(), "image/gif")
        urls = [srv.url(f"/img/a.gif?n={i}", f"127.0.0.{1 + i % 3}") for i in range(60)]
        settings = make_settings(tmp_path, crawl={"concurrency": 16}, hosts={"per_host": 2})
        await crawl(entries(urls), settings, executor=executor)
    assert sum(r["status"] == "ok" for r in read_manifest(tmp_path)) == 60
    assert dict(srv.peak) == {f"127.0.0.{n}:{srv.port}": 2 for n in (1, 2, 3)}
    assert srv.peak_total >= 4  # hosts ran side by side


async def test_a_slow_host_does_not_stall_the_others(
    executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    async with LocalServer() as slow, LocalServer() as fast:
        slow.delay = 0.4
        for srv in (slow, fast):
            srv.add("a.gif", samples.gif_palette(), "image/gif")
        slow_urls = [slow.url(f"/img/a.gif?n={i}") for i in range(12)]
        fast_urls = [fast.url(f"/img/a.gif?n={i}") for i in range(60)]
        settings = make_settings(tmp_path, crawl={"concurrency": 8}, hosts={"per_host": 2})
        await crawl(entries(slow_urls + fast_urls), settings, executor=executor)
    assert sum(r["status"] == "ok" for r in read_manifest(tmp_path)) == 72
    slow_starts, fast_starts = slow.times["/img/a.gif"], fast.times["/img/a.gif"]
    # the slow host needs 6 rounds of 0.4 s; every fast URL was fetched within its first second
    assert max(slow_starts) - min(slow_starts) > 1.9
    assert max(fast_starts) - min(slow_starts) < 1.0


async def test_waiting_for_a_busy_host_does_not_spend_the_deadline(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    """Five 0.3 s responses, one at a time, under a 0.5 s per-attempt deadline: all succeed."""
    server.delay = 0.3
    server.add("a.gif", samples.gif_palette(), "image/gif")
    urls = [server.url(f"/img/a.gif?n={i}") for i in range(5)]
    fetch = {**FAST, "total_timeout": 0.5, "read_timeout": 0.45}
    settings = make_settings(tmp_path, fetch=fetch, hosts={"per_host": 1, "adaptive": False})
    await crawl(entries(urls), settings, executor=executor)
    records = read_manifest(tmp_path)
    assert [outcome(r) for r in records] == [("ok", None, 1)] * 5
    assert server.peak[f"127.0.0.1:{server.port}"] == 1


async def test_content_type_that_lies_is_noted_not_trusted(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    server.add("a.png", samples.png_alpha(), "text/plain")
    record, _ = await crawl_one(server.url("/img/a.png"), tmp_path, executor)
    assert (record["status"], record["format"], record["content_type"]) == (
        "ok",
        "PNG",
        "text/plain",
    )
    assert record["detail"] == "Content-Type text/plain but the bytes are PNG"


async def test_cookies_are_not_kept_by_default(
    server: LocalServer, executor: ProcessPoolExecutor, tmp_path: Path
) -> None:
    server.add("a.gif", samples.gif_palette(), "image/gif")
    # a host name: aiohttp's cookie jar never keeps cookies from IP addresses
    urls = [f"http://localhost:{server.port}/cookie/a.gif?n={i}" for i in range(3)]
    settings = make_settings(tmp_path, hosts={"per_host": 1})
    await crawl(entries(urls), settings, executor=executor)
    image_requests = [h for h in server.headers_seen if "robots" not in h.get("Host", "")]
    assert len(image_requests) >= 3
    assert not any("Cookie" in h for h in image_requests)
