"""Crawl jobs: persisted, resumed after a restart, run side by side on one engine.

A job is a URL list and a few options. Its URLs are written to
``jobs/<id>/urls.txt`` and its row to ``jobs.sqlite`` before the submission
is acknowledged; its progress lives in its own ledger (``jobs/<id>/``), so a
restart, or a crash, picks every queued or running job up where it stopped:
the ledger knows which URLs are done. All jobs store files in the same
content-addressed tree and share the engine (connections, host limits, pool).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crawler.pipeline import Engine
from crawler.report import Stats
from crawler.settings import Settings, SettingsError, load_settings
from crawler.sources import open_source
from crawler.state import LEDGER

log = logging.getLogger(__name__)

JOBS_DB = "jobs.sqlite"
STATES = ("queued", "running", "done", "cancelled", "failed")
# What a submitter may choose per job: output-shaping and retry options. The
# rest (timeouts, host limits, SSRF policy, the pool) is the operator's.
JOB_OPTIONS: dict[str, tuple[str, str]] = {
    "thumb_sizes": ("image", "thumb_sizes"),
    "thumb_format": ("image", "thumb_format"),
    "thumb_quality": ("image", "thumb_quality"),
    "min_width": ("image", "min_width"),
    "min_height": ("image", "min_height"),
    "max_aspect_ratio": ("image", "max_aspect_ratio"),
    "max_attempts": ("fetch", "max_attempts"),
}


class JobError(Exception):
    """A submission or request the service refuses, with the HTTP status to answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Job:
    id: str
    state: str
    created: float
    urls: int
    options: dict[str, Any] = field(default_factory=dict)
    started: float | None = None
    finished: float | None = None
    error: str | None = None


class Jobs:
    """The job table and the jobs running now."""

    def __init__(self, root: Path, settings: Settings, engine: Engine) -> None:
        self.root = root
        self.settings = settings
        self.engine = engine
        self.live: dict[str, Stats] = {}  # running jobs' counters
        # Counters of the jobs that ended since start-up, summed: a service runs
        # for months, so one Stats per finished job would only ever grow.
        self.ended = Stats()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobs")
        self._db: sqlite3.Connection | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # one submission at a time: idempotency and caps
        self.accepting = False

    # --- lifecycle -------------------------------------------------------

    async def start(self) -> int:
        """Open the table, requeue jobs a stop or crash interrupted; returns how many."""
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)
        resumed: int = await self._call(self._open)
        self.accepting = True
        return resumed

    async def run(self) -> None:
        """Start queued jobs, oldest first, while fewer than ``max_running_jobs`` run."""
        while True:
            self._wake.clear()
            limit = self.settings.service.max_running_jobs - len(self._tasks)
            if limit > 0:
                for job in await self._call(self._queued, limit, frozenset(self._tasks)):
                    self._tasks[job.id] = asyncio.create_task(self._crawl(job))
            await self._wake.wait()

    async def stop(self, grace: float) -> None:
        """Let running jobs finish within ``grace``; the rest stay running in the table
        (and resume at the next start)."""
        self.accepting = False
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._call(self._close)
        self._thread.shutdown(wait=True)

    # --- requests --------------------------------------------------------

    async def submit(
        self, urls: Sequence[str], options: Mapping[str, Any], idempotency_key: str | None
    ) -> tuple[Job, bool]:
        """Persist a new job; returns it and whether it is new (False: same key seen)."""
        cfg = self.settings.service
        if not self.accepting:
            raise JobError(503, "not_ready", "the service is stopping")
        if not urls:
            raise JobError(400, "no_urls", "the job has no URLs")
        if len(urls) > cfg.max_urls_per_job:
            raise JobError(
                413, "too_many_urls", f"{len(urls)} URLs; at most {cfg.max_urls_per_job} per job"
            )
        self.job_settings(options)  # reject bad options before anything is stored
        async with self._lock:
            if idempotency_key and (known := await self._call(self._by_key, idempotency_key)):
                return known, False
            if await self._call(self._count_queued) >= cfg.max_queued_jobs:
                raise JobError(429, "queue_full", f"{cfg.max_queued_jobs} jobs are queued already")
            job = Job(secrets.token_hex(8), "queued", time.time(), len(urls), dict(options))
            folder = self.root / "jobs" / job.id
            await asyncio.to_thread(_write_urls, folder, urls)
            await self._call(self._insert, job, idempotency_key)
        self._wake.set()
        return job, True

    async def get(self, job_id: str) -> Job:
        job: Job | None = await self._call(self._get, job_id)
        if job is None:
            raise JobError(404, "no_such_job", f"no job {job_id}")
        return job

    async def page(self, limit: int, before: float | None) -> list[Job]:
        jobs: list[Job] = await self._call(self._page, limit, before)
        return jobs

    async def cancel(self, job_id: str) -> Job:
        job = await self.get(job_id)
        if job.state in ("done", "cancelled", "failed"):
            return job
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._call(self._set_state, job_id, "cancelled", None)
        return await self.get(job_id)

    async def counts(self, job: Job) -> dict[str, Any]:
        """Counts by status and error kind: live for a running job, else from its ledger."""
        if (stats := self.live.get(job.id)) is not None:
            return {"done": stats.done, **_counts(stats.by_status, stats.by_error)}
        ledger = self.root / "jobs" / job.id / LEDGER
        by_status, by_error = await asyncio.to_thread(_ledger_counts, ledger)
        return {"done": sum(by_status.values()), **_counts(by_status, by_error)}

    async def records(self, job_id: str, status: str | None) -> AsyncIterator[bytes]:
        """The job's manifest lines, read from its ledger in chunks (never all at once)."""
        await self.get(job_id)
        ledger = self.root / "jobs" / job_id / LEDGER
        if not ledger.exists():
            return
        rows = _ledger_records(ledger, status)
        while chunk := await asyncio.to_thread(next, rows, b""):
            yield chunk

    def job_settings(self, options: Mapping[str, Any]) -> Settings:
        overrides: dict[str, dict[str, Any]] = {"crawl": {"out": str(self.root), "progress": False}}
        for name, value in options.items():
            if name not in JOB_OPTIONS:
                allowed = ", ".join(JOB_OPTIONS)
                raise JobError(400, "bad_option", f"unknown option {name!r} (allowed: {allowed})")
            section, key = JOB_OPTIONS[name]
            overrides.setdefault(section, {})[key] = value
        base = {
            s.name: dataclasses.asdict(getattr(self.settings, s.name))
            for s in dataclasses.fields(self.settings)
        }
        for section, values in overrides.items():
            base[section].update(values)
        try:
            return load_settings(overrides=base)
        except SettingsError as exc:
            raise JobError(400, "bad_option", str(exc).replace("command line: ", "")) from None

    # --- running one job -------------------------------------------------

    async def _crawl(self, job: Job) -> None:
        stats = Stats()
        self.live[job.id] = stats
        folder = self.root / "jobs" / job.id
        try:
            await self._call(self._set_state, job.id, "running", None)
            source = open_source(str(folder / "urls.txt"))
            stats.total = job.urls
            await self.engine.crawl(
                source.entries(),
                self.job_settings(job.options),
                stats=stats,
                ledger_dir=folder,
            )
            await self._call(self._set_state, job.id, "done", None)
        except asyncio.CancelledError:
            raise  # cancel() or stop() decides what the job's state becomes
        except Exception as exc:
            log.exception("job %s failed", job.id)
            await self._call(self._set_state, job.id, "failed", f"{type(exc).__name__}: {exc}")
        finally:
            self.ended.absorb(self.live.pop(job.id))
            self._tasks.pop(job.id, None)
            self._wake.set()

    # --- the job table: runs on the jobs thread only ---------------------

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _open(self) -> int:
        self._db = sqlite3.connect(self.root / JOBS_DB, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, state TEXT NOT NULL,"
            " created REAL NOT NULL, started REAL, finished REAL, urls INTEGER NOT NULL,"
            " options TEXT NOT NULL, idempotency_key TEXT UNIQUE, error TEXT)"
        )
        cursor = self._db.execute("UPDATE jobs SET state = 'queued' WHERE state = 'running'")
        (queued,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()
        log.info("%d jobs to run (%d were interrupted)", queued, cursor.rowcount)
        return int(queued)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _rows(self, sql: str, *args: Any) -> list[Job]:
        assert self._db is not None
        cols = "id, state, created, urls, options, started, finished, error"
        return [
            Job(i, s, c, u, json.loads(o), st, f, e)
            for i, s, c, u, o, st, f, e in self._db.execute(f"SELECT {cols} FROM jobs {sql}", args)
        ]

    def _get(self, job_id: str) -> Job | None:
        found = self._rows("WHERE id = ?", job_id)
        return found[0] if found else None

    def _by_key(self, key: str) -> Job | None:
        found = self._rows("WHERE idempotency_key = ?", key)
        return found[0] if found else None

    def _page(self, limit: int, before: float | None) -> list[Job]:
        if before is None:
            return self._rows("ORDER BY created DESC LIMIT ?", limit)
        return self._rows("WHERE created < ? ORDER BY created DESC LIMIT ?", before, limit)

    def _queued(self, limit: int, running: frozenset[str]) -> list[Job]:
        queued = self._rows("WHERE state = 'queued' ORDER BY created LIMIT ?", limit + len(running))
        return [j for j in queued if j.id not in running][:limit]

    def _count_queued(self) -> int:
        assert self._db is not None
        (n,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()
        return int(n)

    def _insert(self, job: Job, key: str | None) -> None:
        assert self._db is not None
        self._db.execute(
            "INSERT INTO jobs (id, state, created, urls, options, idempotency_key)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (job.id, job.state, job.created, job.urls, json.dumps(job.options), key),
        )

    def _set_state(self, job_id: str, state: str, error: str | None) -> None:
        assert self._db is not None
        now = time.time()
        if state == "running":
            self._db.execute(
                "UPDATE jobs SET state = ?, started = COALESCE(started, ?) WHERE id = ?",
                (state, now, job_id),
            )
        else:
            self._db.execute(
                "UPDATE jobs SET state = ?, finished = ?, error = ? WHERE id = ?",
                (state, now, error, job_id),
            )


def _write_urls(folder: Path, urls: Sequence[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "urls.txt.tmp"
    # One URL a line; a line break inside a "URL" would split it into two entries.
    tmp.write_text("".join(u.replace("\n", " ").replace("\r", " ") + "\n" for u in urls))
    tmp.replace(folder / "urls.txt")


def _counts(by_status: Mapping[str, int], by_error: Mapping[str, int]) -> dict[str, Any]:
    return {"by_status": dict(by_status), "by_error": dict(by_error)}


def _ledger_counts(ledger: Path) -> tuple[dict[str, int], dict[str, int]]:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)) as db:
            by_status = dict(
                db.execute(
                    "SELECT status, COUNT(*) FROM urls WHERE status != 'pending' GROUP BY status"
                )
            )
            by_error = dict(
                db.execute(
                    "SELECT error, COUNT(*) FROM urls WHERE error IS NOT NULL GROUP BY error"
                )
            )
    except sqlite3.OperationalError:  # not created yet: the job has not started
        return {}, {}
    return by_status, by_error


def _ledger_records(ledger: Path, status: str | None) -> Iterator[bytes]:
    """Manifest lines in input order, a few hundred at a time.

    Each ``next`` may run on a different worker thread, hence check_same_thread=False;
    the calls never overlap.
    """
    uri = f"file:{ledger}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, check_same_thread=False)) as db:
        sql = "SELECT record FROM urls WHERE record IS NOT NULL"
        args: tuple[str, ...] = ()
        if status is not None:
            sql += " AND status = ?"
            args = (status,)
        cursor = db.execute(sql + " ORDER BY seq", args)
        while rows := cursor.fetchmany(500):
            yield "".join(text + "\n" for (text,) in rows).encode()
