"""What the user sees: the live progress line and the closing summary."""

from __future__ import annotations

import asyncio
import io

from crawler.models import Record
from crawler.report import LoopLag, Progress, Stats


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_counts_rate_failures_and_eta() -> None:
    stats = Stats(total=100)
    for i in range(30):
        stats.add(Record(f"u{i}", "failed" if i < 3 else "ok", error="timeout" if i < 3 else None))
    line = Progress(stats, Terminal()).line()
    assert line.startswith("30/100 URLs ")
    assert "/s  3 failed  ETA " in line


async def test_progress_is_silent_without_a_terminal() -> None:
    stream = io.StringIO()
    progress = Progress(Stats(), stream)
    assert not progress.enabled
    await progress.run(interval=0.01)
    assert stream.getvalue() == ""


async def test_progress_draws_and_clears_on_a_terminal() -> None:
    stream = Terminal()
    task = asyncio.create_task(Progress(Stats(total=5), stream).run(interval=0.01))
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert "0/5 URLs" in stream.getvalue() and stream.getvalue().endswith("\r\x1b[K")


def test_summary_names_counts_kinds_and_lag() -> None:
    stats = Stats()
    stats.add(Record("a", "ok", bytes=2_000_000, sha256="x"))
    stats.add(Record("b", "failed", error="http_404"))
    lag = LoopLag()
    lag.samples.extend([0.001, 0.002, 0.030])
    lag.max = 0.030
    text = stats.summary(lag).render()
    assert "crawled 2 URLs" in text and "1 failed, 1 ok" in text
    assert "2.0 MB fetched" in text and "errors: http_404 1" in text
    assert "p99 30.0 ms" in text
