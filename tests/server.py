"""A real HTTP server on loopback for tests, with routes named after what they do.

``/img/{name}`` serves bodies a test registers with ``add``; every other route
produces one behaviour of the real web (slow, hung, reset, truncated, endless,
throttling, redirecting, lying about types, opting out). Requests are counted
by path, and concurrency is tracked per Host header, so one server listening
on several loopback addresses stands in for several hosts.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import zlib
from collections import Counter, defaultdict
from functools import cache

from aiohttp import web
from aiohttp.typedefs import Handler

from crawler import samples


class LocalServer:
    def __init__(self, addresses: tuple[str, ...] = ("127.0.0.1",)) -> None:
        self.addresses = addresses
        self.files: dict[str, tuple[bytes, str]] = {}
        self.hits: Counter[str] = Counter()
        self.times: defaultdict[str, list[float]] = defaultdict(list)
        self.headers_seen: list[dict[str, str]] = []
        self.targets: list[str] = []  # request targets as they came on the wire
        self.active: Counter[str] = Counter()  # requests in progress, by Host
        self.peak: Counter[str] = Counter()  # the most ever in progress, by Host
        self.peak_total = 0
        self.sent: Counter[str] = Counter()  # body bytes written, by path
        self.robots = ""  # served at /robots.txt when set (404 otherwise)
        self.gate = asyncio.Event()  # /held waits on this
        self.gate.set()
        self.delay = 0.0  # /img waits this long first
        self.not_modified = 0  # 304s answered to conditional requests
        self._runner: web.AppRunner | None = None
        self.port = 0

    def add(self, name: str, body: bytes, content_type: str = "application/octet-stream") -> str:
        self.files[name] = (body, content_type)
        return self.url(f"/img/{name}")

    def url(self, path: str, address: str | None = None) -> str:
        return f"http://{address or self.addresses[0]}:{self.port}{path}"

    async def start(self) -> None:
        app = web.Application(middlewares=[self._count])
        routes = {
            "/robots.txt": self._robots,
            "/img/{name}": self._file,
            "/private/img/{name}": self._file,
            "/held/{name}": self._held,
            "/status/{code}": self._status,
            "/redirect/{n}/{name}": self._redirect,
            "/redirect-loop": self._loop,
            "/redirect-to-file": self._to_file,
            "/redirect-host/{address}/{name}": self._to_host,
            "/drip": self._drip,
            "/hang": self._hang,
            "/reset": self._reset,
            "/reset-mid-body": self._reset_mid_body,
            "/short-body": self._short_body,
            "/broken-chunked": self._broken_chunked,
            "/endless": self._endless,
            "/gzip-bomb": self._gzip_bomb,
            "/429-then-ok/{name}": self._throttle_once,
            "/503-twice-then-ok/{name}": self._unavailable_twice,
            "/429-for-an-hour": self._throttle_long,
            "/html-as-jpeg": self._html_as_jpeg,
            "/header-bomb": self._header_bomb,
            "/noai/{name}": self._noai,
            "/cookie/{name}": self._cookie,
        }
        for path, handler in routes.items():
            app.router.add_get(path, handler)
        # Handlers that hang or drip must not hold up the end of a test.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        first = web.TCPSite(self._runner, self.addresses[0], 0)
        await first.start()
        self.port = self._runner.addresses[0][1]
        for address in self.addresses[1:]:
            await web.TCPSite(self._runner, address, self.port).start()

    async def stop(self) -> None:
        self.gate.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> LocalServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.hits[request.path] += 1
        self.times[request.path].append(time.monotonic())
        self.headers_seen.append(dict(request.headers))
        self.targets.append(request.raw_path)
        host = request.host
        self.active[host] += 1
        self.peak[host] = max(self.peak[host], self.active[host])
        self.peak_total = max(self.peak_total, sum(self.active.values()))
        try:
            return await handler(request)
        finally:
            self.active[host] -= 1

    async def _robots(self, request: web.Request) -> web.Response:
        if not self.robots:
            raise web.HTTPNotFound()
        return web.Response(text=self.robots)

    async def _file(self, request: web.Request) -> web.Response:
        if self.delay:
            await asyncio.sleep(self.delay)
        name = request.match_info["name"]
        if name not in self.files:
            raise web.HTTPNotFound()
        body, content_type = self.files[name]
        etag = f'"{hashlib.sha256(body).hexdigest()[:16]}"'
        if request.headers.get("If-None-Match") == etag:
            self.not_modified += 1
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(body=body, content_type=content_type, headers={"ETag": etag})

    async def _held(self, request: web.Request) -> web.Response:
        await self.gate.wait()
        return await self._file(request)

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="status page")

    async def _redirect(self, request: web.Request) -> web.Response:
        n, name = int(request.match_info["n"]), request.match_info["name"]
        raise web.HTTPFound(f"/img/{name}" if n <= 1 else f"/redirect/{n - 1}/{name}")

    async def _loop(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/redirect-loop")

    async def _to_host(self, request: web.Request) -> web.Response:
        address, name = request.match_info["address"], request.match_info["name"]
        raise web.HTTPFound(f"http://{address}:{self.port}/img/{name}")

    async def _to_file(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("file:///etc/passwd")

    async def _drip(self, request: web.Request) -> web.StreamResponse:
        """One byte every ``every`` seconds: each read arrives before any read timeout."""
        every = float(request.query.get("every", "0.2"))
        resp = web.StreamResponse(headers={"Content-Type": "image/png", "Content-Length": "100000"})
        await resp.prepare(request)
        body = samples.png_alpha()
        for i in range(100_000):
            await resp.write(body[i : i + 1] or b"\0")
            self.sent[request.path] += 1
            await asyncio.sleep(every)
        return resp

    async def _hang(self, request: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def _reset(self, request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.abort()
        await asyncio.sleep(0.1)
        raise web.HTTPInternalServerError()

    async def _reset_mid_body(self, request: web.Request) -> web.StreamResponse:
        body = samples.photo_jpeg(640, 480, seed=1)
        resp = web.StreamResponse(
            headers={"Content-Type": "image/jpeg", "Content-Length": str(len(body))}
        )
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return resp

    async def _short_body(self, request: web.Request) -> web.StreamResponse:
        body = samples.photo_jpeg(640, 480, seed=2)
        resp = web.StreamResponse(
            headers={"Content-Type": "image/jpeg", "Content-Length": str(len(body) + 5000)}
        )
        await resp.prepare(request)
        await resp.write(body)
        assert request.transport is not None
        request.transport.close()
        return resp

    async def _broken_chunked(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(samples.photo_jpeg(320, 240, seed=3)[:5000])
        await asyncio.sleep(0.05)  # headers and the first chunk are read, then the stream breaks
        if request.transport is not None:
            request.transport.write(b"zz-not-a-chunk-size\r\n garbage")
            request.transport.close()
        return resp

    async def _endless(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        chunk = samples.png_alpha()[:64] + b"\0" * (65536 - 64)
        try:
            while True:
                await resp.write(chunk)
                self.sent[request.path] += len(chunk)
                chunk = b"\0" * 65536
        except (ConnectionError, RuntimeError):
            return resp

    async def _gzip_bomb(self, request: web.Request) -> web.Response:
        return web.Response(
            body=_gzip_bomb(), headers={"Content-Type": "image/png", "Content-Encoding": "gzip"}
        )

    async def _throttle_once(self, request: web.Request) -> web.Response:
        if self.hits[request.path] == 1:
            return web.Response(status=429, headers={"Retry-After": "1"}, text="slow down")
        return await self._file(request)

    async def _unavailable_twice(self, request: web.Request) -> web.Response:
        if self.hits[request.path] <= 2:
            return web.Response(status=503, text="try later")
        return await self._file(request)

    async def _throttle_long(self, request: web.Request) -> web.Response:
        return web.Response(
            status=429, headers={"Retry-After": "3600"}, text="come back in an hour"
        )

    async def _html_as_jpeg(self, request: web.Request) -> web.Response:
        return web.Response(body=samples.html_page() * 5000, content_type="image/jpeg")

    async def _header_bomb(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        await resp.prepare(request)
        await resp.write(samples.bomb_png())
        try:
            for _ in range(320):  # 20 MiB of "pixel data", if anyone reads it
                await resp.write(b"\0" * 65536)
                self.sent[request.path] += 65536
        except (ConnectionError, RuntimeError):
            pass
        return resp

    async def _cookie(self, request: web.Request) -> web.Response:
        resp = await self._file(request)
        resp.set_cookie("session", "tracked")
        return resp

    async def _noai(self, request: web.Request) -> web.Response:
        resp = await self._file(request)
        resp.headers["X-Robots-Tag"] = "otherbot: noindex, noai"
        return resp


@cache
def _gzip_bomb() -> bytes:
    """About 200 KB that inflates to a PNG signature and 200 MB of zeros."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"\0" * (1 << 20)
    head = compressor.compress(samples.png_alpha()[:64])  # sniffs as an image
    return head + b"".join(compressor.compress(block) for _ in range(200)) + compressor.flush()
