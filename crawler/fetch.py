"""The network edge: the only module that imports aiohttp's client.

Every aiohttp or socket exception is turned into an error kind here, so the
rest of the crawler deals in ``Fetched`` / ``FetchFailed`` values only.
One ``ClientSession`` serves the whole crawl; it is created inside the
running loop (``async with Fetcher(...)``) and bounded in total and per host.
"""

from __future__ import annotations

import asyncio
import random
from types import TracebackType

import aiohttp

from crawler.errors import ErrorKind, http_error
from crawler.models import Failure, Fetched, FetchFailed
from crawler.settings import CrawlSettings, FetchSettings

CHUNK = 256 * 1024
_RETRYABLE_KINDS = frozenset({ErrorKind.TIMEOUT, ErrorKind.CONNECTION, ErrorKind.TRUNCATED})
_RETRYABLE_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))


class Fetcher:
    def __init__(self, fetch: FetchSettings, crawl: CrawlSettings) -> None:
        self._cfg = fetch
        self._crawl = crawl
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Fetcher:
        connector = aiohttp.TCPConnector(
            limit=self._crawl.concurrency,
            limit_per_host=self._crawl.per_host,
            ttl_dns_cache=self._cfg.ttl_dns_cache,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=self._cfg.total_timeout,
                sock_connect=self._cfg.connect_timeout,
                sock_read=self._cfg.read_timeout,
            ),
            headers={"User-Agent": self._cfg.user_agent, "Accept": "image/*,*/*;q=0.5"},
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch(self, url: str) -> Fetched | FetchFailed:
        """Fetch one URL, retrying transient failures with full-jitter backoff."""
        attempt = 0
        while True:
            attempt += 1
            result = await self._attempt(url, attempt)
            if isinstance(result, Fetched) or attempt >= self._cfg.max_attempts:
                return result
            if not _retryable(result):
                return result
            await asyncio.sleep(self._backoff(attempt))

    async def _attempt(self, url: str, attempt: int) -> Fetched | FetchFailed:
        assert self._session is not None, "use Fetcher as an async context manager"
        final_url: str | None = None
        status: int | None = None
        try:
            async with self._session.get(url, max_redirects=self._cfg.max_redirects) as resp:
                final_url, status = str(resp.url), resp.status
                if not 200 <= status < 300:
                    return FetchFailed(
                        Failure(http_error(status), resp.reason or ""), final_url, status, attempt
                    )
                if (resp.content_length or 0) > self._cfg.max_bytes:
                    detail = (
                        f"Content-Length {resp.content_length} > max_bytes {self._cfg.max_bytes}"
                    )
                    return FetchFailed(
                        Failure(ErrorKind.TOO_LARGE, detail), final_url, status, attempt
                    )
                body = bytearray()
                async for chunk in resp.content.iter_chunked(CHUNK):
                    body += chunk
                    if len(body) > self._cfg.max_bytes:
                        detail = f"body over max_bytes {self._cfg.max_bytes}"
                        return FetchFailed(
                            Failure(ErrorKind.TOO_LARGE, detail), final_url, status, attempt
                        )
                return Fetched(bytes(body), final_url, status, resp.content_type or None, attempt)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return FetchFailed(classify(exc), final_url, status, attempt)

    def _backoff(self, attempt: int) -> float:
        return random.uniform(
            0, min(self._cfg.backoff_max, self._cfg.backoff_base * 2 ** (attempt - 1))
        )


def classify(exc: BaseException) -> Failure:
    """Map a client-side exception to an error kind (order matters: subclasses first)."""
    detail = str(exc) or type(exc).__name__
    kind: ErrorKind
    if isinstance(exc, TimeoutError):
        kind = ErrorKind.TIMEOUT
    elif isinstance(exc, aiohttp.TooManyRedirects):
        kind = ErrorKind.TOO_MANY_REDIRECTS
    elif isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        kind = ErrorKind.INVALID_URL
    elif isinstance(exc, aiohttp.ClientConnectorDNSError):
        kind = ErrorKind.DNS
    elif isinstance(exc, aiohttp.ClientPayloadError):
        kind = ErrorKind.TRUNCATED
    else:
        kind = ErrorKind.CONNECTION
    return Failure(kind, detail[:300])


def _retryable(result: FetchFailed) -> bool:
    if result.failure.kind in _RETRYABLE_KINDS:
        return True
    return result.http_status in _RETRYABLE_STATUSES and result.failure.kind.startswith("http_")
