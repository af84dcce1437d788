"""``crawl(entries, settings)``: the stages wired together.

1. A reader streams entries from the source, checks and dedups each URL, and
   records the ones that need no fetch (invalid, repeated) at once.
2. It feeds a bounded queue: when the fetchers fall behind, reading waits.
3. ``concurrency`` fetch workers take URLs off the queue and fetch them
   through the one shared session.
4. Each body goes to the process pool (decode, validate, thumbnail, hash).
5. The original and its thumbnails are stored by content hash.
6. Every entry ends as exactly one manifest record: ok, failed or skipped.

The executor is injected, so the same function runs on one machine with a
process pool or inside a cluster worker with an inline executor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import aiofiles.os

from crawler.errors import ErrorKind
from crawler.fetch import Fetcher
from crawler.models import Failure, FetchFailed, ImageJob, Record, UrlEntry
from crawler.pool import ImagePool
from crawler.report import Progress, Stats, Summary
from crawler.settings import Settings
from crawler.sources import check_url
from crawler.state import CrawlState
from crawler.store import Store

log = logging.getLogger(__name__)
_DONE = None


async def crawl(
    entries: AsyncIterator[UrlEntry],
    settings: Settings,
    *,
    executor: Executor | None = None,
    stats: Stats | None = None,
    progress: bool = False,
) -> Summary:
    """Crawl every entry into ``settings.crawl.out``; returns the summary."""
    out = Path(settings.crawl.out)
    await aiofiles.os.makedirs(out, exist_ok=True)
    stats = stats or Stats()
    pool = (
        ImagePool(executor)
        if executor is not None
        else ImagePool.from_settings(settings.pool, settings.image.max_pixels)
    )
    try:
        async with CrawlState(out) as state, Fetcher(settings.fetch, settings.crawl) as fetcher:
            store = Store(out, settings.image.thumb_spec().ext)
            run = _Run(
                settings=settings, state=state, fetcher=fetcher, pool=pool, store=store, stats=stats
            )
            await run.go(entries, progress)
    finally:
        if executor is None:
            await pool.shutdown()
    return stats.summary()


class _Run:
    def __init__(
        self,
        *,
        settings: Settings,
        state: CrawlState,
        fetcher: Fetcher,
        pool: ImagePool,
        store: Store,
        stats: Stats,
    ) -> None:
        self.settings = settings
        self.state = state
        self.fetcher = fetcher
        self.pool = pool
        self.store = store
        self.stats = stats
        self.spec = settings.image.thumb_spec()
        self.queue: asyncio.Queue[tuple[UrlEntry, str] | None] = asyncio.Queue(
            settings.crawl.queue_size
        )

    async def go(self, entries: AsyncIterator[UrlEntry], progress: bool) -> None:
        workers = self.settings.crawl.concurrency
        reporter = asyncio.create_task(Progress(self.stats, enabled=progress).run())
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._read(entries, workers))
                for _ in range(workers):
                    tg.create_task(self._work())
        finally:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)

    async def _read(self, entries: AsyncIterator[UrlEntry], workers: int) -> None:
        async for entry in entries:
            if entry.problem:
                await self._record(_failed(entry, Failure(ErrorKind.INVALID_URL, entry.problem)))
                continue
            url, reason = check_url(entry.url)
            if url is None:
                await self._record(_failed(entry, Failure(ErrorKind.INVALID_URL, reason)))
            elif not self.state.first_sighting(url):
                skipped = Record(entry.url, "skipped", detail="duplicate URL", meta=entry.meta)
                await self._record(skipped)
            else:
                await self.queue.put((entry, url))
        # Not in a ``finally``: on error or cancellation the task group stops the
        # workers itself, and a put into a full queue would never return.
        for _ in range(workers):
            await self.queue.put(_DONE)

    async def _work(self) -> None:
        while (item := await self.queue.get()) is not _DONE:
            entry, url = item
            try:
                record = await self._handle(entry, url)
            except Exception as exc:  # a bug in one URL's handling must not stop the crawl
                log.exception("internal error on %s", entry.url)
                record = _failed(entry, Failure(ErrorKind.INTERNAL, f"{type(exc).__name__}: {exc}"))
            await self._record(record)

    async def _handle(self, entry: UrlEntry, url: str) -> Record:
        started = time.monotonic()
        base = Record(
            url=entry.url,
            status="failed",
            meta=entry.meta,
            fetched_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )

        def fail(rec: Record, failure: Failure) -> Record:
            return replace(
                rec, error=str(failure.kind), detail=failure.detail or None, elapsed_ms=_ms(started)
            )

        fetched = await self.fetcher.fetch(url)
        if isinstance(fetched, FetchFailed):
            base = replace(
                base,
                http_status=fetched.http_status,
                final_url=fetched.final_url,
                attempts=fetched.attempts,
            )
            return fail(base, fetched.failure)

        body = fetched.body
        base = replace(
            base,
            http_status=fetched.http_status,
            final_url=fetched.final_url,
            content_type=fetched.content_type,
            bytes=len(body),
            attempts=fetched.attempts,
        )
        job = ImageJob(body, self.spec, self.settings.image.max_pixels, self.settings.image.formats)
        result = await self.pool.process(job)
        if isinstance(result, Failure):
            return fail(base, result)

        first = self.state.claim(result.sha256, entry.url)
        if first is None:
            try:
                path, thumbs = await self.store.save(result, body)
            except OSError as exc:
                self.state.release(result.sha256, entry.url)
                return fail(base, Failure(ErrorKind.STORAGE, str(exc.strerror or exc)))
        else:
            path, thumbs = self.store.paths(result)
        return replace(
            base,
            status="ok",
            sha256=result.sha256,
            phash=result.phash,
            width=result.width,
            height=result.height,
            format=result.format,
            path=path,
            thumbnails=thumbs,
            duplicate_of=first,
            elapsed_ms=_ms(started),
        )

    async def _record(self, record: Record) -> None:
        self.stats.add(record)
        await self.state.record(record)


def _failed(entry: UrlEntry, failure: Failure) -> Record:
    """The record of an entry that never reached the network."""
    return Record(
        url=entry.url,
        status="failed",
        error=str(failure.kind),
        detail=failure.detail,
        meta=entry.meta,
    )


def _ms(since: float) -> int:
    return round((time.monotonic() - since) * 1000)
