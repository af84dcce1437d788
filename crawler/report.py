"""Counting what happened, the live progress line, and the closing summary."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TextIO

from crawler.models import Record


@dataclass
class Stats:
    """Mutable counters, owned and updated by the pipeline on the event loop."""

    started: float = field(default_factory=time.monotonic)
    total: int | None = None
    by_status: Counter[str] = field(default_factory=Counter)
    by_error: Counter[str] = field(default_factory=Counter)
    bytes: int = 0
    stored: int = 0
    duplicates: int = 0
    already: int = 0  # done in an earlier run (or still fresh on revalidation)

    def add(self, record: Record) -> None:
        self.by_status[record.status] += 1
        if record.error:
            self.by_error[record.error] += 1
        if record.status == "ok":
            self.stored += record.duplicate_of is None
            self.duplicates += record.duplicate_of is not None
        self.bytes += record.bytes or 0

    def absorb(self, other: Stats) -> None:
        """Add another crawl's counts to these (the service's running totals)."""
        self.by_status.update(other.by_status)
        self.by_error.update(other.by_error)
        self.bytes += other.bytes
        self.stored += other.stored
        self.duplicates += other.duplicates

    @property
    def done(self) -> int:
        return sum(self.by_status.values())

    def summary(self, lag: LoopLag | None = None) -> Summary:
        return Summary(
            loop_lag_ms=lag.percentiles() if lag is not None else {},
            total=self.done,
            by_status=dict(self.by_status),
            by_error=dict(self.by_error.most_common()),
            bytes=self.bytes,
            stored=self.stored,
            duplicates=self.duplicates,
            already=self.already,
            seconds=time.monotonic() - self.started,
        )


@dataclass(frozen=True)
class Summary:
    total: int
    by_status: dict[str, int]
    by_error: dict[str, int]
    bytes: int
    stored: int
    duplicates: int
    already: int
    seconds: float
    loop_lag_ms: dict[str, float]  # p50 / p99 / max of how late the event loop woke a sleeper

    def to_dict(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "images_per_second": round(self.images_per_second, 2)}

    @property
    def images_per_second(self) -> float:
        return self.by_status.get("ok", 0) / self.seconds if self.seconds > 0 else 0.0

    def render(self) -> str:
        statuses = ", ".join(f"{n} {s}" for s, n in sorted(self.by_status.items())) or "nothing"
        lines = [
            f"crawled {self.total} URLs in {self.seconds:.1f}s: {statuses}",
            f"  {self.images_per_second:.1f} images/s, {_mb(self.bytes)} fetched, "
            f"{self.stored} new files, {self.duplicates} duplicates",
        ]
        if self.loop_lag_ms:
            lag = self.loop_lag_ms
            lines.append(
                f"  event-loop lag p50 {lag['p50']} ms, p99 {lag['p99']} ms, max {lag['max']} ms"
            )
        if self.already:
            lines.append(f"  {self.already} URLs done in an earlier run (not fetched again)")
        if self.by_error:
            errors = ", ".join(f"{kind} {n}" for kind, n in self.by_error.items())
            lines.append(f"  errors: {errors}")
        return "\n".join(lines)


class LoopLag:
    """How late the event loop wakes a sleeper: CPU work or blocking I/O on the loop shows here.

    Keeps the most recent samples only, so it runs for months in the service.
    """

    def __init__(self, interval: float = 0.05, keep: int = 20_000) -> None:
        self.interval = interval
        self.samples: deque[float] = deque(maxlen=keep)
        self.max = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(self.interval)
            lag = max(0.0, loop.time() - start - self.interval)
            self.samples.append(lag)
            self.max = max(self.max, lag)

    @property
    def last(self) -> float:
        return self.samples[-1] if self.samples else 0.0

    def percentiles(self) -> dict[str, float]:
        if not self.samples:  # a crawl shorter than one interval
            return {"p50": 0.0, "p99": 0.0, "max": 0.0}
        ordered = sorted(self.samples)

        def at(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

        return {"p50": at(0.50), "p99": at(0.99), "max": round(self.max * 1000, 2)}


class Progress:
    """A single self-overwriting status line on an interactive stderr; silent otherwise."""

    def __init__(self, stats: Stats, stream: TextIO = sys.stderr, enabled: bool = True) -> None:
        self._stats = stats
        self._stream = stream
        self.enabled = enabled and stream.isatty()

    async def run(self, interval: float = 0.5) -> None:
        if not self.enabled:
            return
        try:
            while True:
                await asyncio.sleep(interval)
                self._stream.write("\r\x1b[K" + self.line())
                self._stream.flush()
        finally:
            self._stream.write("\r\x1b[K")
            self._stream.flush()

    def line(self) -> str:
        s = self._stats
        elapsed = max(time.monotonic() - s.started, 1e-9)
        rate = s.done / elapsed
        failed = s.by_status.get("failed", 0)
        if s.total:
            left = max(s.total - s.done, 0)
            eta = _duration(left / rate) if rate > 0 else "?"
            return f"{s.done}/{s.total} URLs  {rate:.1f}/s  {failed} failed  ETA {eta}"
        return f"{s.done} URLs  {rate:.1f}/s  {failed} failed"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
