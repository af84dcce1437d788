"""A real HTTP server on 127.0.0.1 for tests, with routes named after what they do.

``/img/{name}`` serves bodies a test registers with ``add``; the other routes
produce one behaviour each. Every request is counted by path.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from aiohttp import web
from aiohttp.typedefs import Handler


class LocalServer:
    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        self.hits: Counter[str] = Counter()
        self.headers_seen: list[dict[str, str]] = []
        self.gate = asyncio.Event()  # /held waits on this
        self.gate.set()
        self._runner: web.AppRunner | None = None
        self.port = 0

    def add(self, name: str, body: bytes, content_type: str = "application/octet-stream") -> str:
        self.files[name] = (body, content_type)
        return self.url(f"/img/{name}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def start(self) -> None:
        app = web.Application(middlewares=[self._count])
        app.router.add_get("/img/{name}", self._file)
        app.router.add_get("/held/{name}", self._held)
        app.router.add_get("/status/{code}", self._status)
        app.router.add_get("/redirect/{n}/{name}", self._redirect)
        app.router.add_get("/redirect-loop", self._loop)
        app.router.add_get("/redirect-to-file", self._to_file)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.hits[request.path] += 1
        self.headers_seen.append(dict(request.headers))
        return await handler(request)

    async def _file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.files:
            raise web.HTTPNotFound()
        body, content_type = self.files[name]
        return web.Response(body=body, content_type=content_type)

    async def _held(self, request: web.Request) -> web.Response:
        await self.gate.wait()
        return await self._file(request)

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="status page")

    async def _redirect(self, request: web.Request) -> web.Response:
        n, name = int(request.match_info["n"]), request.match_info["name"]
        target = f"/img/{name}" if n <= 1 else f"/redirect/{n - 1}/{name}"
        raise web.HTTPFound(target)

    async def _loop(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/redirect-loop")

    async def _to_file(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("file:///etc/passwd")
