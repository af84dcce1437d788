"""The fetch layer, one attempt at a time: how requests are built, how answers are classified.

aioresponses covers what a local server cannot produce (DNS failures) and
checks the request itself; everything else runs against a real local server.
"""

from __future__ import annotations

from typing import Any
from unittest.mock import Mock

import aiohttp
import pytest
from aioresponses import aioresponses
from multidict import CIMultiDict, CIMultiDictProxy

from crawler import samples
from crawler.fetch import Fetcher, classify, retry_after
from crawler.models import Fetched, FetchFailed, NotModified
from crawler.settings import Settings, load_settings
from tests.server import LocalServer


class MockedResponse(aiohttp.ClientResponse):
    """aioresponses 0.7.9 predates aiohttp 3.14's required ``stream_writer`` argument
    (pnuckowski/aioresponses#289); supply the one attribute aiohttp reads from it.
    Keep mocked bodies under 64 KiB (#292)."""

    def __init__(self, *args: Any, stream_writer: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, stream_writer=stream_writer or Mock(output_size=0), **kwargs)


def settings(**fetch: Any) -> Settings:
    return load_settings(overrides={"fetch": {"total_timeout": 5.0, **fetch}})


async def attempt(url: str, cfg: Settings | None = None) -> Fetched | FetchFailed:
    async with Fetcher(cfg or settings()) as fetcher:
        result = await fetcher.attempt(url)
    assert not isinstance(result, NotModified)  # only a conditional GET gets a 304
    return result


async def test_body_type_and_sniffed_format_come_back() -> None:
    gif = samples.gif_palette()
    with aioresponses() as mocked:
        mocked.get(
            "http://img.test/a", body=gif, content_type="text/plain", response_class=MockedResponse
        )
        result = await attempt("http://img.test/a")
        ((_, calls),) = mocked.requests.items()
    assert isinstance(result, Fetched)
    assert (result.body, result.content_type, result.sniffed) == (gif, "text/plain", "GIF")
    assert result.note == "Content-Type text/plain but the bytes are GIF"
    assert calls[0].kwargs["max_redirects"] == 5


async def test_dns_failure_is_its_own_kind_and_counts_as_unreachable() -> None:
    key = aiohttp.client_reqrep.ConnectionKey("nx.test", 80, False, True, None, None, None)
    dns_error = aiohttp.ClientConnectorDNSError(key, OSError(-2, "Name or service not known"))
    with aioresponses() as mocked:
        mocked.get("http://nx.test/a.jpg", exception=dns_error)
        result = await attempt("http://nx.test/a.jpg")
    assert isinstance(result, FetchFailed)
    assert (result.failure.kind, result.unreachable) == ("dns", True)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (TimeoutError(), "timeout"),
        (aiohttp.ServerTimeoutError("read"), "timeout"),
        (aiohttp.ClientPayloadError("short"), "truncated"),
        (aiohttp.ServerDisconnectedError(), "connection"),
        (aiohttp.ClientOSError(104, "reset"), "connection"),
        (ConnectionResetError(), "connection"),
        (aiohttp.TooManyRedirects(Mock(real_url="x"), ()), "too_many_redirects"),
    ],
)
def test_classify(exc: BaseException, kind: str) -> None:
    assert classify(exc).kind == kind


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [("120", 120, 120), ("0", 0, 0), ("Wed, 21 Oct 2015 07:28:00 GMT", 0, 0), ("soon", None, None)],
)
def test_retry_after(value: str, low: float | None, high: float | None) -> None:
    got = retry_after(CIMultiDictProxy(CIMultiDict({"Retry-After": value})))
    if low is None:
        assert got is None
    else:
        assert got is not None and low <= got <= high  # type: ignore[operator]


def test_retry_after_future_date() -> None:
    from datetime import UTC, datetime, timedelta
    from email.utils import format_datetime

    when = format_datetime(datetime.now(UTC) + timedelta(seconds=90), usegmt=True)
    got = retry_after(CIMultiDictProxy(CIMultiDict({"Retry-After": when})))
    assert got is not None and 85 <= got <= 91


async def test_requests_name_the_crawler_and_carry_extra_headers(server: LocalServer) -> None:
    server.add("a.gif", samples.gif_palette())
    cfg = load_settings(overrides={"fetch": {"headers": {"X-Team": "imaging"}}})
    assert isinstance(await attempt(server.url("/img/a.gif"), cfg), Fetched)
    sent = server.headers_seen[0]
    assert sent["User-Agent"] == cfg.fetch.user_agent
    assert sent["X-Team"] == "imaging"
    assert "Cookie" not in sent


async def test_http_error_statuses(server: LocalServer) -> None:
    result = await attempt(server.url("/status/404"))
    assert isinstance(result, FetchFailed)
    assert (result.failure.kind, result.http_status, result.unreachable) == ("http_404", 404, False)


async def test_redirect_chain_records_final_url(server: LocalServer) -> None:
    server.add("a.png", samples.png_alpha(), "image/png")
    result = await attempt(server.url("/redirect/3/a.png"))
    assert isinstance(result, Fetched)
    assert result.final_url == server.url("/img/a.png")


async def test_redirect_loop_fails(server: LocalServer) -> None:
    result = await attempt(server.url("/redirect-loop"))
    assert isinstance(result, FetchFailed)
    assert result.failure.kind == "too_many_redirects"
    assert server.hits["/redirect-loop"] == 5


async def test_redirect_to_file_scheme_is_invalid(server: LocalServer) -> None:
    result = await attempt(server.url("/redirect-to-file"))
    assert isinstance(result, FetchFailed)
    assert result.failure.kind == "invalid_url"


async def test_body_over_cap_is_too_large(server: LocalServer) -> None:
    server.add("big.png", samples.png_alpha(400, 400) + b"\0" * 10_000)
    result = await attempt(server.url("/img/big.png"), settings(max_bytes=1000))
    assert isinstance(result, FetchFailed)
    assert result.failure.kind == "too_large"


async def test_connection_refused_is_unreachable() -> None:
    result = await attempt("http://127.0.0.1:9/a.jpg")
    assert isinstance(result, FetchFailed)
    assert (result.failure.kind, result.unreachable) == ("connection", True)
