"""The process pool itself: worker retirement never stalls queued images."""

from __future__ import annotations

import os
from concurrent.futures import wait

import pytest

from crawler.pool import make_executor
from crawler.settings import PoolSettings


@pytest.mark.parametrize("workers", [1, 2])
def test_retired_workers_are_replaced_while_a_backlog_waits(workers: int) -> None:
    # gh-115634: on CPython 3.11-3.13 a plain ProcessPoolExecutor hangs here
    # once every worker has retired at max_tasks_per_child.
    pool = make_executor(PoolSettings(workers=workers, max_tasks_per_child=2), max_pixels=1000)
    try:
        futures = [pool.submit(os.getpid) for _ in range(12 * workers)]
        _, pending = wait(futures, timeout=20)
        assert not pending, f"{len(pending)} tasks never ran"
        pids = [f.result() for f in futures]
        assert len(set(pids)) >= len(pids) // 2  # each worker ran at most 2 tasks
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
