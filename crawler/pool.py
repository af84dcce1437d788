"""The process pool: where decode, thumbnail and hash run, off the event loop.

The pool is started with an explicit start method (forkserver by default: a
process that already runs an event loop and threads must not be forked), a
``max_tasks_per_child`` that bounds what a leaky decoder can accumulate, and
an initializer that sets Pillow's limits in each worker.

``ImagePool`` joins the two halves with ``loop.run_in_executor``. A worker
killed by the OS breaks a ``ProcessPoolExecutor`` for everyone; we rebuild it
and resubmit, and an input that breaks it twice is failed as ``worker_crashed``.
Any ``Executor`` can be injected instead (a thread or inline executor inside a
cluster worker, where daemonic processes cannot start a pool of their own).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from crawler.errors import ErrorKind
from crawler.models import Failure, ImageJob, ImageResult
from crawler.settings import PoolSettings

log = logging.getLogger(__name__)


# The workers are the parallelism. numpy's OpenBLAS would also start a thread
# per core wherever numpy is imported (the forkserver, spawned workers, the
# crawler itself when it groups near-duplicates at the end of a run) and keep
# them spinning: measured, ~7% of a 1500-image crawl's CPU, a quarter of a
# one-URL crawl's.
SINGLE_THREADED = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _context(settings: PoolSettings) -> multiprocessing.context.BaseContext:
    for name in SINGLE_THREADED:
        os.environ.setdefault(name, "1")  # inherited by the forkserver and spawned workers
    context = multiprocessing.get_context(settings.start_method)
    if settings.start_method == "forkserver":
        # Workers forked from a server that has already imported Pillow and numpy
        # start in milliseconds instead of re-importing them each time.
        context.set_forkserver_preload(["crawler.imaging"])
    return context


def prestart(settings: PoolSettings) -> None:
    """Start the forkserver now: it imports Pillow and numpy on one core while the
    crawler imports the rest of itself on another (~0.1 s off every run's start)."""
    if settings.start_method == "forkserver":
        _context(settings)
        multiprocessing.forkserver.ensure_running()


def make_executor(settings: PoolSettings, max_pixels: int) -> ProcessPoolExecutor:
    context = _context(settings)
    return _Executor(
        max_workers=settings.size,
        mp_context=context,
        initializer=init_worker,
        initargs=(max_pixels, os.getpid()),
        # Not allowed with fork, where workers are never replaced anyway.
        max_tasks_per_child=None
        if settings.start_method == "fork"
        else settings.max_tasks_per_child,
    )


class _Executor(ProcessPoolExecutor):
    """``ProcessPoolExecutor`` that always replaces a worker retired by ``max_tasks_per_child``.

    CPython 3.11 to 3.13.x (gh-115634): after a worker exits at its task limit
    the executor replaces it only if its idle-worker semaphore holds no token,
    but that semaphore counts completions, and with a backlog queued (as the
    crawler always keeps one) stale tokens make it skip the replacement. Once
    every worker has retired this way, queued images wait forever. The manager
    thread is the only caller that replaces exited workers, so there we spawn
    whenever the pool is short, as the upstream fix does.
    """

    def _adjust_process_count(self) -> None:
        # Private attributes, some missing or mistyped in typeshed.
        if threading.current_thread() is getattr(self, "_executor_manager_thread", None):
            if len(self._processes) < getattr(self, "_max_workers", 1):
                self._spawn_process()  # type: ignore[attr-defined]
            return
        super()._adjust_process_count()


def process_image(job: ImageJob) -> ImageResult | Failure:
    """``imaging.process``, named here so the crawler's own process never imports
    Pillow and numpy (the workers have them from the forkserver's preload)."""
    from crawler import imaging  # noqa: PLC0415 (lazy: see above)

    return imaging.process(job)


def init_worker(max_pixels: int, crawler_pid: int) -> None:
    from crawler import imaging  # noqa: PLC0415 (lazy: see above)

    imaging.init_worker(max_pixels)
    threading.Thread(target=_exit_with, args=(crawler_pid,), daemon=True).start()


def _exit_with(pid: int) -> None:
    """End this worker when the crawler that owns the pool is gone.

    A worker holds both ends of its task pipe, so it never sees EOF when the
    crawler is SIGKILLed: without this it would wait forever, and keep its
    forkserver alive with it.
    """
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # no pidfd (old kernel): poll instead
        while _alive(pid):
            time.sleep(1.0)
    else:
        select.select([fd], [], [])  # readable once the process has exited
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    return True


def _warm(executor: ProcessPoolExecutor) -> None:
    workers: int = getattr(executor, "_max_workers", 1)
    for future in [executor.submit(os.getpid) for _ in range(workers)]:
        future.result()


class ImagePool:
    def __init__(
        self,
        executor: Executor,
        factory: Callable[[], Executor] | None = None,
        fn: Callable[[ImageJob], ImageResult | Failure] = process_image,
    ) -> None:
        self._executor = executor
        self._factory = factory
        self._fn = fn  # a module-level function: it is pickled by name
        self.rebuilds = 0
        self.busy = 0  # images submitted and not yet back

    @classmethod
    def from_settings(cls, settings: PoolSettings, max_pixels: int) -> ImagePool:
        def factory() -> Executor:
            return make_executor(settings, max_pixels)

        return cls(factory(), factory)

    async def process(self, job: ImageJob) -> ImageResult | Failure:
        self.busy += 1
        try:
            return await self._process(job)
        finally:
            self.busy -= 1

    async def _process(self, job: ImageJob) -> ImageResult | Failure:
        loop = asyncio.get_running_loop()
        for _ in range(2):
            executor = self._executor
            try:
                return await loop.run_in_executor(executor, self._fn, job)
            except BrokenProcessPool:
                if self._factory is None:
                    break
                self._rebuild(executor)
        return Failure(ErrorKind.WORKER_CRASHED, "an image worker died while processing this image")

    def _rebuild(self, broken: Executor) -> None:
        # Every task in flight sees the same broken executor; only the first rebuilds.
        if self._executor is broken and self._factory is not None:
            log.warning("image worker died; restarting the process pool")
            broken.shutdown(wait=False, cancel_futures=True)
            self._executor = self._factory()
            self.rebuilds += 1

    async def start(self) -> None:
        """Start the workers now, off the event loop: starting a forkserver and its
        workers takes a few hundred milliseconds the loop should not stall for."""
        executor = self._executor
        if isinstance(executor, ProcessPoolExecutor):
            await asyncio.to_thread(_warm, executor)

    def worker_pids(self) -> list[int]:
        """PIDs of the pool's worker processes (for tests that kill one)."""
        processes = getattr(self._executor, "_processes", None) or {}
        return list(processes)

    async def shutdown(self) -> None:
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
