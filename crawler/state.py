"""What the crawl knows while it runs: URLs seen, content already stored, and the manifest.

This run's dedup lives in memory (8-byte digests of normalised URLs, and the
first URL of each stored sha256); the durable SQLite ledger that makes runs
resumable replaces it behind the same methods.

The manifest is written in batches through aiofiles: one JSON object per
line, one line per input URL.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import TracebackType

import aiofiles
from aiofiles.threadpool.text import AsyncTextIOWrapper

from crawler.models import Record

MANIFEST = "manifest.jsonl"
FLUSH_EVERY = 256


class CrawlState:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._seen: set[bytes] = set()
        self._first_url: dict[str, str] = {}
        self._pending: list[str] = []
        self._manifest: AsyncTextIOWrapper | None = None

    async def __aenter__(self) -> CrawlState:
        self._manifest = await aiofiles.open(self.root / MANIFEST, "w", encoding="utf-8")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._manifest is not None:
            await self.flush()
            await self._manifest.close()

    def first_sighting(self, key: str) -> bool:
        """True the first time a normalised URL is offered, False for every repeat."""
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        if digest in self._seen:
            return False
        self._seen.add(digest)
        return True

    def claim(self, sha256: str, url: str) -> str | None:
        """Claim content for ``url``; returns the URL that claimed it first, if another did."""
        first = self._first_url.setdefault(sha256, url)
        return None if first == url else first

    def release(self, sha256: str, url: str) -> None:
        """Give up a claim whose files could not be written, so a later copy may try again."""
        if self._first_url.get(sha256) == url:
            del self._first_url[sha256]

    async def record(self, record: Record) -> None:
        self._pending.append(record.to_json() + "\n")
        if len(self._pending) >= FLUSH_EVERY:
            await self.flush()

    async def flush(self) -> None:
        if self._manifest is None or not self._pending:
            return
        lines, self._pending = self._pending, []
        await self._manifest.write("".join(lines))
        await self._manifest.flush()
