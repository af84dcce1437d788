"""``crawl(entries, settings)``: the stages wired together.

1. A reader streams entries from the source, checks and dedups each URL, and
   records at once the ones that need no fetch (invalid, repeated). It admits
   at most ``max_pending`` URLs into the crawl at a time: when the fetchers
   fall behind, reading waits, so memory does not follow the list's length.
2. Admitted URLs wait in their host's queue; the host scheduler starts a fetch
   whenever a global slot (``concurrency``) is free and the host's politeness
   rules allow one more request (see ``hosts.py``).
3. A fetch is one attempt through the shared session. A transient failure
   goes back to the host's queue with a backoff (or the server's
   Retry-After) instead of sleeping in a slot.
4. A body hands its fetch slot back as soon as a processing slot is free
   (so fetching can't outrun the pool by more than a few bodies) and goes to
   the process pool: decode, validate, thumbnail, hash.
5. The original and its thumbnails are stored by content hash.
6. Every entry ends as exactly one manifest record: ok, failed or skipped.

The executor is injected, so the same function runs on one machine with a
process pool or inside a cluster worker with an inline executor.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import aiofiles.os

from crawler.errors import RETRYABLE_KINDS, SKIP_KINDS, ErrorKind, retryable_status
from crawler.fetch import Fetcher
from crawler.hosts import Outcome, Scheduler
from crawler.models import Failure, Fetched, FetchFailed, ImageJob, Record, Status, UrlEntry
from crawler.pool import ImagePool
from crawler.report import Progress, Stats, Summary
from crawler.robots import RobotsCache
from crawler.settings import Settings
from crawler.sources import check_url
from crawler.state import CrawlState
from crawler.store import Store

log = logging.getLogger(__name__)


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
    reporter = asyncio.create_task(Progress(stats, enabled=progress).run())
    try:
        async with CrawlState(out) as state, Fetcher(settings) as fetcher:
            store = Store(out, settings.image.thumb_spec().ext)
            run = _Run(
                settings=settings, state=state, fetcher=fetcher, pool=pool, store=store, stats=stats
            )
            await run.go(entries)
    finally:
        reporter.cancel()
        await asyncio.gather(reporter, return_exceptions=True)
        if executor is None:
            await pool.shutdown()
    return stats.summary()


@dataclass(eq=False)
class _Pending:
    """One admitted URL on its way through; lives on the event loop only."""

    entry: UrlEntry
    url: str
    host: str
    started: float
    fetched_at: str
    attempts: int = 0


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
        self.admitted = asyncio.Semaphore(settings.crawl.max_pending)
        # Enough bodies queued for the pool that no worker waits on the network.
        self.processing = asyncio.Semaphore(max(4, 2 * settings.pool.size))
        self.robots = RobotsCache(fetcher.robots_txt, settings.fetch.user_agent)
        self.scheduler: Scheduler[_Pending] = Scheduler(
            settings.hosts.policy(), settings.crawl.concurrency, self._fetch, self._unreachable
        )
        self.tasks: asyncio.TaskGroup | None = None

    async def go(self, entries: AsyncIterator[UrlEntry]) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                self.tasks = tg
                await self._read(entries)
                await self.scheduler.wait_idle()
        finally:
            self.scheduler.cancel()

    async def _read(self, entries: AsyncIterator[UrlEntry]) -> None:
        async for entry in entries:
            await self.admitted.acquire()
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
                parts = urlsplit(url)
                host = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
                now = datetime.now(UTC).isoformat(timespec="seconds")
                self.scheduler.submit(host, _Pending(entry, url, host, time.monotonic(), now))

    async def _fetch(self, item: _Pending) -> None:
        """Scheduler work: one attempt; then retry later, record, or pass the body on."""
        try:
            if self.settings.hosts.respect_robots and not await self.robots.allowed(item.url):
                failure = Failure(ErrorKind.ROBOTS, "disallowed by robots.txt")
                await self._record(self._base(item, failure=failure))
                return
            item.attempts += 1
            result = await self.fetcher.attempt(item.url)
            if isinstance(result, FetchFailed):
                await self._failed_attempt(item, result)
                return
            self.scheduler.done(item.host, Outcome.OK)
            await self.processing.acquire()
        except Exception as exc:
            await self._internal(item, exc)
            return
        assert self.tasks is not None
        self.tasks.create_task(self._process(item, result))

    async def _failed_attempt(self, item: _Pending, result: FetchFailed) -> None:
        status, kind = result.http_status, result.failure.kind
        throttled = status in (429, 503) or kind == ErrorKind.TIMEOUT
        outcome = (
            Outcome.UNREACHABLE
            if result.unreachable
            else Outcome.THROTTLED
            if throttled
            else Outcome.OK
        )
        wait = result.retry_after
        ceiling = self.settings.fetch.retry_after_max
        self.scheduler.done(item.host, outcome, pause=min(wait or 0.0, ceiling))

        retryable = kind in RETRYABLE_KINDS or (status is not None and retryable_status(status))
        if not retryable or item.attempts >= self.settings.fetch.max_attempts:
            await self._record(self._base(item, fetched=result, failure=result.failure))
        elif wait is not None and wait > ceiling:
            detail = f"Retry-After {wait:.0f}s is beyond retry_after_max {ceiling:g}s"
            failure = Failure(ErrorKind.RATE_LIMITED, detail)
            await self._record(self._base(item, fetched=result, failure=failure))
        else:
            self.scheduler.submit(
                item.host, item, wait if wait is not None else self._backoff(item.attempts)
            )

    async def _process(self, item: _Pending, fetched: Fetched) -> None:
        try:
            record = await self._image(item, fetched)
        except Exception as exc:
            await self._internal(item, exc)
            return
        finally:
            self.processing.release()
        await self._record(record)

    async def _image(self, item: _Pending, fetched: Fetched) -> Record:
        base = self._base(item, fetched=fetched)
        image = self.settings.image
        job = ImageJob(
            fetched.body,
            self.spec,
            image.max_pixels,
            image.formats,
            image.min_width,
            image.min_height,
            image.max_aspect_ratio,
        )
        result = await self.pool.process(job)
        if isinstance(result, Failure):
            return self._base(item, fetched=fetched, failure=result)
        first = self.state.claim(result.sha256, item.entry.url)
        if first is None:
            try:
                path, thumbs = await self.store.save(result, fetched.body)
            except OSError as exc:
                self.state.release(result.sha256, item.entry.url)
                failure = Failure(ErrorKind.STORAGE, str(exc.strerror or exc))
                return self._base(item, fetched=fetched, failure=failure)
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
            detail=fetched.note,
        )

    async def _unreachable(self, item: _Pending) -> None:
        """Scheduler reject: the host's breaker is open, fail without a request."""
        failure = Failure(ErrorKind.HOST_UNREACHABLE, f"{item.host} failed repeatedly; not tried")
        await self._record(self._base(item, failure=failure))

    async def _internal(self, item: _Pending, exc: Exception) -> None:
        log.exception("internal error on %s", item.entry.url)
        failure = Failure(ErrorKind.INTERNAL, f"{type(exc).__name__}: {exc}")
        await self._record(self._base(item, failure=failure))

    def _base(
        self,
        item: _Pending,
        *,
        fetched: Fetched | FetchFailed | None = None,
        failure: Failure | None = None,
    ) -> Record:
        """The record as far as ``item`` got: fetch facts, and the failure if there is one."""
        record = Record(
            url=item.entry.url,
            status="failed",
            meta=item.entry.meta,
            fetched_at=item.fetched_at,
            attempts=item.attempts,
            elapsed_ms=round((time.monotonic() - item.started) * 1000),
        )
        if fetched is not None:
            record = replace(
                record,
                http_status=fetched.http_status,
                final_url=fetched.final_url,
                content_type=fetched.content_type,
                bytes=len(fetched.body) if isinstance(fetched, Fetched) else None,
            )
        if failure is not None:
            status: Status = "skipped" if failure.kind in SKIP_KINDS else "failed"
            record = replace(
                record, status=status, error=str(failure.kind), detail=failure.detail or None
            )
        return record

    def _backoff(self, attempt: int) -> float:
        cfg = self.settings.fetch
        return random.uniform(0, min(cfg.backoff_max, cfg.backoff_base * 2 ** (attempt - 1)))

    async def _record(self, record: Record) -> None:
        self.stats.add(record)
        self.admitted.release()
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
