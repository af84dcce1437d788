"""``python -m crawler serve``: the API, the job runner and systemd's notify protocol, together.

Start-up: open the engine, clear temporary files, reload the jobs a stop or
crash interrupted, listen, then tell systemd READY=1. Stop (SIGTERM/SIGINT):
STOPPING=1, refuse new jobs, give running jobs ``crawl.grace_period`` to end,
then leave the rest to resume at the next start.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from crawler.guard import AddressPolicy
from crawler.pipeline import Engine
from crawler.service.api import make_app
from crawler.service.jobs import Jobs
from crawler.service.metrics import Metrics
from crawler.service.notify import Notifier
from crawler.settings import Settings
from crawler.store import Store

log = logging.getLogger("crawler.service")
STATUS_EVERY = 5.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve(settings: Settings, token: str, ready: asyncio.Event | None = None) -> int:
    cfg = settings.service
    host = cfg.host
    if not token and not is_loopback(host):
        log.warning("no token configured: listening on 127.0.0.1 only, not %s", host)
        host = "127.0.0.1"
    elif not token:
        log.warning("no token configured: the API is open to local users; set CRAWLER_TOKEN")
    root = Path(os.environ.get("STATE_DIRECTORY") or settings.crawl.out)
    await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
    settings = replace(settings, crawl=replace(settings.crawl, out=str(root), progress=False))
    notifier = Notifier.from_env()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    policy = (
        AddressPolicy(allow=cfg.allow_ranges, ports=cfg.allowed_ports)
        if cfg.ssrf_protection
        else None
    )
    async with Engine(settings, policy=policy) as engine:
        await Store(root, settings.image.thumb_spec().ext).clean()
        jobs = Jobs(root, settings, engine)
        resumed = await jobs.start()
        metrics = Metrics(jobs, engine)
        runner = web.AppRunner(make_app(jobs, metrics, token), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, cfg.port).start()
        log.info("listening on http://%s:%d/ (%d jobs to resume)", host, cfg.port, resumed)
        background = [
            asyncio.create_task(jobs.run()),
            asyncio.create_task(metrics.watch_lag()),
            asyncio.create_task(notifier.watchdog()),
            asyncio.create_task(_report_status(notifier, jobs)),
        ]
        notifier.ready()
        if ready is not None:
            ready.set()
        try:
            await stop.wait()
        finally:
            notifier.stopping()
            log.info("stopping: finishing running jobs (up to %gs)", settings.crawl.grace_period)
            await jobs.stop(settings.crawl.grace_period)
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await runner.cleanup()
            notifier.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    return 0


async def _report_status(notifier: Notifier, jobs: Jobs) -> None:
    while True:
        running = jobs.live
        done = sum(s.done for s in running.values())
        notifier.status(f"{len(running)} jobs running, {done} URLs done in them")
        await asyncio.sleep(STATUS_EVERY)
