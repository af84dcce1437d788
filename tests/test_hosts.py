"""The host scheduler, driven by fake work whose every step the test controls.

Items are strings ``"<host>/<n>"``; the host key is the part before the slash.
Work either waits on a per-item gate the test opens (``hold=True``) or runs
through a plan by itself; either way it records when it started, how many ran
at once (globally and per host), and feeds ``done``/``submit`` back as told.
Breaker tests use a fake clock (no timers involved); pause and rate tests use
the real clock with delays of at most 0.15 s.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from crawler.hosts import HostPolicy, Outcome, Scheduler


def key_of(item: str) -> str:
    return item.split("/", maxsplit=1)[0]


@dataclass
class Step:
    """What one attempt of an item does once it may go on."""

    outcome: Outcome | None = None  # fed to done(); None: done() is not called
    pause: float = 0.0
    resubmit: float | None = None  # submit the item again with this delay
    error: Exception | None = None  # raise this instead of finishing
    spins: int = 1  # event-loop turns the attempt takes (hold=False)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Rig:
    def __init__(
        self,
        policy: HostPolicy | None = None,
        slots: int = 4,
        *,
        clock: Callable[[], float] = time.monotonic,
        hold: bool = True,
    ) -> None:
        self.sched: Scheduler[str] = Scheduler(
            policy or HostPolicy(), slots, self.work, self.reject, clock
        )
        self.hold = hold
        self.gates: dict[str, asyncio.Event] = {}
        self.plans: dict[str, list[Step]] = {}
        self.started: list[str] = []
        self.times: dict[str, list[float]] = {}
        self.finished: list[str] = []
        self.rejected: list[str] = []
        self.cancelled: list[str] = []
        self.running: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.peak_total = 0
        self.moved = asyncio.Event()  # set (and replaced) whenever an attempt starts

    def submit(self, *items: str, delay: float = 0.0) -> None:
        for item in items:
            self.sched.submit(key_of(item), item, delay)

    def plan(self, item: str, *steps: Step) -> None:
        self.plans.setdefault(item, []).extend(steps)

    def release(self, item: str, step: Step | None = None) -> None:
        """Let a held attempt of ``item`` go on, doing ``step``."""
        assert item in self.gates, f"{item} is not running"
        if step is not None:
            self.plan(item, step)
        self.gates.pop(item).set()

    async def work(self, item: str) -> None:
        key = key_of(item)
        self.started.append(item)
        self.times.setdefault(item, []).append(time.monotonic())
        self.moved.set()
        self.moved = asyncio.Event()
        self.running[key] += 1
        self.peak[key] = max(self.peak[key], self.running[key])
        self.peak_total = max(self.peak_total, sum(self.running.values()))
        try:
            if self.hold:
                gate = self.gates[item] = asyncio.Event()
                await gate.wait()
            plan = self.plans.get(item)
            step = plan.pop(0) if plan else Step()
            if not self.hold:
                for _ in range(step.spins):
                    await asyncio.sleep(0)
            if step.error is not None:
                raise step.error
            if step.outcome is not None:
                self.sched.done(key, step.outcome, step.pause)
            if step.resubmit is not None:
                self.sched.submit(key, item, step.resubmit)
        except asyncio.CancelledError:
            self.cancelled.append(item)
            raise
        finally:
            self.running[key] -= 1
        self.finished.append(item)

    async def reject(self, item: str) -> None:
        await asyncio.sleep(0)
        self.rejected.append(item)

    def active(self, key: str) -> int:
        return self.running[key]

    async def wait_started(self, item: str, count: int = 1) -> float:
        """Wait (really, at most 1 s) until ``item`` has started ``count`` times; that start."""
        async with asyncio.timeout(1.0):
            while len(self.times.get(item, [])) < count:
                await self.moved.wait()
        return self.times[item][count - 1]

    async def idle(self) -> None:
        async with asyncio.timeout(2.0):
            await self.sched.wait_idle()


async def ticks(n: int = 10) -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(n):
        await asyncio.sleep(0)


def items(key: str, n: int, start: int = 0) -> list[str]:
    return [f"{key}/{i}" for i in range(start, start + n)]


# --- global slots and idleness ------------------------------------------------


async def test_global_slots_are_never_exceeded_and_every_item_completes() -> None:
    rig = Rig(HostPolicy(per_host=8), slots=3, hold=False)
    every = [f"{k}/{i}" for i in range(5) for k in "abcd"]
    for n, item in enumerate(every):
        rig.plan(item, Step(spins=n % 5 + 1))
    rig.submit(*every)

    await rig.idle()
    await ticks(1)  # the last task's done-callback

    assert rig.peak_total == 3
    assert sorted(rig.started) == sorted(every)  # each exactly once
    assert sorted(rig.finished) == sorted(every)
    assert rig.sched.in_flight == 0
    assert rig.sched.hosts == {}


async def test_wait_idle_returns_only_after_the_last_item() -> None:
    rig = Rig(HostPolicy(per_host=8), slots=2)
    rig.submit("a/0", "a/1", "b/0")
    waiter = asyncio.create_task(rig.sched.wait_idle())
    await ticks()
    assert rig.started == ["a/0", "a/1"]

    for item in ["a/0", "a/1"]:
        rig.release(item)
        await ticks()
        assert not waiter.done()
    assert rig.started == ["a/0", "a/1", "b/0"]
    rig.release("b/0")
    await asyncio.wait_for(waiter, 1.0)
    assert rig.finished == ["a/0", "a/1", "b/0"]


async def test_delayed_submit_counts_as_pending() -> None:
    rig = Rig(hold=False)
    t0 = time.monotonic()
    rig.submit("a/0", delay=0.05)
    waiter = asyncio.create_task(rig.sched.wait_idle())
    await asyncio.sleep(0.02)
    assert not waiter.done()
    assert rig.started == []

    await asyncio.wait_for(waiter, 1.0)
    assert rig.finished == ["a/0"]
    assert rig.times["a/0"][0] - t0 >= 0.05


async def test_retry_resubmitted_from_work_keeps_the_scheduler_busy() -> None:
    rig = Rig(hold=False)
    rig.plan("a/0", Step(Outcome.THROTTLED, resubmit=0.05), Step(Outcome.OK))
    rig.submit("a/0")
    waiter = asyncio.create_task(rig.sched.wait_idle())
    await asyncio.sleep(0.02)
    assert rig.finished == ["a/0"]  # the first attempt is over, its retry is not
    assert not waiter.done()

    await asyncio.wait_for(waiter, 1.0)
    assert rig.started == ["a/0", "a/0"]
    assert rig.finished == ["a/0", "a/0"]
    first, second = rig.times["a/0"]
    assert second - first >= 0.05


async def test_done_for_a_host_not_in_flight_is_ignored() -> None:
    rig = Rig()
    rig.sched.done("nobody", Outcome.THROTTLED, pause=10.0)
    assert rig.sched.hosts == {}
    rig.submit("nobody/0")
    await ticks()
    assert rig.started == ["nobody/0"]
    rig.release("nobody/0")
    await rig.idle()


# --- per-host limit and fairness ----------------------------------------------


async def test_per_host_limit_while_other_hosts_proceed() -> None:
    rig = Rig(HostPolicy(per_host=2), slots=6)
    rig.submit(*items("a", 5), *items("b", 5))
    await ticks()
    assert rig.started == ["a/0", "a/1", "b/0", "b/1"]
    assert rig.sched.in_flight == 4  # two slots free, but both hosts at their limit

    rig.release("a/0")
    await ticks()
    assert rig.started[4:] == ["a/2"]
    assert (rig.active("a"), rig.active("b")) == (2, 2)

    while rig.gates:
        rig.release(next(iter(rig.gates)))
        await ticks()
    await rig.idle()
    assert rig.peak == Counter({"a": 2, "b": 2})
    assert sorted(rig.finished) == sorted(items("a", 5) + items("b", 5))


async def test_host_at_its_limit_does_not_block_hosts_queued_behind_it() -> None:
    rig = Rig(HostPolicy(per_host=2), slots=4)
    rig.submit(*items("a", 50))
    rig.submit(*items("b", 5))
    await ticks()
    assert rig.started == ["a/0", "a/1", "b/0", "b/1"]

    # Finish the oldest running item, one at a time.
    while rig.gates:
        rig.release(next(iter(rig.gates)))
        await ticks()
    await rig.idle()

    assert rig.started[:11] == [
        "a/0", "a/1", "b/0", "b/1", "a/2", "a/3", "b/2", "b/3", "a/4", "a/5", "b/4",
    ]  # fmt: skip
    assert len(rig.started) == 55
    assert rig.peak == Counter({"a": 2, "b": 2})
    assert rig.peak_total == 4


# --- AIMD ---------------------------------------------------------------------


async def test_aimd_throttled_halves_ok_adds_one_over_limit() -> None:
    rig = Rig(HostPolicy(per_host=3))
    rig.submit("a/0")  # keeps the host in flight while we feed outcomes
    await ticks()
    host = rig.sched.hosts["a"]
    assert host.limit == 3.0

    seen = []
    for outcome in [Outcome.THROTTLED, Outcome.THROTTLED, Outcome.THROTTLED]:
        rig.sched.done("a", outcome)
        seen.append(host.limit)
    assert seen == [1.5, 1.0, 1.0]  # never below 1

    seen = []
    for _ in range(4):
        rig.sched.done("a", Outcome.OK)
        seen.append(host.limit)
    assert seen == pytest.approx([2.0, 2.5, 2.9, 3.0])  # +1/limit, capped at per_host
    rig.release("a/0")
    await rig.idle()


async def test_aimd_disabled_keeps_the_limit() -> None:
    rig = Rig(HostPolicy(per_host=4, adaptive=False), slots=8)
    rig.submit(*items("a", 8))
    await ticks()
    assert rig.active("a") == 4
    for item in items("a", 4):
        rig.release(item, Step(Outcome.THROTTLED))
        await ticks()
    assert rig.sched.hosts["a"].limit == 4.0
    assert rig.active("a") == 4
    assert rig.started == items("a", 8)
    for item in items("a", 4, 4):
        rig.release(item)
    await rig.idle()
    assert rig.sched.hosts == {}


async def test_concurrency_follows_the_adaptive_limit() -> None:
    rig = Rig(HostPolicy(per_host=4), slots=10)
    rig.submit(*items("a", 10))
    await ticks()
    assert rig.active("a") == 4

    async def finish(item: str, outcome: Outcome | None = None) -> None:
        rig.release(item, Step(outcome))
        await ticks()

    await finish("a/0", Outcome.THROTTLED)  # limit 2, 3 still running
    assert (rig.active("a"), len(rig.started)) == (3, 4)
    await finish("a/1")
    assert (rig.active("a"), len(rig.started)) == (2, 4)
    await finish("a/2")  # below the limit: one more starts
    assert (rig.active("a"), len(rig.started)) == (2, 5)
    await finish("a/3", Outcome.OK)  # 2.5
    assert (rig.active("a"), len(rig.started)) == (2, 6)
    await finish("a/4", Outcome.OK)  # 2.9
    assert (rig.active("a"), len(rig.started)) == (2, 7)
    await finish("a/5", Outcome.OK)  # 3.24: room for two
    assert (rig.active("a"), len(rig.started)) == (3, 9)
    assert rig.sched.hosts["a"].limit == pytest.approx(2.9 + 1 / 2.9)

    while rig.gates:
        await finish(next(iter(rig.gates)))
    await rig.idle()
    assert rig.peak["a"] == 4


# --- Retry-After pause and rate -----------------------------------------------


async def test_retry_after_pause_holds_only_that_host() -> None:
    rig = Rig(HostPolicy(per_host=1, adaptive=False), slots=4)
    rig.submit("a/0", "a/1", "b/0", "b/1")
    await ticks()
    assert rig.started == ["a/0", "b/0"]

    t0 = time.monotonic()
    rig.release("a/0", Step(Outcome.THROTTLED, pause=0.15))
    rig.release("b/0")
    await ticks()
    assert rig.started == ["a/0", "b/0", "b/1"]  # b is not held
    await asyncio.sleep(0.1)
    assert "a/1" not in rig.started

    started = await rig.wait_started("a/1")
    assert 0.15 <= started - t0 < 0.25
    rig.release("a/1")
    rig.release("b/1")
    await rig.idle()


async def test_all_the_room_is_used_when_a_pause_ends() -> None:
    rig = Rig(HostPolicy(per_host=3, adaptive=False), slots=8)
    rig.submit(*items("a", 6))
    await ticks()
    assert rig.started == ["a/0", "a/1", "a/2"]
    for item in ["a/0", "a/1", "a/2"]:
        rig.release(item, Step(Outcome.OK, pause=0.05))
    await ticks()
    assert rig.active("a") == 0

    await rig.wait_started("a/3")
    await ticks()
    assert rig.started[3:] == ["a/3", "a/4", "a/5"]  # together, not one per finished request
    assert rig.active("a") == 3
    for item in items("a", 3, 3):
        rig.release(item)
    await rig.idle()


async def test_pause_outlives_the_hosts_last_request() -> None:
    # Nothing else marks the host (adaptive off): the pause alone must keep it.
    rig = Rig(HostPolicy(adaptive=False))
    rig.submit("a/0")
    await ticks()
    t0 = time.monotonic()
    rig.release("a/0", Step(Outcome.THROTTLED, pause=0.15))
    await rig.idle()
    assert "a" in rig.sched.hosts

    rig.submit("a/1")  # e.g. the retry, or the next URL of the host
    await ticks()
    assert rig.started == ["a/0"]
    started = await rig.wait_started("a/1")
    assert 0.15 <= started - t0 < 0.25
    rig.release("a/1")
    await rig.idle()
    assert rig.sched.hosts == {}


async def test_paused_host_is_dropped_once_the_pause_is_over() -> None:
    rig = Rig(HostPolicy(adaptive=False), hold=False)
    rig.plan("a/0", Step(Outcome.OK, pause=0.05))
    rig.submit("a/0")
    await rig.idle()
    assert list(rig.sched.hosts) == ["a"]
    await asyncio.sleep(0.1)
    assert rig.sched.hosts == {}


async def test_rate_spaces_the_starts_of_one_host() -> None:
    rig = Rig(HostPolicy(per_host=8, rate=10.0), slots=8, hold=False)
    rig.submit(*items("a", 4), "b/0")
    await rig.idle()

    starts = [rig.times[item][0] for item in items("a", 4)]
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert len(gaps) == 3
    assert all(0.099 <= gap < 0.15 for gap in gaps), gaps
    assert rig.times["b/0"][0] - starts[0] < 0.05  # another host's rate is its own


async def test_rate_holds_across_a_gap_in_the_hosts_traffic() -> None:
    rig = Rig(HostPolicy(rate=10.0), hold=False)
    rig.submit("a/0")
    await rig.idle()
    rig.submit("a/1")  # the host had nothing in flight in between
    await rig.idle()
    assert rig.times["a/1"][0] - rig.times["a/0"][0] >= 0.099


async def test_rate_limited_host_waits_on_one_timer_not_one_per_item() -> None:
    rig = Rig(HostPolicy(per_host=8, rate=10.0), slots=8)
    rig.submit(*items("a", 30))
    await ticks()
    assert rig.started == ["a/0"]
    assert len(rig.sched._timers) == 1
    await rig.wait_started("a/1")
    await ticks()
    assert len(rig.sched._timers) == 1
    rig.sched.cancel()


# --- circuit breaker ----------------------------------------------------------

BREAKER = HostPolicy(per_host=1, breaker_threshold=3, breaker_cooldown=30.0)


async def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    clock = FakeClock()
    rig = Rig(BREAKER, slots=4, clock=clock)
    rig.submit(*items("a", 6), "b/0")
    await ticks()
    assert rig.started == ["a/0", "b/0"]

    for n in range(3):
        rig.release(f"a/{n}", Step(Outcome.UNREACHABLE))
        await ticks()
    assert rig.started == ["a/0", "b/0", "a/1", "a/2"]
    assert rig.rejected == ["a/3", "a/4", "a/5"]
    host = rig.sched.hosts["a"]
    assert (host.failures, host.open_until) == (3, 1030.0)

    rig.submit("a/6")
    clock.now = 1029.9
    rig.submit("a/7", "b/1")
    await ticks()
    assert rig.rejected == ["a/3", "a/4", "a/5", "a/6", "a/7"]
    rig.release("b/0")
    await ticks()
    assert rig.started[-1] == "b/1"  # the other host is not affected
    rig.release("b/1")
    await rig.idle()
    assert Counter(rig.started + rig.rejected) == Counter([*items("a", 8), "b/0", "b/1"])
    assert list(rig.sched.hosts) == ["a"]  # the open breaker is remembered


async def test_breaker_rejects_at_once_even_with_no_slot_free() -> None:
    policy = HostPolicy(per_host=2, breaker_threshold=1, breaker_cooldown=30.0)
    rig = Rig(policy, slots=2, clock=FakeClock())
    rig.submit("a/0", "b/0", "b/1", "a/1", "a/2")
    await ticks()
    assert rig.started == ["a/0", "b/0"]

    rig.release("a/0", Step(Outcome.UNREACHABLE))  # its slot goes to b/1
    await ticks()
    assert rig.started == ["a/0", "b/0", "b/1"]
    assert rig.rejected == ["a/1", "a/2"]  # not left queued until a slot frees
    rig.submit("a/3")  # all slots busy
    await ticks()
    assert rig.rejected == ["a/1", "a/2", "a/3"]
    rig.release("b/0")
    rig.release("b/1")
    await rig.idle()
    assert rig.started == ["a/0", "b/0", "b/1"]


async def test_ok_between_failures_resets_the_count() -> None:
    rig = Rig(BREAKER, clock=FakeClock(), hold=False)
    down, up = Outcome.UNREACHABLE, Outcome.OK
    for n, outcome in enumerate([down, down, up, down, down]):
        rig.plan(f"a/{n}", Step(outcome))
    rig.submit(*items("a", 5))
    await rig.idle()
    assert rig.rejected == []
    assert rig.sched.hosts["a"].failures == 2
    assert rig.sched.hosts["a"].open_until is None

    rig.plan("a/5", Step(Outcome.UNREACHABLE))
    rig.submit("a/5", "a/6")
    await rig.idle()
    assert rig.rejected == ["a/6"]
    assert rig.sched.hosts["a"].open_until == 1030.0


async def _open_and_cool(clock: FakeClock) -> Rig:
    """A host whose breaker opened and cooled down; a/10..a/12 queued, a/10 probing."""
    policy = HostPolicy(per_host=4, breaker_threshold=2, breaker_cooldown=30.0)
    rig = Rig(policy, slots=8, clock=clock)
    rig.submit("a/0", "a/1")
    await ticks()
    rig.release("a/0", Step(Outcome.UNREACHABLE))
    rig.release("a/1", Step(Outcome.UNREACHABLE))
    await ticks()
    assert rig.sched.hosts["a"].open_until == 1030.0

    clock.now = 1030.0  # the cool-down is over: half-open
    rig.submit("a/10", "a/11", "a/12")
    await ticks()
    assert rig.started == ["a/0", "a/1", "a/10"]  # one probe, the rest wait
    assert rig.sched.hosts["a"].probing
    return rig


async def test_half_open_probe_success_closes_the_breaker() -> None:
    clock = FakeClock()
    rig = await _open_and_cool(clock)
    rig.release("a/10", Step(Outcome.OK))
    await ticks()
    assert rig.started[3:] == ["a/11", "a/12"]  # together: the host is trusted again
    host = rig.sched.hosts["a"]
    assert (host.failures, host.open_until, host.probing) == (0, None, False)
    rig.release("a/11")
    rig.release("a/12")
    await rig.idle()
    assert rig.rejected == []
    assert rig.sched.hosts == {}


async def test_half_open_probe_failure_reopens_the_breaker() -> None:
    clock = FakeClock()
    rig = await _open_and_cool(clock)
    clock.now = 1031.0
    rig.release("a/10", Step(Outcome.UNREACHABLE))
    await ticks()
    assert rig.rejected == ["a/11", "a/12"]
    host = rig.sched.hosts["a"]
    assert (host.failures, host.open_until, host.probing) == (3, 1061.0, False)
    rig.submit("a/13")
    await rig.idle()
    assert rig.rejected == ["a/11", "a/12", "a/13"]
    assert rig.started == ["a/0", "a/1", "a/10"]


async def test_late_success_keeps_the_breaker_open_and_a_failed_probe_reopens_it() -> None:
    # A request sent before the breaker opened answers OK while it is open: the
    # failure count is reset, but the breaker stays open; the probe's failure
    # must reopen it although the count is then below the threshold.
    clock = FakeClock()
    policy = HostPolicy(per_host=4, breaker_threshold=2, breaker_cooldown=30.0)
    rig = Rig(policy, slots=8, clock=clock)
    rig.submit("a/0", "a/1", "a/2")
    await ticks()
    rig.release("a/0", Step(Outcome.UNREACHABLE))
    rig.release("a/1", Step(Outcome.UNREACHABLE))
    await ticks()
    rig.release("a/2", Step(Outcome.OK))
    await ticks()
    host = rig.sched.hosts["a"]
    assert (host.failures, host.open_until) == (0, 1030.0)
    rig.submit("a/3")
    await ticks()
    assert rig.rejected == ["a/3"]

    clock.now = 1030.0
    rig.submit("a/4", "a/5")
    await ticks()
    assert rig.started[3:] == ["a/4"]
    clock.now = 1040.0
    rig.release("a/4", Step(Outcome.UNREACHABLE))
    await rig.idle()
    assert (host.failures, host.open_until) == (1, 1070.0)
    assert rig.rejected == ["a/3", "a/5"]


@pytest.mark.parametrize("ending", ["return", "raise"])
async def test_probe_ending_without_a_verdict_lets_the_next_item_probe(ending: str) -> None:
    # The pipeline's work returns without done() when robots.txt disallows the
    # URL, and an internal error skips it too: the host must not stay half-open.
    clock = FakeClock()
    rig = await _open_and_cool(clock)
    step = Step(error=RuntimeError("probe broke")) if ending == "raise" else Step()
    rig.release("a/10", step)
    await ticks()
    assert rig.started[3:] == ["a/11"]  # the next probe, alone
    assert rig.sched.hosts["a"].probing
    rig.release("a/11", Step(Outcome.OK))
    await ticks()
    assert rig.started[3:] == ["a/11", "a/12"]
    rig.release("a/12")
    await rig.idle()
    assert rig.rejected == []


async def test_rejects_count_as_pending() -> None:
    gate, running = asyncio.Event(), asyncio.Event()
    rejected: list[str] = []

    async def work(item: str) -> None:
        await running.wait()

    async def reject(item: str) -> None:
        await gate.wait()
        rejected.append(item)

    clock = FakeClock()
    sched: Scheduler[str] = Scheduler(HostPolicy(breaker_threshold=1), 2, work, reject, clock=clock)
    sched.submit("a", "a/0")
    await ticks()
    sched.done("a", Outcome.UNREACHABLE)  # a/0 is still running: the host is known
    await ticks()
    sched.submit("a", "a/1")
    waiter = asyncio.create_task(sched.wait_idle())
    await ticks()
    assert not waiter.done()
    running.set()
    await ticks()
    assert not waiter.done()  # a/0 is over, the reject of a/1 is not
    gate.set()
    await asyncio.wait_for(waiter, 1.0)
    assert rejected == ["a/1"]


# --- memory: hosts in flight, not hosts seen ----------------------------------


async def test_idle_hosts_are_dropped() -> None:
    rig = Rig(HostPolicy(per_host=2), slots=3, hold=False)
    every = [f"h{k}/{i}" for k in range(20) for i in range(2)]
    rig.submit(*every)
    assert len(rig.sched.hosts) == 20  # queued counts as in flight
    await rig.idle()
    assert rig.sched.hosts == {}
    for k in range(5):
        rig.submit(f"x{k}/0")
        await rig.idle()
        assert rig.sched.hosts == {}
    assert len(rig.finished) == 45


async def test_hosts_with_state_are_kept_until_it_is_gone() -> None:
    clock = FakeClock()
    policy = HostPolicy(per_host=2, breaker_threshold=2, breaker_cooldown=30.0)
    rig = Rig(policy, slots=8, clock=clock, hold=False)
    rig.plan("a/0", Step(Outcome.THROTTLED))
    rig.plan("b/0", Step(Outcome.UNREACHABLE))
    rig.plan("c/0", Step(Outcome.UNREACHABLE))
    rig.plan("c/1", Step(Outcome.UNREACHABLE))
    rig.plan("d/0", Step(Outcome.OK))
    rig.submit("a/0", "b/0", "c/0", "c/1", "d/0", "e/0")
    await rig.idle()
    hosts = rig.sched.hosts
    assert sorted(hosts) == ["a", "b", "c"]
    assert hosts["a"].limit == 1.0
    assert hosts["b"].failures == 1
    assert hosts["c"].open_until == 1030.0

    rig.plan("a/1", Step(Outcome.OK))  # limit back to per_host
    rig.plan("b/1", Step(Outcome.OK))  # failures back to 0
    rig.submit("a/1", "b/1")
    await rig.idle()
    assert sorted(hosts) == ["c"]


# --- cancel and errors --------------------------------------------------------


async def test_cancel_stops_running_work_queued_items_and_timers() -> None:
    rig = Rig(HostPolicy(per_host=8), slots=2)
    rig.submit(*items("a", 4))
    rig.submit("b/0", delay=0.05)
    await ticks()
    assert rig.started == ["a/0", "a/1"]

    rig.sched.cancel()
    assert [timer.cancelled() for timer in rig.sched._timers] == [True]
    await ticks()
    assert sorted(rig.cancelled) == ["a/0", "a/1"]
    assert rig.started == ["a/0", "a/1"]  # the freed slots start nothing
    assert rig.sched.in_flight == 0
    await asyncio.sleep(0.08)
    assert rig.started == ["a/0", "a/1"]  # the delayed item never comes
    assert rig.finished == []


async def test_exception_in_work_releases_the_slot_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(HostPolicy(per_host=8), slots=2, hold=False)
    rig.plan("a/0", Step(error=RuntimeError("boom 0")))
    rig.plan("a/1", Step(error=RuntimeError("boom 1")))
    with caplog.at_level(logging.ERROR):
        rig.submit("a/0", "a/1", "b/0")
        await rig.idle()
        await ticks(1)
        gc.collect()
    assert rig.started == ["a/0", "a/1", "b/0"]
    assert rig.finished == ["b/0"]
    assert rig.sched.in_flight == 0
    assert rig.sched.hosts == {}
    errors = [r for r in caplog.records if r.exc_info]
    assert [(r.name, str(r.exc_info[1])) for r in errors if r.exc_info] == [
        ("crawler.hosts", "boom 0"),
        ("crawler.hosts", "boom 1"),
    ]
    assert not [r for r in caplog.records if r.name == "asyncio"]

    # Both slots are still there, and no more than that.
    rig.hold = True
    rig.submit(*items("c", 3))
    await ticks()
    assert rig.started[3:] == ["c/0", "c/1"]
    rig.sched.cancel()
