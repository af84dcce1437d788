"""The fetch layer: how requests are built and how failures are classified.

aioresponses covers what a local server cannot produce (DNS failures) and
checks the request itself; redirects and statuses run against a real server.
"""

from __future__ import annotations

from typing import Any
from unittest.mock import Mock

import aiohttp
import pytest
from aioresponses import aioresponses

from crawler.fetch import Fetcher, classify
from crawler.models import Fetched, FetchFailed
from crawler.settings import CrawlSettings, FetchSettings
from tests.server import LocalServer


class MockedResponse(aiohttp.ClientResponse):
    """aioresponses 0.7.9 predates aiohttp 3.14's required ``stream_writer`` argument
    (pnuckowski/aioresponses#289); supply the one attribute aiohttp reads from it.
    Keep mocked bodies under 64 KiB (#292)."""

    def __init__(self, *args: Any, stream_writer: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, stream_writer=stream_writer or Mock(output_size=0), **kwargs)


FAST = FetchSettings(backoff_base=0.001, backoff_max=0.01, total_timeout=5.0)


async def fetch(url: str, cfg: FetchSettings = FAST) -> Fetched | FetchFailed:
    async with Fetcher(cfg, CrawlSettings()) as fetcher:
        return await fetcher.fetch(url)


async def test_body_and_type_come_back() -> None:
    with aioresponses() as mocked:
        mocked.get(
            "http://img.test/a.jpg",
            body=b"\xff\xd8data",
            content_type="image/jpeg",
            response_class=MockedResponse,
        )
        result = await fetch("http://img.test/a.jpg")
        ((_, call),) = mocked.requests.items()
        sent = call[0].kwargs
    assert isinstance(result, Fetched)
    assert result.body == b"\xff\xd8data" and result.content_type == "image/jpeg"
    assert result.attempts == 1
    assert sent["max_redirects"] == FAST.max_redirects


async def test_dns_failure_is_its_own_kind() -> None:
    dns_error = aiohttp.ClientConnectorDNSError(
        aiohttp.client_reqrep.ConnectionKey("nx.test", 80, False, True, None, None, None),
        OSError(-2, "Name or service not known"),
    )
    with aioresponses() as mocked:
        mocked.get("http://nx.test/a.jpg", exception=dns_error, repeat=True)
        result = await fetch("http://nx.test/a.jpg", FetchSettings(max_attempts=1))
    assert isinstance(result, FetchFailed)
    assert result.failure.kind == "dns"


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (TimeoutError(), "timeout"),
        (aiohttp.ServerTimeoutError("read"), "timeout"),
        (aiohttp.ClientPayloadError("short"), "truncated"),
        (aiohttp.ServerDisconnectedError(), "connection"),
        (aiohttp.ClientOSError(104, "reset"), "connection"),
        (ConnectionResetError(), "connection"),
    ],
)
def test_classify(exc: BaseException, kind: str) -> None:
    assert classify(exc).kind == kind


async def test_requests_name_the_crawler(server: LocalServer) -> None:
    server.add("a.gif", b"GIF89a")
    assert isinstance(await fetch(server.url("/img/a.gif")), Fetched)
    assert server.headers_seen[0]["User-Agent"] == FAST.user_agent.strip()
    assert "Cookie" not in server.headers_seen[0]


async def test_404_is_not_retried(server: LocalServer) -> None:
    result = await fetch(server.url("/status/404"))
    assert isinstance(result, FetchFailed)
    assert (result.failure.kind, result.http_status, result.attempts) == ("http_404", 404, 1)
    assert server.hits["/status/404"] == 1


async def test_500_is_retried_up_to_max_attempts(server: LocalServer) -> None:
    result = await fetch(server.url("/status/503"))
    assert isinstance(result, FetchFailed)
    assert (result.failure.kind, result.attempts) == ("http_503", 3)
    assert server.hits["/status/503"] == 3


async def test_redirect_chain_records_final_url(server: LocalServer) -> None:
    server.add("a.png", b"PNGDATA", "image/png")
    result = await fetch(server.url("/redirect/3/a.png"))
    assert isinstance(result, Fetched)
    assert result.final_url == server.url("/img/a.png")
    assert result.body == b"PNGDATA"


async def test_redirect_loop_fails(server: LocalServer) -> None:
    result = await fetch(server.url("/redirect-loop"))
    assert isinstance(result, FetchFailed)
    assert result.failure.kind == "too_many_redirects"
    assert server.hits["/redirect-loop"] == FAST.max_redirects


async def test_redirect_to_file_scheme_is_invalid(server: LocalServer) -> None:
    result = await fetch(server.url("/redirect-to-file"))
    assert isinstance(result, FetchFailed)
    assert result.failure.kind == "invalid_url"


async def test_body_over_cap_is_too_large(server: LocalServer) -> None:
    server.add("big.bin", b"x" * 10_000)
    result = await fetch(server.url("/img/big.bin"), FetchSettings(max_bytes=1000))
    assert isinstance(result, FetchFailed)
    assert result.failure.kind == "too_large"


async def test_connection_refused_is_connection() -> None:
    result = await fetch(
        "http://127.0.0.1:9/a.jpg", FetchSettings(max_attempts=2, backoff_base=0.001)
    )
    assert isinstance(result, FetchFailed)
    assert (result.failure.kind, result.attempts) == ("connection", 2)
