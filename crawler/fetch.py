"""The network edge: the only module that imports aiohttp's client.

``Fetcher.attempt`` makes one request and turns whatever happens into a
``Fetched`` or a ``FetchFailed`` value; every aiohttp or socket exception is
translated here. What to do next (retry, back off, trip a breaker) is the
pipeline's and the host scheduler's business.

Each attempt is bounded on every side: a connect timeout, a per-read timeout,
a minimum average transfer rate after a grace period (so a server dripping one
byte just under the read timeout is still cut off), and a total deadline that
wraps the whole attempt (the watchdog: nothing stays in flight past it). The
body is streamed and cut as soon as it passes ``max_bytes`` (counted after
decompression), and it is sniffed as it arrives: bytes that are not an allowed
image format, or whose header declares a bomb or a too-small image, end the
download early.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from crawler.errors import ErrorKind, http_error
from crawler.guard import AddressPolicy, GuardedResolver, blocked_cause, guard_middleware
from crawler.models import Failure, Fetched, FetchFailed, NotModified
from crawler.probe import SNIFF_BYTES, Limits, check_geometry, dimensions, sniff
from crawler.settings import Settings
from crawler.sources import STRAY_PERCENT

PROBE_LIMIT = 1024 * 1024  # stop looking for a header after this many bytes
ROBOTS_MAX_BYTES = 512 * 1024
_MIME_SUBTYPES = {
    "JPEG": "jpeg",
    "PNG": "png",
    "GIF": "gif",
    "WEBP": "webp",
    "BMP": "bmp",
    "TIFF": "tiff",
}


class Fetcher:
    """``policy``, when given, is the SSRF guard: every connection (redirect hops and
    robots.txt included) must go to an address it allows, or fails as ``blocked_address``."""

    def __init__(self, settings: Settings, policy: AddressPolicy | None = None) -> None:
        self._policy = policy
        self._resolver: GuardedResolver | None = None
        self._cfg = settings.fetch
        self._hosts = settings.hosts
        self._slots = settings.crawl.concurrency
        image = settings.image
        self._formats = frozenset(image.formats)
        self._limits = Limits(
            image.max_pixels, image.min_width, image.min_height, image.max_aspect_ratio
        )
        self._opt_out = frozenset(t.lower() for t in self._hosts.opt_out_tags)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Fetcher:
        # Our scheduler keeps requests within these limits, so the connector
        # never makes a request wait (and spend its deadline) for a connection.
        if self._policy is not None:
            self._resolver = GuardedResolver(self._policy)
        connector = aiohttp.TCPConnector(
            limit=self._slots + 16,  # + robots.txt fetches
            limit_per_host=self._hosts.per_host + 1,
            ttl_dns_cache=self._cfg.ttl_dns_cache,
            resolver=self._resolver,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self._cfg.connect_timeout, sock_read=self._cfg.read_timeout
            ),
            headers={
                "User-Agent": self._cfg.user_agent,
                "Accept": "image/avif,image/webp,image/*;q=0.9,*/*;q=0.5",
                **self._cfg.headers,
            },
            cookie_jar=None if self._cfg.cookies else aiohttp.DummyCookieJar(),
            trust_env=False,
            # Literal IPs never reach the resolver: the middleware checks each hop's URL.
            middlewares=() if self._policy is None else (guard_middleware(self._policy),),
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
        if self._resolver is not None:
            await self._resolver.close()  # the connector does not close a resolver it was given

    async def attempt(
        self, url: str, etag: str | None = None, last_modified: str | None = None
    ) -> Fetched | FetchFailed | NotModified:
        """One request for ``url``, within the total deadline; conditional when given validators."""
        state = _Progress()
        headers = {}
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
        try:
            async with asyncio.timeout(self._cfg.total_timeout):
                return await self._get(url, headers, state)
        except TimeoutError:
            failure = Failure(
                ErrorKind.TIMEOUT, f"no complete response within {self._cfg.total_timeout:g}s"
            )
        except (aiohttp.ClientError, OSError) as exc:
            failure = classify(exc, in_body=state.status is not None)
        return FetchFailed(
            failure,
            state.final_url,
            state.status,
            unreachable=state.status is None and _unreachable(failure, state),
        )

    async def robots_txt(self, url: str) -> tuple[int, str] | None:
        """``(status, text)`` of a robots.txt, or None if it could not be had in time."""
        assert self._session is not None
        try:
            async with asyncio.timeout(self._hosts.robots_timeout):
                async with self._session.get(url, max_redirects=self._cfg.max_redirects) as resp:
                    body = await resp.content.read(ROBOTS_MAX_BYTES)
                    return resp.status, body.decode("utf-8", errors="replace")
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None

    async def _get(
        self, url: str, headers: dict[str, str], state: _Progress
    ) -> Fetched | FetchFailed | NotModified:
        assert self._session is not None, "use Fetcher as an async context manager"
        get = self._session.get(
            request_url(url), headers=headers, max_redirects=self._cfg.max_redirects
        )
        async with get as resp:
            state.final_url, state.status = str(resp.url), resp.status
            ctype = resp.content_type if resp.headers.get("Content-Type") else None

            def failed(kind: str, detail: str, retry_after: float | None = None) -> FetchFailed:
                return FetchFailed(
                    Failure(kind, detail), state.final_url, resp.status, ctype, retry_after
                )

            if resp.status == 304 and headers:
                return NotModified(state.final_url)
            if not 200 <= resp.status < 300:
                return failed(http_error(resp.status), resp.reason or "", retry_after(resp.headers))
            if tags := self._opted_out(resp.headers):
                return failed(ErrorKind.OPT_OUT, f"X-Robots-Tag: {tags}")
            length = resp.content_length
            if length is not None and length > self._cfg.max_bytes:
                return failed(
                    ErrorKind.TOO_LARGE,
                    f"Content-Length {length} > max_bytes {self._cfg.max_bytes}",
                )

            body = bytearray()
            fmt: str | None = None
            sized = False
            started = time.monotonic()
            async for chunk in resp.content.iter_any():
                body += chunk
                if len(body) > self._cfg.max_bytes:
                    return failed(ErrorKind.TOO_LARGE, f"body over max_bytes {self._cfg.max_bytes}")
                if fmt is None and len(body) >= SNIFF_BYTES:
                    fmt, problem = self._sniff(body, ctype)
                    if problem:
                        return failed(ErrorKind.NOT_AN_IMAGE, problem)
                if fmt is not None and not sized and len(body) <= PROBE_LIMIT:
                    sized, problem_failure = self._check_header(body, fmt)
                    if problem_failure is not None:
                        return failed(problem_failure.kind, problem_failure.detail)
                elapsed = time.monotonic() - started
                if elapsed > self._cfg.min_rate_grace and len(body) / elapsed < self._cfg.min_rate:
                    rate = len(body) / elapsed
                    return failed(
                        ErrorKind.TIMEOUT,
                        f"transfer at {rate:.0f} B/s, below min_rate {self._cfg.min_rate}",
                    )
            if fmt is None:  # a body shorter than the magic bytes
                fmt, problem = self._sniff(body, ctype)
                if problem:
                    return failed(ErrorKind.NOT_AN_IMAGE, problem)
            assert fmt is not None
            return Fetched(
                bytes(body),
                state.final_url,
                resp.status,
                ctype,
                fmt,
                _type_note(ctype, fmt),
                resp.headers.get("ETag"),
                resp.headers.get("Last-Modified"),
            )

    def _sniff(self, body: bytearray, ctype: str | None) -> tuple[str | None, str | None]:
        """The format the first bytes say, and why it is unwanted, if it is."""
        fmt = sniff(body[:SNIFF_BYTES])
        if fmt is None:
            return None, f"the bytes are not an image (Content-Type {ctype or 'missing'})"
        if fmt not in self._formats:
            return fmt, f"{fmt} is not an allowed format"
        return fmt, None

    def _check_header(self, body: bytearray, fmt: str) -> tuple[bool, Failure | None]:
        size = dimensions(body, fmt)  # no copy: called for every chunk until found
        if size is None:
            return False, None
        return True, check_geometry(size[0], size[1], self._limits)

    def _opted_out(self, headers: CIMultiDictProxy[str]) -> str:
        if not self._hosts.respect_opt_out:
            return ""
        found = []
        for value in headers.getall("X-Robots-Tag", ()):
            # "noai, noimageai" or "otherbot: noindex": directives after an optional agent name
            _, _, directives = value.rpartition(":") if ":" in value else ("", "", value)
            found += [
                d.strip().lower()
                for d in directives.split(",")
                if d.strip().lower() in self._opt_out
            ]
        return ", ".join(found)


def request_url(url: str) -> URL:
    """The URL to send: ``url`` (normalised by ``sources.check_url``) byte for byte.

    Given a string, yarl would re-quote it, decoding escapes the normaliser
    keeps on purpose (``%3D`` sent as ``=``, ``%2A`` as ``*``): a different
    request for a server that tells them apart, a broken signature on a signed
    URL. Only a ``%`` that starts no escape is encoded, as yarl would: it
    cannot go on the wire bare.
    """
    return URL(STRAY_PERCENT.sub("%25", url), encoded=True)


class _Progress:
    """How far an attempt got, for the record of one that fails midway."""

    final_url: str | None = None
    status: int | None = None


def retry_after(headers: CIMultiDictProxy[str]) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date), None if absent or bad."""
    value = headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def classify(exc: BaseException, in_body: bool = False) -> Failure:
    """Map a client-side exception to an error kind (order matters: subclasses first).

    ``in_body``: the response headers had arrived, so a protocol error is a
    broken body (a bad chunk, a short read), not a failure to connect.
    """
    detail = (str(exc) or type(exc).__name__)[:300]
    kind: ErrorKind
    if blocked_cause(exc) is not None:
        kind = ErrorKind.BLOCKED_ADDRESS
    elif isinstance(exc, TimeoutError):
        kind = ErrorKind.TIMEOUT
    elif isinstance(exc, aiohttp.TooManyRedirects):
        kind = ErrorKind.TOO_MANY_REDIRECTS
    elif isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        kind = ErrorKind.INVALID_URL
    elif isinstance(exc, aiohttp.ClientConnectorDNSError):
        kind = ErrorKind.DNS
    elif isinstance(exc, aiohttp.ClientPayloadError) or (
        in_body and isinstance(exc, aiohttp.ClientResponseError)
    ):
        kind = ErrorKind.TRUNCATED
    else:
        kind = ErrorKind.CONNECTION
    return Failure(kind, detail)


def _unreachable(failure: Failure, state: _Progress) -> bool:
    return failure.kind in (ErrorKind.CONNECTION, ErrorKind.DNS) or (
        failure.kind == ErrorKind.TIMEOUT and state.final_url is None
    )


def _type_note(ctype: str | None, fmt: str) -> str | None:
    """A note when the server's Content-Type disagrees with what the bytes are."""
    if ctype is None:
        return f"no Content-Type; the bytes are {fmt}"
    if not ctype.startswith("image/") or _MIME_SUBTYPES.get(fmt, "") not in ctype:
        return f"Content-Type {ctype} but the bytes are {fmt}"
    return None
