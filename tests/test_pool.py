"""The process pool itself: batches under load, one image's failure stays its own,
worker retirement never stalls queued images."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import pytest

from crawler import pool as pool_module
from crawler.errors import ErrorKind
from crawler.models import Failure, ImageJob, ImageResult, ThumbSpec
from crawler.pool import SINGLE_THREADED, ImagePool, make_executor
from crawler.settings import PoolSettings


def echo(job: ImageJob) -> ImageResult | Failure:
    """A stand-in image function: each image's answer names it."""
    if job.data == b"raise":
        raise ValueError("a bug on this image")
    if job.data == b"crash":
        os._exit(9)  # what a segfaulting decoder does to its worker
    time.sleep(0.02)
    return Failure("echo", job.data.decode())


def job(data: bytes) -> ImageJob:
    return ImageJob(data, ThumbSpec(), 1000, ("JPEG",))


class Counting(ThreadPoolExecutor):
    """Threads instead of processes, remembering the size of each batch submitted."""

    def __init__(self) -> None:
        super().__init__(2)
        self.batches: list[int] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.batches.append(len(args[1]))  # run_batch(fn, jobs)
        return super().submit(fn, *args, **kwargs)


async def test_images_go_in_batches_under_load_and_each_gets_its_own_answer() -> None:
    executor = Counting()
    pool = ImagePool(executor, fn=echo, workers=2, max_batch=4)
    try:
        results = await asyncio.gather(*(pool.process(job(str(i).encode())) for i in range(20)))
    finally:
        executor.shutdown()
    assert results == [Failure("echo", str(i)) for i in range(20)]
    # An idle pool takes an image at once, alone; the rest wait for a batch out
    # (at most workers + 1) to come back and then go together.
    assert executor.batches[:3] == [1, 1, 1]
    assert max(executor.batches) == 4
    assert sum(executor.batches) == 20 and len(executor.batches) <= 8


async def test_large_images_go_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "BATCH_BYTES", 5)  # each 3-byte image is "large" in pairs
    executor = Counting()
    pool = ImagePool(executor, fn=echo, workers=1, max_batch=4)
    try:
        await asyncio.gather(*(pool.process(job(b"%03d" % i)) for i in range(8)))
    finally:
        executor.shutdown()
    assert executor.batches == [1] * 8


async def test_an_exception_fails_its_own_image_not_its_batch() -> None:
    executor = Counting()
    pool = ImagePool(executor, fn=echo, workers=1, max_batch=8)
    try:
        results = await asyncio.gather(
            *(pool.process(job(b"raise" if i == 5 else b"%d" % i)) for i in range(10)),
            return_exceptions=True,
        )
    finally:
        executor.shutdown()
    assert max(executor.batches) > 1
    assert isinstance(results[5], ValueError)
    assert [r for i, r in enumerate(results) if i != 5] == [
        Failure("echo", str(i)) for i in range(10) if i != 5
    ]


async def test_an_image_that_kills_its_worker_fails_alone_not_its_batch() -> None:
    settings = PoolSettings(workers=1)

    def factory() -> Executor:
        return make_executor(settings, 1000)

    pool = ImagePool(factory(), factory, fn=echo, workers=1, max_batch=8)
    try:
        results = await asyncio.gather(
            *(pool.process(job(b"crash" if i == 6 else b"%d" % i)) for i in range(10))
        )
    finally:
        await pool.shutdown()
    # The batch it was in broke the pool; each of its images then went alone,
    # and only the one that broke the pool again was failed.
    assert results[6] == Failure(ErrorKind.WORKER_CRASHED, pool_module.WORKER_CRASHED.detail)
    assert [r for i, r in enumerate(results) if i != 6] == [
        Failure("echo", str(i)) for i in range(10) if i != 6
    ]
    assert pool.rebuilds == 2


async def test_a_worker_that_dies_while_the_pool_starts_does_not_fail_the_crawl() -> None:
    settings = PoolSettings(workers=1)

    def factory() -> Executor:
        return make_executor(settings, 1000)

    broken = factory()
    with pytest.raises(BrokenProcessPool):
        broken.submit(os._exit, 1).result()
    pool = ImagePool(broken, factory, fn=echo, workers=1)
    try:
        await pool.start()
        assert await pool.process(job(b"after")) == Failure("echo", "after")
    finally:
        await pool.shutdown()
    assert pool.rebuilds == 1


def worker_pid(job: ImageJob) -> ImageResult | Failure:
    time.sleep(0.002)  # long enough for batches to form
    return Failure("pid", str(os.getpid()))


async def test_a_worker_retires_after_at_most_max_tasks_per_child_images() -> None:
    # Tasks are batches: counted as tasks, the limit would let a worker's
    # leaks grow over MAX_BATCH times as many images as configured.
    settings = PoolSettings(workers=1, max_tasks_per_child=pool_module.MAX_BATCH)
    pool = ImagePool(
        make_executor(settings, 1000), fn=worker_pid, workers=1, max_batch=pool_module.MAX_BATCH
    )
    try:
        results = await asyncio.gather(*(pool.process(job(b"x")) for _ in range(60)))
    finally:
        await pool.shutdown()
    per_worker = Counter(r.detail for r in results if isinstance(r, Failure))
    assert sum(per_worker.values()) == 60
    assert max(per_worker.values()) <= settings.max_tasks_per_child


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
