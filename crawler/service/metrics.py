"""``GET /metrics`` in the Prometheus text format, and the event-loop lag probe behind it."""

from __future__ import annotations

from crawler.pipeline import Engine
from crawler.report import LoopLag, Stats
from crawler.service.jobs import Jobs

LAG_INTERVAL = 0.25


class Metrics:
    def __init__(self, jobs: Jobs, engine: Engine) -> None:
        self.jobs = jobs
        self.engine = engine
        self.lag = LoopLag(LAG_INTERVAL, keep=1000)

    async def watch_lag(self) -> None:
        await self.lag.run()

    async def render(self) -> str:
        total = Stats()
        for stats in [self.jobs.ended, *self.jobs.live.values()]:
            total.absorb(stats)
        by_status, by_error, fetched = total.by_status, total.by_error, total.bytes
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: dict[str, float]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {value:g}" for labels, value in samples.items())

        metric(
            "crawler_urls_total", "counter", "URLs ended since start-up, by status.",
            {f'{{status="{s}"}}': n for s, n in sorted(by_status.items())},
        )  # fmt: skip
        metric(
            "crawler_errors_total", "counter", "URLs failed or skipped, by error kind.",
            {f'{{kind="{k}"}}': n for k, n in sorted(by_error.items())},
        )  # fmt: skip
        metric(
            "crawler_bytes_total", "counter", "Body bytes fetched since start-up.", {"": fetched}
        )
        metric(
            "crawler_requests_in_flight", "gauge", "Fetches running now.",
            {"": self.engine.scheduler.in_flight},
        )  # fmt: skip
        queued = sum(len(h.queue) for h in self.engine.scheduler.hosts.values())
        metric("crawler_queue_depth", "gauge", "URLs waiting for their host.", {"": queued})
        metric(
            "crawler_jobs", "gauge", "Jobs running now.", {'{state="running"}': len(self.jobs.live)}
        )
        busy = min(self.engine.pool.busy, self.engine.settings.pool.size)
        metric("crawler_pool_busy_workers", "gauge", "Image workers busy now.", {"": busy})
        metric(
            "crawler_event_loop_lag_seconds", "gauge", "Last and largest event-loop lag measured.",
            {'{which="last"}': self.lag.last, '{which="max"}': self.lag.max},
        )  # fmt: skip
        metric(
            "crawler_job_urls_done", "gauge", "URLs ended in each running job.",
            {f'{{job="{j}"}}': s.done for j, s in sorted(self.jobs.live.items())},
        )  # fmt: skip
        metric(
            "crawler_job_urls", "gauge", "URLs in each running job.",
            {f'{{job="{j}"}}': s.total or 0 for j, s in sorted(self.jobs.live.items())},
        )  # fmt: skip
        return "\n".join(out) + "\n"
