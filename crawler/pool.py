"""The process pool: where decode, thumbnail and hash run, off the event loop.

The pool is started with an explicit start method (forkserver by default: a
process that already runs an event loop and threads must not be forked), a
``max_tasks_per_child`` that bounds what a leaky decoder can accumulate, and
an initializer that sets Pillow's limits in each worker.

``ImagePool`` joins the two halves with ``loop.run_in_executor``, handing the
workers images in batches when they are busy (one pool task costs the
crawler's process as much CPU as fetching an image). A worker killed by the
OS breaks a ``ProcessPoolExecutor`` for everyone; we rebuild it and resubmit
each image that was out on its own, and an image that breaks the pool alone
is failed as ``worker_crashed``.
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
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from crawler.errors import ErrorKind
from crawler.models import Failure, ImageJob, ImageResult
from crawler.settings import PoolSettings

log = logging.getLogger(__name__)

MAX_BATCH = 8  # images per pool task, at most
BATCH_BYTES = 16 * 2**20  # a batch is one pickled message: a few large images go alone


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
        # Not allowed with fork, where workers are never replaced anyway. A task
        # is a batch of up to MAX_BATCH images: a worker retires after at most
        # max_tasks_per_child images.
        max_tasks_per_child=None
        if settings.start_method == "fork"
        else max(1, settings.max_tasks_per_child // MAX_BATCH),
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


WORKER_CRASHED = Failure(
    ErrorKind.WORKER_CRASHED, "an image worker died while processing this image"
)


def _settle(
    future: asyncio.Future[ImageResult | Failure], outcome: ImageResult | Failure | Exception
) -> None:
    if future.done():  # its caller was cancelled
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _warm(executor: ProcessPoolExecutor) -> None:
    workers: int = getattr(executor, "_max_workers", 1)
    for future in [executor.submit(os.getpid) for _ in range(workers)]:
        future.result()


def run_batch(
    fn: Callable[[ImageJob], ImageResult | Failure], jobs: list[ImageJob]
) -> list[ImageResult | Failure | Exception]:
    """In a worker: several images in one task. An exception is one image's, not the batch's."""
    results: list[ImageResult | Failure | Exception] = []
    for job in jobs:
        try:
            results.append(fn(job))
        except Exception as exc:  # handed back to that image's caller
            results.append(exc)
    return results


@dataclass(eq=False)
class _Queued:
    job: ImageJob
    future: asyncio.Future[ImageResult | Failure]
    crashes: int = 0  # times a pool broke with this image out


class ImagePool:
    """Images go to the workers in batches, at most ``workers + 1`` batches out at once.

    A pool task costs the crawler's process ~0.2 ms of CPU whatever it carries
    (three threads hand it on each way), so images that arrive while every
    worker is busy wait here and go together, up to ``max_batch``. When a
    worker is free an image goes at once, alone: batches form only under load,
    and the one batch queued behind the running ones keeps workers from waiting
    on a round trip.
    """

    def __init__(
        self,
        executor: Executor,
        factory: Callable[[], Executor] | None = None,
        fn: Callable[[ImageJob], ImageResult | Failure] = process_image,
        workers: int = 1,
        max_batch: int = 1,
    ) -> None:
        self._executor = executor
        self._factory = factory
        self._fn = fn  # a module-level function: it is pickled by name
        self._max_out = workers + 1
        self._max_batch = max_batch
        self._queue: deque[_Queued] = deque()
        self._suspects: deque[_Queued] = deque()  # out when a pool broke
        self._out = 0  # batches submitted and not yet back
        self._running: set[asyncio.Task[None]] = set()  # the loop keeps only weak references
        self.rebuilds = 0
        self.busy = 0  # images submitted and not yet back

    @classmethod
    def from_settings(cls, settings: PoolSettings, max_pixels: int) -> ImagePool:
        def factory() -> Executor:
            return make_executor(settings, max_pixels)

        return cls(factory(), factory, workers=settings.size, max_batch=MAX_BATCH)

    @property
    def window(self) -> int:
        """Images worth holding for the pool: enough for every batch it can have out, full
        (and a few for an unbatched pool, so no worker waits on the network)."""
        return max(4, self._max_out * self._max_batch)

    async def process(self, job: ImageJob) -> ImageResult | Failure:
        future: asyncio.Future[ImageResult | Failure] = asyncio.get_running_loop().create_future()
        self._queue.append(_Queued(job, future))
        self.busy += 1
        try:
            self._dispatch()
            return await future
        finally:
            self.busy -= 1

    def _dispatch(self) -> None:
        if self._suspects:
            # After a break, each image that was out goes alone with nothing else
            # out: if the pool breaks again, the image that broke it is known,
            # and no other image is failed with it.
            while self._suspects and self._out == 0:
                self._submit([self._suspects.popleft()])
            return
        while self._queue and self._out < self._max_out:
            batch = [self._queue.popleft()]
            size = len(batch[0].job.data)
            while (
                self._queue
                and len(batch) < self._max_batch
                and size + len(self._queue[0].job.data) <= BATCH_BYTES
            ):
                batch.append(self._queue.popleft())
                size += len(batch[-1].job.data)
            self._submit(batch)

    def _submit(self, batch: list[_Queued]) -> None:
        batch = [q for q in batch if not q.future.done()]  # callers cancelled meanwhile
        if batch:
            self._out += 1
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[_Queued]) -> None:
        loop = asyncio.get_running_loop()
        executor = self._executor
        try:
            results = await loop.run_in_executor(
                executor, run_batch, self._fn, [q.job for q in batch]
            )
        except BrokenProcessPool:
            self._rebuild(executor)
            for queued in batch:
                queued.crashes += 1
                if queued.crashes >= 2 or self._factory is None:
                    _settle(queued.future, WORKER_CRASHED)
                else:
                    self._suspects.append(queued)
        except asyncio.CancelledError:
            for queued in batch:
                queued.future.cancel()
            raise
        except Exception as exc:  # the executor itself failed (shut down, say)
            for queued in batch:
                _settle(queued.future, exc)
        else:
            for queued, result in zip(batch, results, strict=True):
                _settle(queued.future, result)
        finally:
            self._out -= 1
            self._dispatch()

    def _rebuild(self, broken: Executor) -> None:
        # Every batch in flight sees the same broken executor; only the first rebuilds.
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
            try:
                await asyncio.to_thread(_warm, executor)
            except BrokenProcessPool:
                # A worker died while starting (killed, out of memory): not a reason
                # to fail the crawl. A new pool starts as the first images need it.
                self._rebuild(executor)

    def worker_pids(self) -> list[int]:
        """PIDs of the pool's worker processes (for tests that kill one)."""
        processes = getattr(self._executor, "_processes", None) or {}
        return list(processes)

    async def shutdown(self) -> None:
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
