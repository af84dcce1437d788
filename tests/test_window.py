"""The bodies held for the pool: bounded in count and in bytes, served in order."""

from __future__ import annotations

import asyncio

from crawler.pipeline import Window


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def waits_for_release(window: Window, n: int, held: int) -> None:
    """``acquire(n)`` waits while ``held`` is held, and gets in once it is released."""
    waiter = asyncio.create_task(window.acquire(n))
    await settle()
    assert not waiter.done()
    window.release(held)
    await asyncio.wait_for(waiter, 1)


async def test_count_bounds_the_window() -> None:
    window = Window(2, 1000)
    await window.acquire(1)
    await window.acquire(1)
    await waits_for_release(window, 1, held=1)


async def test_bytes_bound_the_window_but_one_large_body_is_always_let_in() -> None:
    window = Window(10, 100)
    await window.acquire(60)
    await waits_for_release(window, 60, held=60)  # 120 bytes would be over
    window.release(60)
    await asyncio.wait_for(window.acquire(500), 1)  # alone, over the size: let in
    await waits_for_release(window, 1, held=500)


async def test_a_large_body_is_not_overtaken_by_smaller_ones() -> None:
    window = Window(10, 100)
    await window.acquire(60)
    large = asyncio.create_task(window.acquire(60))
    await settle()
    small = asyncio.create_task(window.acquire(10))  # would fit, but the large one waits first
    await settle()
    assert not large.done() and not small.done()
    window.release(60)
    await asyncio.wait_for(asyncio.gather(large, small), 1)


async def test_a_cancelled_waiter_takes_nothing() -> None:
    window = Window(1, 100)
    await window.acquire(10)
    gone = asyncio.create_task(window.acquire(10))
    await settle()
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    window.release(10)
    await asyncio.wait_for(window.acquire(10), 1)  # the slot went to no one else
