"""``make demo``: a self-contained crawl, offline.

Generates a handful of sample images (and a few things that are not images),
serves them from 127.0.0.1 on a background thread, crawls them with the real
command line into ``downloads/``, stops the server and says where to look.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

from aiohttp import web

from crawler import samples
from crawler.__main__ import main as crawler_main

SITE = Path(".demo")


def build_site(root: Path) -> list[str]:
    """Write the sample files; return the URL paths to crawl, broken ones included."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (body, _) in samples.sample_set().items():
        (root / name).write_bytes(body)
        paths.append(f"/{name}")
    return [*paths, "/missing.jpg", "/photo-1.jpg#same-image-again"]


class _Server(threading.Thread):
    """An aiohttp static server on its own loop, so the crawl runs as it would against any site."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.port = 0
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._shutdown: asyncio.Event | None = None

    def run(self) -> None:
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_static("/", self.root)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = runner.addresses[0][1]
        self._shutdown = asyncio.Event()
        self._ready.set()
        await self._shutdown.wait()
        await runner.cleanup()

    def __enter__(self) -> _Server:
        self.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._shutdown is not None:
            self._loop.call_soon_threadsafe(self._shutdown.set)
        self.join(10)


def main() -> int:
    paths = build_site(SITE / "site")
    with _Server(SITE / "site") as server:
        base = f"http://127.0.0.1:{server.port}"
        urls = SITE / "urls.txt"
        lines = [f"{base}{p}" for p in paths]
        lines += ["ftp://example.invalid/not-http.jpg", "not a url"]
        urls.write_text(
            "# make demo: sample images served from 127.0.0.1\n" + "\n".join(lines) + "\n"
        )
        print(f"serving {len(paths)} sample files at {base}; crawling {urls}", file=sys.stderr)
        code = crawler_main([str(urls), "--out", "downloads", "--thumb-size", "256"])
    print(
        "\nthumbnails: downloads/thumbs/256/   originals: downloads/images/\n"
        "manifest:   downloads/manifest.jsonl (one JSON record per URL)",
        file=sys.stderr,
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
