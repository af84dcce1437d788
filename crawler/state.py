"""The ledger: what the crawl knows, durably. SQLite in WAL mode, one row per input URL.

It is the source of truth; ``manifest.jsonl`` is derived from it. Rows are
written when a URL is first read (``pending``) and when it ends (its record),
so a crawl interrupted at any point, even by SIGKILL, resumes from here: done
URLs are not fetched again, pending ones are. A record is committed only after
its files are in place, so the ledger never names a file that isn't there.

SQLite is used from one dedicated thread (its connection never leaves it);
the event loop talks to it through ``run_in_executor``. Record writes are
batched: a writer task commits whatever has queued up in one transaction,
and the same thread call appends those records to the manifest.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import sqlite3
import time
from array import array
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, TextIO

from crawler.models import Record

log = logging.getLogger(__name__)
LEDGER = "state.sqlite"
MANIFEST = "manifest.jsonl"
# Each stored image once, in the order first seen.
DISTINCT_IMAGES = (
    "SELECT sha256, phash FROM (SELECT json_extract(record, '$.sha256') AS sha256,"
    " json_extract(record, '$.phash') AS phash, seq FROM urls WHERE status = 'ok')"
    " WHERE phash IS NOT NULL GROUP BY sha256 ORDER BY MIN(seq)"
)
SCHEMA = """
CREATE TABLE IF NOT EXISTS urls (
    url TEXT PRIMARY KEY,       -- as given in the input
    key TEXT,                   -- normalised; NULL when invalid
    seq INTEGER NOT NULL,       -- order first read, for the manifest
    status TEXT NOT NULL,       -- pending | ok | failed | skipped
    error TEXT,
    record TEXT,                -- the manifest record as JSON; NULL while pending
    done_at REAL,
    etag TEXT,
    last_modified TEXT
);
CREATE INDEX IF NOT EXISTS urls_key ON urls (key);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL         -- 'closed' = '1' once a run has rewritten the manifest and ended
);
CREATE TABLE IF NOT EXISTS images (
    sha256 TEXT PRIMARY KEY,
    url TEXT NOT NULL           -- the URL that stored it first
);
"""


class Verdict(Enum):
    FETCH = "fetch"  # new, pending from an earlier run, or chosen for a retry
    REFRESH = "refresh"  # ok but old: revalidate with a conditional GET
    DONE = "done"  # has its record already: nothing to do, no new record
    DUPLICATE = "duplicate"  # another input line has the same normalised URL
    INVALID = "invalid"  # new and not fetchable: record it failed


@dataclass(frozen=True, slots=True)
class Admission:
    verdict: Verdict
    etag: str | None = None
    last_modified: str | None = None
    duplicate_of: str | None = None


@dataclass(frozen=True, slots=True)
class Revisit:
    """Which finished URLs a run takes up again."""

    retry_failed: frozenset[str] | None = None  # error kinds; empty = every failure
    refresh_before: float | None = None  # ok rows done before this epoch time


class Ledger:
    def __init__(self, root: Path, revisit: Revisit | None = None) -> None:
        self.root = root
        self.revisit = revisit or Revisit()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        self._db: sqlite3.Connection | None = None
        self._seq = 0
        self._claims: dict[str, str] = {}  # sha256 -> URL, for images not yet committed
        self._queue: asyncio.Queue[tuple[Record, str | None, str | None] | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._manifest: TextIO | None = None  # opened and written on the ledger thread

    async def __aenter__(self) -> Ledger:
        self._seq = await self._call(self._open)
        await self._call(self._repair_manifest)
        self._writer = asyncio.create_task(self._write_records())
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self._writer is not None:
                await self._queue.put(None)
                await asyncio.shield(self._writer)
            await self._call(self._write_manifest)
            await self._call(self._set_closed, "1")
        finally:
            await self._call(self._close)
            self._thread.shutdown(wait=True)

    async def admit(self, batch: Sequence[tuple[str, str | None]]) -> list[Admission]:
        """Register ``(url as given, normalised key or None)`` pairs; say what to do with each."""
        seq = self._seq
        self._seq += len(batch)
        admissions: list[Admission] = await self._call(self._admit, batch, seq)
        return admissions

    async def first_url(self, sha256: str, url: str) -> str | None:
        """Claim content for ``url``: None if it is new, else the URL that has it already."""
        if (claimed := self._claims.get(sha256)) is not None:
            return None if claimed == url else claimed
        stored: str | None = await self._call(self._image_owner, sha256)
        if stored is not None and stored != url:
            return stored
        self._claims.setdefault(sha256, url)
        return None if self._claims[sha256] == url else self._claims[sha256]

    def release(self, sha256: str, url: str) -> None:
        if self._claims.get(sha256) == url:
            del self._claims[sha256]

    async def still_fresh(self, url: str) -> None:
        """A revalidation said 304: keep the record, restart its clock."""
        await self._call(self._touch, url)

    async def record(
        self, record: Record, etag: str | None = None, last_modified: str | None = None
    ) -> None:
        """Queue a final record; the writer commits it and appends it to the manifest."""
        await self._queue.put((record, etag, last_modified))

    async def _write_records(self) -> None:
        done = False
        while not done:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            done = batch[-1] is None
            items = [item for item in batch if item is not None]
            if not items:
                continue
            lines = [record.to_json() for record, _, _ in items]  # once, for both uses
            await self._retry_while_full(self._commit, items, lines)
            for record, _, _ in items:
                if record.sha256 is not None:
                    self._claims.pop(record.sha256, None)

    async def _retry_while_full(self, fn: Any, *args: Any) -> None:
        """A full disk pauses the ledger rather than losing records (nothing is lost by waiting)."""
        delay = 1.0
        while True:
            try:
                await self._call(fn, *args)
                return
            except (sqlite3.OperationalError, OSError) as exc:
                full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
                if not (full or "full" in str(exc)):
                    raise
                log.warning("disk full: ledger write waits %.0fs (%s)", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    # --- below here runs on the ledger thread only ---

    def _open(self) -> int:
        self._db = sqlite3.connect(self.root / LEDGER, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit survives a process crash (SIGKILL) at once and a power
        # cut after the next checkpoint; a lost commit only means a URL is redone.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        (seq,) = self._db.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM urls").fetchone()
        return int(seq)

    def _repair_manifest(self) -> None:
        """After a run that did not end cleanly, the manifest may lack the last
        records or hold half a line: rewrite it. After a clean end it is current."""
        assert self._db is not None
        row = self._db.execute("SELECT value FROM meta WHERE key = 'closed'").fetchone()
        if row is None or row[0] != "1" or not (self.root / MANIFEST).exists():
            self._write_manifest()
        self._set_closed("0")
        self._manifest = (self.root / MANIFEST).open("a", encoding="utf-8")

    def _set_closed(self, value: str) -> None:
        assert self._db is not None
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('closed', ?)", (value,))

    def _close(self) -> None:
        if self._manifest is not None:
            self._manifest.close()
            self._manifest = None
        if self._db is not None:
            self._db.close()
            self._db = None

    def _admit(self, batch: Sequence[tuple[str, str | None]], seq: int) -> list[Admission]:
        db = self._db
        assert db is not None
        out: list[Admission] = []
        db.execute("BEGIN")
        try:
            for offset, (url, key) in enumerate(batch):
                row = db.execute(
                    "SELECT status, error, done_at, etag, last_modified FROM urls WHERE url = ?",
                    (url,),
                ).fetchone()
                if row is not None:
                    out.append(self._revisit(*row))
                    continue
                owner = None
                if key is not None:
                    found = db.execute(
                        "SELECT url FROM urls WHERE key = ? LIMIT 1", (key,)
                    ).fetchone()
                    owner = found[0] if found else None
                db.execute(
                    "INSERT INTO urls (url, key, seq, status) VALUES (?, ?, ?, 'pending')",
                    (url, key, seq + offset),
                )
                if key is None:
                    out.append(Admission(Verdict.INVALID))
                elif owner is not None:
                    out.append(Admission(Verdict.DUPLICATE, duplicate_of=owner))
                else:
                    out.append(Admission(Verdict.FETCH))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return out

    def _revisit(
        self,
        status: str,
        error: str | None,
        done_at: float | None,
        etag: str | None,
        last_modified: str | None,
    ) -> Admission:
        retry = self.revisit.retry_failed
        if status == "pending":
            return Admission(Verdict.FETCH)
        if status == "failed" and retry is not None and (not retry or error in retry):
            return Admission(Verdict.FETCH)
        before = self.revisit.refresh_before
        if status == "ok" and before is not None and (done_at or 0) < before:
            return Admission(Verdict.REFRESH, etag, last_modified)
        return Admission(Verdict.DONE)

    def _touch(self, url: str) -> None:
        assert self._db is not None
        self._db.execute("UPDATE urls SET done_at = ? WHERE url = ?", (time.time(), url))

    def _image_owner(self, sha256: str) -> str | None:
        assert self._db is not None
        row = self._db.execute("SELECT url FROM images WHERE sha256 = ?", (sha256,)).fetchone()
        return None if row is None else str(row[0])

    def _commit(
        self, items: Iterable[tuple[Record, str | None, str | None]], lines: Sequence[str]
    ) -> None:
        db = self._db
        assert db is not None
        now = time.time()
        db.execute("BEGIN")
        try:
            for (record, etag, last_modified), line in zip(items, lines, strict=True):
                db.execute(
                    "UPDATE urls SET status = ?, error = ?, record = ?, done_at = ?,"
                    " etag = COALESCE(?, etag), last_modified = COALESCE(?, last_modified)"
                    " WHERE url = ?",
                    (
                        record.status,
                        record.error,
                        line,
                        now,
                        etag,
                        last_modified,
                        record.url,
                    ),
                )
                if record.status == "ok" and record.sha256 and record.duplicate_of is None:
                    db.execute(
                        "INSERT OR IGNORE INTO images (sha256, url) VALUES (?, ?)",
                        (record.sha256, record.url),
                    )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        # On this thread, in the same hop as the commit: the manifest follows the
        # ledger as it goes. It is derived data, rewritten from the ledger at the
        # end (and after a crash), so a failed append is only logged.
        assert self._manifest is not None
        try:
            self._manifest.write("".join(line + "\n" for line in lines))
            self._manifest.flush()
        except OSError as exc:
            log.warning("manifest append failed (%s); it is rewritten at the end of the run", exc)

    def _near_dup_leaders(self) -> dict[str, str]:
        """sha256 -> the sha256 first seen in its near-duplicate group, for groups of two or more.

        Each distinct image is held as 40 bytes (its hash and digest in two flat
        arrays), not as a row of Python objects (~370 bytes): 40 MB instead of
        370 MB at the end of a million-image crawl. The grouping's own arrays
        add ~90 bytes per image while it runs.
        """
        db = self._db
        assert db is not None
        values = array("Q")
        digests = bytearray()
        for sha256, phash in db.execute(DISTINCT_IMAGES):
            values.append(int(phash, 16))
            digests += bytes.fromhex(sha256)
        if len(values) < 2:
            return {}
        # Imported only when there is something to group: numpy takes ~0.1 s
        # to load, which a run with nothing to group should not pay.
        from crawler.neardup import grouped  # noqa: PLC0415

        def sha(i: int) -> str:
            return digests[32 * i : 32 * i + 32].hex()

        return {sha(i): sha(first) for i, first in grouped(values).items()}

    def _write_manifest(self) -> None:
        """Rewrite the manifest from the ledger, near-duplicate groups included; atomically."""
        db = self._db
        assert db is not None
        first_sha = self._near_dup_leaders()
        tmp = self.root / f".{MANIFEST}.tmp"
        with tmp.open("w", encoding="utf-8") as fh:
            for (text,) in db.execute(
                "SELECT record FROM urls WHERE record IS NOT NULL ORDER BY seq"
            ):
                line = text
                if first_sha:
                    record = json.loads(text)
                    record["near_dup_group"] = first_sha.get(record.get("sha256") or "")
                    line = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
                fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.root / MANIFEST)
