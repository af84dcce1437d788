"""Per-host politeness and the order URLs are fetched in.

Each host (``host:port``) has its own queue, a concurrency limit that adapts
(AIMD: halved on 429/503/timeouts, raised by about one per window of
successes, never above ``per_host``), an optional request rate, a pause set by
``Retry-After``, and a circuit breaker that fails the host's URLs fast after
repeated connection failures and half-opens after a cool-down.

The ``Scheduler`` starts a fetch whenever a global slot is free and some host
can take one more request. A URL whose host is busy, paused or rate-limited
waits in that host's queue, not in a fetch task: other hosts keep flowing.
Retries re-enter the queue with a not-before time instead of sleeping in a slot.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any, Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


class Outcome(Enum):
    OK = auto()  # a response came back (any status that is not throttling)
    THROTTLED = auto()  # 429, 503 or a timeout: the host wants less from us
    UNREACHABLE = auto()  # connection refused/reset, DNS: counts towards the breaker


@dataclass(frozen=True)
class HostPolicy:
    per_host: int = 8
    rate: float = 0.0  # requests per second per host; 0 = unlimited
    adaptive: bool = True
    breaker_threshold: int = 10
    breaker_cooldown: float = 60.0


class FairQueue:
    """A host's waiting items, taken in turn from each owner (a crawl job).

    A big job with thousands of URLs for a host must not make a small job
    submitted later wait behind all of them.
    """

    def __init__(self) -> None:
        self._by_owner: dict[object, deque[Any]] = {}
        self._turns: deque[object] = deque()
        self._size = 0

    def append(self, item: Any, owner: object = None) -> None:
        if owner not in self._by_owner:
            self._by_owner[owner] = deque()
            self._turns.append(owner)
        self._by_owner[owner].append(item)
        self._size += 1

    def popleft(self) -> Any:
        owner = self._turns.popleft()
        items = self._by_owner[owner]
        item = items.popleft()
        if items:
            self._turns.append(owner)
        else:
            del self._by_owner[owner]
        self._size -= 1
        return item

    def remove_if(self, predicate: Callable[[Any], bool]) -> int:
        removed = 0
        for owner in list(self._by_owner):
            kept = deque(i for i in self._by_owner[owner] if not predicate(i))
            removed += len(self._by_owner[owner]) - len(kept)
            if kept:
                self._by_owner[owner] = kept
            else:
                del self._by_owner[owner]
                self._turns.remove(owner)
        self._size -= removed
        return removed

    def __len__(self) -> int:
        return self._size


@dataclass
class Host:
    key: str
    limit: float
    active: int = 0
    queue: FairQueue = field(default_factory=FairQueue)
    resume_at: float = 0.0  # no new request before this (Retry-After, rate)
    failures: int = 0  # consecutive UNREACHABLE outcomes
    open_until: float | None = None  # breaker open until this time
    probing: bool = False  # half-open: one request is testing the host
    waking: bool = False  # a timer will make the host runnable again (pause, rate)

    def idle(self, policy: HostPolicy) -> bool:
        return (
            not self.active
            and not self.queue
            and self.failures == 0
            and self.open_until is None
            and self.limit >= policy.per_host
        )


class Scheduler(Generic[T]):
    """Runs ``work(item)`` for submitted items, at most ``slots`` at once, host rules permitting.

    ``reject(item)`` is called instead (and must record the item) for items of
    a host whose breaker is open. ``work`` may ``submit`` its item again with a
    delay (a retry); the scheduler is idle once every item has run to the end.
    """

    def __init__(
        self,
        policy: HostPolicy,
        slots: int,
        work: Callable[[T], Coroutine[Any, Any, None]],
        reject: Callable[[T], Coroutine[Any, Any, None]],
        clock: Callable[[], float] = time.monotonic,
        *,
        owner: Callable[[T], object] = lambda item: None,
    ) -> None:
        self._owner = owner
        self.policy = policy
        self._free = slots
        self._work = work
        self._reject = reject
        self._clock = clock
        self.hosts: dict[str, Host] = {}
        self._runnable: deque[Host] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: dict[asyncio.Task[None], T] = {}
        self._delayed: dict[asyncio.TimerHandle, T] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        self._pending = 0  # items queued, delayed or running
        self._idle = asyncio.Event()
        self._idle.set()
        self._cancelled = False

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def submit(self, key: str, item: T, delay: float = 0.0) -> None:
        self._pending += 1
        self._idle.clear()
        if delay > 0:

            def due() -> None:
                self._delayed.pop(handle, None)
                self._enqueue(key, item)

            handle = self._later(delay, due)
            self._delayed[handle] = item
        else:
            self._enqueue(key, item)

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def cancel(self) -> None:
        """Cancel running work and timers; nothing starts after this (queued items are dropped)."""
        self._cancelled = True
        for handle in self._timers:
            handle.cancel()
        for task in self._tasks:
            task.cancel()

    def discard(self, predicate: Callable[[T], bool]) -> None:
        """Forget the items ``predicate`` picks: queued and delayed ones are dropped,
        running ones cancelled (a crawl that ends early, a cancelled job)."""
        for host in list(self.hosts.values()):
            for _ in range(host.queue.remove_if(predicate)):
                self._item_done()
        for handle, item in list(self._delayed.items()):
            if predicate(item):
                handle.cancel()
                self._timers.discard(handle)
                del self._delayed[handle]
                self._item_done()
        for task, item in list(self._running.items()):
            if predicate(item):
                task.cancel()

    def done(self, key: str, outcome: Outcome, pause: float = 0.0) -> None:
        """Feed back how a request to ``key`` went; ``pause`` holds the whole host (Retry-After)."""
        host = self.hosts.get(key)
        if host is None:
            return
        now = self._clock()
        if pause > 0:
            host.resume_at = max(host.resume_at, now + pause)
        if outcome is Outcome.UNREACHABLE:
            host.failures += 1
            if host.probing or host.failures >= self.policy.breaker_threshold:
                host.open_until = now + self.policy.breaker_cooldown
                host.probing = False
                self._flush(host)
            return
        host.failures = 0
        if host.probing:
            host.open_until = None
            host.probing = False
        if not self.policy.adaptive:
            return
        if outcome is Outcome.THROTTLED:
            host.limit = max(1.0, host.limit / 2)
        else:
            host.limit = min(float(self.policy.per_host), host.limit + 1.0 / host.limit)

    def pump(self) -> None:
        """Start whatever may start now; hosts that can't go are revisited when they can."""
        if self._cancelled:
            return
        while self._free > 0 and self._runnable:
            host = self._runnable.popleft()
            if not host.queue:
                continue
            wait = self._wait(host)
            if wait is None:
                continue  # at its limit: a finishing request puts it back
            if wait > 0:
                if not host.waking:  # one timer per host, not one per queued item
                    host.waking = True
                    self._later(wait, functools.partial(self._wake, host))
                continue
            item = host.queue.popleft()
            host.active += 1
            host.probing = host.open_until is not None
            if self.policy.rate > 0:
                host.resume_at = self._clock() + 1.0 / self.policy.rate
            self._free -= 1
            probe = host.open_until if host.probing else None
            self._running[self._spawn(self._run(host, item, probe))] = item
            if host.queue:
                # Back of the line: other hosts get their turn first, but this
                # pass goes on while slots are free and the host has room.
                self._runnable.append(host)

    def _enqueue(self, key: str, item: T) -> None:
        if self._cancelled:
            return
        host = self.hosts.get(key)
        if host is None:
            host = self.hosts[key] = Host(key, float(self.policy.per_host))
        if self._is_open(host):
            self._spawn(self._finish_after(self._reject(item)))
            return
        host.queue.append(item, self._owner(item))
        self._make_runnable(host)

    def _make_runnable(self, host: Host) -> None:
        self._runnable.append(host)
        self.pump()

    def _wake(self, host: Host) -> None:
        host.waking = False
        self._make_runnable(host)

    async def _run(self, host: Host, item: T, probe: float | None) -> None:
        """``probe``: the breaker's ``open_until`` when this request is the half-open probe."""
        try:
            await self._work(item)
        finally:
            host.active -= 1
            self._free += 1
            if probe is not None and host.probing and host.open_until == probe:
                # The probe ended without a verdict (work raised, or never called
                # done): the host is still half-open and the next request probes.
                host.probing = False
            if host.idle(self.policy):
                self._forget(host)  # memory follows hosts in flight, not hosts seen
            elif host.queue:
                self._runnable.append(host)
            self._item_done()
            self.pump()

    def _forget(self, host: Host) -> None:
        """Drop an idle host, but not before its pause or rate interval is over."""
        if self.hosts.get(host.key) is not host or not host.idle(self.policy):
            return
        wait = host.resume_at - self._clock()
        if wait > 0:
            self._later(wait, functools.partial(self._forget, host))
        else:
            del self.hosts[host.key]

    async def _finish_after(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        finally:
            self._item_done()

    def _item_done(self) -> None:
        self._pending -= 1
        if self._pending == 0:
            self._idle.set()

    def _wait(self, host: Host) -> float | None:
        """Seconds until ``host`` may start a request, 0 for now, None while at its limit."""
        if self._is_open(host):
            self._flush(host)
            return None
        if host.probing or host.active >= max(1, math.floor(host.limit)):
            return None
        return max(0.0, host.resume_at - self._clock())

    def _is_open(self, host: Host) -> bool:
        """Breaker open and still cooling down (after that, one probe may go: half-open)."""
        return host.open_until is not None and self._clock() < host.open_until

    def _flush(self, host: Host) -> None:
        while host.queue:
            self._spawn(self._finish_after(self._reject(host.queue.popleft())))

    def _later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        def fire() -> None:
            self._timers.discard(handle)
            callback()

        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._timers.add(handle)
        return handle

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[None]) -> None:
        """Work and reject should not raise; if they do, log it (the slot is already back)."""
        self._tasks.discard(task)
        self._running.pop(task, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("scheduled work failed", exc_info=exc)
