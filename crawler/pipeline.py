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
5. The pool's slot is freed as soon as it answers; the original and its
   thumbnails are stored by content hash (a few images at a time), and only
   then does the ledger commit the URL's record.
6. Every entry ends as exactly one record: ok, failed or skipped. The ledger
   (``state.py``) remembers it, so a rerun does nothing twice.

``Engine`` holds what crawls share (session, host scheduler, pool): the
command line runs one crawl on it, the service one per job. The executor is
injected, so the same code runs on one machine with a process pool or inside
a cluster worker with an inline executor.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import aiofiles.os

from crawler.errors import RETRYABLE_KINDS, SKIP_KINDS, ErrorKind, retryable_status
from crawler.fetch import Fetcher
from crawler.guard import AddressPolicy
from crawler.hosts import Outcome, Scheduler
from crawler.models import (
    Failure,
    Fetched,
    FetchFailed,
    ImageJob,
    ImageResult,
    NotModified,
    Record,
    Status,
    UrlEntry,
)
from crawler.pool import ImagePool
from crawler.report import LoopLag, Progress, Stats, Summary
from crawler.robots import RobotsCache, robots_origin
from crawler.settings import Settings
from crawler.sources import check_url
from crawler.state import Ledger, Revisit, Verdict
from crawler.store import Store

log = logging.getLogger(__name__)
BATCH = 256
WINDOW_BYTES = 64 * 2**20  # bodies held for the pool, at most (one alone may be bigger)
DISK_FULL_RETRY = 1.0


async def crawl(
    entries: AsyncIterator[UrlEntry],
    settings: Settings,
    *,
    executor: Executor | None = None,
    stats: Stats | None = None,
    progress: bool = False,
    revisit: Revisit | None = None,
    stop: asyncio.Event | None = None,
) -> Summary:
    """Crawl every entry into ``settings.crawl.out``; returns the summary.

    Setting ``stop`` ends intake: URLs not yet read stay unread, the ones
    admitted are finished. Cancelling the call abandons what is in flight;
    it stays pending in the ledger for the next run.
    """
    async with Engine(settings, executor) as engine:
        return await engine.crawl(
            entries, settings, stats=stats, progress=progress, revisit=revisit, stop=stop
        )


class Engine:
    """What every crawl in a process shares: one session, one host scheduler, one process pool.

    The command line runs one crawl on it; the service runs one per job at
    the same time, so per-host limits and the pool are shared between jobs.
    """

    def __init__(
        self,
        settings: Settings,
        executor: Executor | None = None,
        policy: AddressPolicy | None = None,
    ) -> None:
        self.settings = settings
        self._own_pool = executor is None
        self.pool = (
            ImagePool(executor)
            if executor is not None
            else ImagePool.from_settings(settings.pool, settings.image.max_pixels)
        )
        self.fetcher = Fetcher(settings, policy)
        self.robots = RobotsCache(self.fetcher.robots_txt, settings.fetch.user_agent)
        self.scheduler: Scheduler[_Pending] = Scheduler(
            settings.hosts.policy(),
            settings.crawl.concurrency,
            lambda item: item.run.fetch(item),
            lambda item: item.run.unreachable(item),
            owner=lambda item: item.run,
        )

    async def __aenter__(self) -> Engine:
        await self.pool.start()
        await self.fetcher.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.scheduler.cancel()
        try:
            await self.fetcher.__aexit__(None, None, None)
        finally:
            if self._own_pool:
                await self.pool.shutdown()

    async def crawl(
        self,
        entries: AsyncIterator[UrlEntry],
        settings: Settings,
        *,
        stats: Stats | None = None,
        progress: bool = False,
        revisit: Revisit | None = None,
        stop: asyncio.Event | None = None,
        ledger_dir: Path | None = None,
    ) -> Summary:
        """One crawl on the shared engine. ``settings`` may differ from the engine's in
        what is per crawl: the output directory, image and retry options.

        ``ledger_dir`` (default: the output directory) holds this crawl's ledger
        and manifest; crawls that share an output directory (the service's
        jobs) share its files but keep their own ledgers. Temporary files are
        then not cleared here: another crawl may be writing them.
        """
        out = Path(settings.crawl.out)
        await aiofiles.os.makedirs(ledger_dir or out, exist_ok=True)
        stats = stats or Stats()
        lag = LoopLag()
        reporter = asyncio.create_task(Progress(stats, enabled=progress).run())
        lag_probe = asyncio.create_task(lag.run())
        try:
            store = Store(out, settings.image.thumb_spec().ext)
            if ledger_dir is None:
                await store.clean()
            async with Ledger(ledger_dir or out, revisit) as ledger:
                run = _Run(self, settings=settings, ledger=ledger, store=store, stats=stats)
                await run.go(entries, stop or asyncio.Event())
        finally:
            for task in (reporter, lag_probe):
                task.cancel()
            await asyncio.gather(reporter, lag_probe, return_exceptions=True)
        return stats.summary(lag)


@dataclass(eq=False)
class _Pending:
    """One admitted URL on its way through; lives on the event loop only."""

    run: _Run
    entry: UrlEntry
    url: str
    origin: str | None  # of its robots.txt; with the host key, from one urlsplit of the URL
    host: str
    started: float
    fetched_at: str
    attempts: int = 0
    etag: str | None = None  # set when revalidating (--refresh-after)
    last_modified: str | None = None


class _Run:
    def __init__(
        self, engine: Engine, *, settings: Settings, ledger: Ledger, store: Store, stats: Stats
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.fetcher = engine.fetcher
        self.pool = engine.pool
        self.robots = engine.robots
        self.scheduler = engine.scheduler
        self.store = store
        self.stats = stats
        self.spec = settings.image.thumb_spec()
        self.admitted = asyncio.Semaphore(settings.crawl.max_pending)
        self.open = 0  # admitted and not yet ended
        self.reading = True
        self.finished = asyncio.Event()
        # Enough bodies for the pool that no worker waits on the network, and
        # its batches fill while the workers are busy.
        self.processing = Window(self.pool.window, WINDOW_BYTES)
        # Bodies written to disk at once: the pool moves on while they are stored.
        self.storing = asyncio.Semaphore(16)
        self.tasks: asyncio.TaskGroup | None = None
        self.disk_ok = asyncio.Event()
        self.disk_ok.set()

    async def go(self, entries: AsyncIterator[UrlEntry], stop: asyncio.Event) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                self.tasks = tg
                await self._read(entries, stop)
                self.reading = False
                if self.open == 0:
                    self.finished.set()
                await self.finished.wait()
        finally:
            self.scheduler.discard(lambda item: item.run is self)

    def _release(self) -> None:
        """One admitted URL has ended (recorded, or needing no record)."""
        self.admitted.release()
        self.open -= 1
        if self.open == 0 and not self.reading:
            self.finished.set()

    async def _read(self, entries: AsyncIterator[UrlEntry], stop: asyncio.Event) -> None:
        """Admit entries in batches (one ledger transaction each), never past ``max_pending``."""
        batch: list[tuple[UrlEntry, str | None, str]] = []
        limit = min(BATCH, self.settings.crawl.max_pending)
        async for entry in entries:
            if stop.is_set():
                break
            if self.admitted.locked() and batch:
                await self._admit(batch)
                batch = []
            await self.admitted.acquire()
            self.open += 1
            await self.disk_ok.wait()
            url, reason = (None, entry.problem) if entry.problem else check_url(entry.url)
            batch.append((entry, url, reason))
            if len(batch) >= limit:
                await self._admit(batch)
                batch = []
        if batch:
            await self._admit(batch)

    async def _admit(self, batch: list[tuple[UrlEntry, str | None, str]]) -> None:
        verdicts = await self.ledger.admit([(entry.url, url) for entry, url, _ in batch])
        for (entry, url, reason), admission in zip(batch, verdicts, strict=True):
            verdict = admission.verdict
            if verdict is Verdict.DONE:
                self.stats.already += 1
                self._release()
            elif verdict is Verdict.INVALID:
                await self._record(_failed(entry, Failure(ErrorKind.INVALID_URL, reason)))
            elif verdict is Verdict.DUPLICATE:
                detail = f"duplicate of {admission.duplicate_of}"
                await self._record(Record(entry.url, "skipped", detail=detail, meta=entry.meta))
            else:
                assert url is not None
                parts = urlsplit(url)  # valid: check_url split it already
                hostname, port = parts.hostname, parts.port
                host = f"{hostname}:{port or (443 if parts.scheme == 'https' else 80)}"
                origin = robots_origin(parts.scheme, hostname, port)
                now = datetime.now(UTC).isoformat(timespec="seconds")
                item = _Pending(self, entry, url, origin, host, time.monotonic(), now)
                item.etag, item.last_modified = admission.etag, admission.last_modified
                self.scheduler.submit(host, item)

    async def fetch(self, item: _Pending) -> None:
        """Scheduler work: one attempt; then retry later, record, or pass the body on."""
        try:
            if self.settings.hosts.respect_robots and not await self.robots.allowed_at(
                item.origin, item.url
            ):
                failure = Failure(ErrorKind.ROBOTS, "disallowed by robots.txt")
                await self._record(self._base(item, failure=failure))
                return
            item.attempts += 1
            result = await self.fetcher.attempt(item.url, item.etag, item.last_modified)
            if isinstance(result, NotModified):
                self.scheduler.done(item.host, Outcome.OK)
                await self.ledger.still_fresh(item.entry.url)
                self.stats.already += 1
                self._release()
                return
            if isinstance(result, FetchFailed):
                await self._failed_attempt(item, result)
                return
            self.scheduler.done(item.host, Outcome.OK)
            await self.processing.acquire(len(result.body))
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
        await self._record(record, fetched)

    async def _image(self, item: _Pending, fetched: Fetched) -> Record:
        base = self._base(item, fetched=fetched)
        try:
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
        finally:
            # The slot is the pool's: free it before storage, or the workers
            # wait while files are written and fsynced.
            self.processing.release(len(fetched.body))
        if isinstance(result, Failure):
            return self._base(item, fetched=fetched, failure=result)
        first = await self.ledger.first_url(result.sha256, item.entry.url)
        if first is None:
            try:
                async with self.storing:
                    path, thumbs = await self._save(result, fetched.body)
            except OSError as exc:
                self.ledger.release(result.sha256, item.entry.url)
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

    async def _save(self, result: ImageResult, body: bytes) -> tuple[str, dict[str, str]]:
        """Store the files; while the disk is full, hold intake and keep trying.

        A full disk is not the image's fault: recording it as failed would lose
        a good image, so the item waits (still pending in the ledger if killed).
        """
        delay = DISK_FULL_RETRY
        while True:
            try:
                saved = await self.store.save(result, body)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                if self.disk_ok.is_set():
                    log.warning("disk full under %s: intake paused, retrying", self.store.root)
                    self.disk_ok.clear()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            if not self.disk_ok.is_set():
                log.warning("disk has room again: intake resumed")
                self.disk_ok.set()
            return saved

    async def unreachable(self, item: _Pending) -> None:
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
        """The record as far as ``item`` got: fetch facts, and the failure if there is one.

        Built in one call: it is made for every URL, and each ``dataclasses.replace``
        cost more than the whole constructor (~40 us of a 404's ~600 us).
        """
        status: Status = "failed"
        error = detail = None
        if failure is not None:
            status = "skipped" if failure.kind in SKIP_KINDS else "failed"
            error, detail = str(failure.kind), failure.detail or None
        return Record(
            url=item.entry.url,
            status=status,
            error=error,
            detail=detail,
            http_status=None if fetched is None else fetched.http_status,
            final_url=None if fetched is None else fetched.final_url,
            content_type=None if fetched is None else fetched.content_type,
            bytes=len(fetched.body) if isinstance(fetched, Fetched) else None,
            meta=item.entry.meta,
            fetched_at=item.fetched_at,
            attempts=item.attempts,
            elapsed_ms=round((time.monotonic() - item.started) * 1000),
        )

    def _backoff(self, attempt: int) -> float:
        cfg = self.settings.fetch
        return random.uniform(0, min(cfg.backoff_max, cfg.backoff_base * 2 ** (attempt - 1)))

    async def _record(self, record: Record, fetched: Fetched | None = None) -> None:
        self.stats.add(record)
        self._release()
        if fetched is None:
            await self.ledger.record(record)
        else:
            await self.ledger.record(record, fetched.etag, fetched.last_modified)


class Window:
    """Bodies held for the pool: at most ``count`` of them and ``size`` bytes.

    A count alone would let a window of large images hold ``count * max_bytes``.
    One body is always let in, however big (``max_bytes`` bounds it), and
    waiters are served in order, so a big body is not overtaken forever.
    """

    def __init__(self, count: int, size: int) -> None:
        self._count = count
        self._size = size
        self._held = 0
        self._bytes = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    def _fits(self, n: int) -> bool:
        return self._held < self._count and (self._held == 0 or self._bytes + n <= self._size)

    def _take(self, n: int) -> None:
        self._held += 1
        self._bytes += n

    async def acquire(self, n: int) -> None:
        if not self._waiting and self._fits(n):
            self._take(n)
            return
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((n, future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(n)  # granted just as the waiter was cancelled
            raise

    def release(self, n: int) -> None:
        self._held -= 1
        self._bytes -= n
        while self._waiting and self._fits(self._waiting[0][0]):
            size, future = self._waiting.popleft()
            if not future.done():  # a cancelled waiter is dropped
                self._take(size)
                future.set_result(None)


def _failed(entry: UrlEntry, failure: Failure) -> Record:
    """The record of an entry that never reached the network."""
    return Record(
        url=entry.url,
        status="failed",
        error=str(failure.kind),
        detail=failure.detail,
        meta=entry.meta,
    )
