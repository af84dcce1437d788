"""sd_notify against a real AF_UNIX datagram socket standing in for systemd.

Each test binds its own receiving socket (a file in a short temporary
directory, or a random abstract-namespace name) and hands its address to
``Notifier.from_env`` in a plain mapping, so ``os.environ`` is never touched.
Watchdog tests use WATCHDOG_USEC=200000: a ping every 0.1 s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from crawler.service.notify import MAX_STATUS_BYTES, Notifier

WATCHDOG_USEC = "200000"  # pings every 0.1 s


class Receiver:
    """The service manager's end: a bound datagram socket and the env naming it."""

    def __init__(self, sock: socket.socket, env_address: str) -> None:
        self.sock = sock
        self.env = {"NOTIFY_SOCKET": env_address}

    def recv(self, timeout: float = 1.0) -> bytes:
        self.sock.settimeout(timeout)
        return self.sock.recv(8192)

    def drain(self) -> list[bytes]:
        """Every datagram already queued, without waiting."""
        self.sock.setblocking(False)
        got: list[bytes] = []
        while True:
            try:
                got.append(self.sock.recv(8192))
            except BlockingIOError:
                return got


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    # Not tmp_path: sun_path holds only 108 bytes, and pytest's directories
    # with a long test name can come close to that.
    with tempfile.TemporaryDirectory(prefix="sdn-") as tmp:
        path = str(Path(tmp) / "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        try:
            yield Receiver(sock, path)
        finally:
            sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    if not sys.platform.startswith("linux"):
        pytest.skip("the abstract socket namespace is Linux-only")
    name = f"crawler-test-{secrets.token_hex(8)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        yield Receiver(sock, "@" + name)
    finally:
        sock.close()


def test_messages_to_path_socket(receiver: Receiver) -> None:
    notifier = Notifier.from_env(receiver.env)
    assert notifier.enabled
    notifier.ready()
    notifier.status("crawling 3 hosts")
    notifier.stopping()
    assert [receiver.recv() for _ in range(3)] == [
        b"READY=1",
        b"STATUS=crawling 3 hosts",
        b"STOPPING=1",
    ]
    notifier.close()


def test_messages_to_abstract_socket(abstract_receiver: Receiver) -> None:
    notifier = Notifier.from_env(abstract_receiver.env)
    notifier.ready()
    notifier.status("ok")
    assert abstract_receiver.recv() == b"READY=1"
    assert abstract_receiver.recv() == b"STATUS=ok"
    notifier.close()


def test_status_is_one_line_and_bounded(receiver: Receiver) -> None:
    notifier = Notifier.from_env(receiver.env)
    notifier.status("  first\nsecond\r\nthird\0\n")
    assert receiver.recv() == b"STATUS=first second  third"
    # "é" is two bytes in UTF-8: the cut must not leave half a character.
    notifier.status("é" * MAX_STATUS_BYTES)
    assert receiver.recv() == ("STATUS=" + "é" * (MAX_STATUS_BYTES // 2)).encode()
    notifier.status("x" * (MAX_STATUS_BYTES + 1) + "é")
    assert receiver.recv() == b"STATUS=" + b"x" * MAX_STATUS_BYTES
    # A lone surrogate (an undecodable file name) must not raise.
    notifier.status("file \udcff")
    assert receiver.recv() == b"STATUS=file ?"
    notifier.close()


def test_watchdog_interval() -> None:
    base = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    assert Notifier.from_env({**base, "WATCHDOG_USEC": "30000000"}).watchdog_interval() == 15.0
    mine = {**base, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_env(mine).watchdog_interval() == 0.1
    other = {**base, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_env(other).watchdog_interval() is None
    assert Notifier.from_env(base).watchdog_interval() is None
    assert Notifier.from_env({**base, "WATCHDOG_USEC": "0"}).watchdog_interval() is None
    assert Notifier.from_env({**base, "WATCHDOG_USEC": "soon"}).watchdog_interval() is None
    # Nobody to ping: no watchdog, whatever WATCHDOG_USEC says.
    assert Notifier.from_env({"WATCHDOG_USEC": "200000"}).watchdog_interval() is None


async def test_watchdog_pings_from_the_loop(receiver: Receiver) -> None:
    env = {**receiver.env, "WATCHDOG_USEC": WATCHDOG_USEC, "WATCHDOG_PID": str(os.getpid())}
    notifier = Notifier.from_env(env)
    task = asyncio.create_task(notifier.watchdog())
    await asyncio.sleep(0.45)
    pings = receiver.drain()
    assert len(pings) >= 3 and set(pings) == {b"WATCHDOG=1"}, pings
    # Block the loop: a watchdog that pings from a thread would carry on, and
    # systemd would never learn the service is stuck.
    time.sleep(0.35)
    assert receiver.drain() == []
    # Once the loop runs again, so do the pings.
    await asyncio.sleep(0.02)
    assert receiver.drain() == [b"WATCHDOG=1"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    notifier.close()


@pytest.mark.parametrize("other_pid", [False, True], ids=["no-usec", "other-pid"])
async def test_watchdog_returns_at_once_without_a_watchdog(
    receiver: Receiver, other_pid: bool
) -> None:
    extra = {"WATCHDOG_USEC": WATCHDOG_USEC, "WATCHDOG_PID": str(os.getpid() + 1)}
    notifier = Notifier.from_env({**receiver.env, **(extra if other_pid else {})})
    async with asyncio.timeout(0.1):
        await notifier.watchdog()
    assert receiver.drain() == []


async def test_no_notify_socket_is_a_silent_noop(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="crawler.service.notify")
    notifier = Notifier.from_env({"WATCHDOG_USEC": WATCHDOG_USEC})
    assert not notifier.enabled
    notifier.ready()
    notifier.status("hello")
    notifier.stopping()
    async with asyncio.timeout(0.1):
        await notifier.watchdog()
    assert notifier._sock is None  # not even a socket was made
    assert caplog.records == []


@pytest.mark.parametrize("unlink", [True, False], ids=["unlinked", "closed"])
async def test_vanished_socket_is_logged_once(
    receiver: Receiver, unlink: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="crawler.service.notify")
    notifier = Notifier.from_env({**receiver.env, "WATCHDOG_USEC": WATCHDOG_USEC})
    notifier.ready()
    assert receiver.recv() == b"READY=1"
    task = asyncio.create_task(notifier.watchdog())
    await asyncio.sleep(0.05)
    # The manager goes away: its socket closes (ECONNREFUSED) and may be
    # removed too (ENOENT).
    receiver.sock.close()
    if unlink:
        os.unlink(receiver.env["NOTIFY_SOCKET"])
    notifier.status("still here")
    notifier.stopping()
    await asyncio.sleep(0.25)
    assert not task.done()  # the watchdog kept going through the failures
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert len(caplog.records) >= 4  # the later failures still show at debug
    notifier.close()


def test_abstract_socket_vanishing_does_not_raise(abstract_receiver: Receiver) -> None:
    notifier = Notifier.from_env(abstract_receiver.env)
    abstract_receiver.sock.close()
    notifier.ready()
    notifier.status("x")
    notifier.close()


def test_unusable_address_disables_notifications(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234", "WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval() is None
    notifier.ready()
    assert notifier._sock is None
    assert len(caplog.records) == 1
