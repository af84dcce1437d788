"""The process pool itself: worker retirement never stalls queued images."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import wait

import pytest

from crawler.pool import SINGLE_THREADED, make_executor
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


@pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="OpenBLAS is single-threaded here anyway"
)
def test_numpy_starts_no_blas_threads_once_a_pool_exists() -> None:
    # The workers are the parallelism. OpenBLAS would start a thread per core
    # wherever numpy is imported (the forkserver, the crawler at the end of a
    # run for near-duplicate grouping) and keep them spinning: measured, about
    # 7% of a 1500-image crawl's CPU.
    code = (
        "import os\n"
        "from crawler.pool import make_executor\n"
        "from crawler.settings import PoolSettings\n"
        "make_executor(PoolSettings(workers=1), 1000).shutdown()\n"
        "import numpy\n"
        "a = numpy.ones((400, 400))\n"
        "a @ a\n"
        "print(len(os.listdir('/proc/self/task')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in SINGLE_THREADED}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "1"
