"""The sd_notify protocol, for running under systemd with ``Type=notify`` and ``WatchdogSec=``.

systemd passes the address of its notification socket in ``$NOTIFY_SOCKET``:
a filesystem path, or an abstract-namespace name written with a leading
``@``. Each message is one datagram of newline-separated ``KEY=value`` lines
(``READY=1``, ``STATUS=...``, ``STOPPING=1``, ``WATCHDOG=1``). This is the
whole protocol as far as we need it, so we speak it directly instead of
depending on libsystemd or a wrapper package.

Without ``$NOTIFY_SOCKET`` (run by hand, in tests, in a container) every
method is a silent no-op. Sending never blocks and never raises: a service
must not stall or die because its supervisor's socket went away.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Mapping

log = logging.getLogger(__name__)

# systemd reads notifications into a buffer of PIPE_BUF (4096) bytes and
# drops a whole datagram that does not fit, so a long status would silently
# lose the message. 1 KiB of status leaves ample room and is more than any
# `systemctl status` line shows anyway.
MAX_STATUS_BYTES = 1024

# systemd also refuses a datagram with an embedded NUL, and a newline would
# start a new KEY=value line: a status text can carry neither.
_LINE_BREAKS = str.maketrans({"\n": " ", "\r": " ", "\0": " "})


def _parse_address(value: str | None) -> str | None:
    """The AF_UNIX address named by ``$NOTIFY_SOCKET``, or None when there is none we can use."""
    if not value:
        return None
    if value.startswith("@"):
        # Linux abstract namespace: the name is sun_path with a leading NUL byte.
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # systemd also knows vsock: addresses (for VMs); sd_notify rejects
    # relative paths. Neither applies to us, so say so once and stay quiet.
    log.warning("NOTIFY_SOCKET=%r is not an AF_UNIX address; notifications disabled", value)
    return None


def _parse_watchdog(env: Mapping[str, str]) -> float | None:
    """The watchdog timeout in seconds, or None when the watchdog is off or not ours."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    try:
        timeout = int(usec)
    except ValueError:
        log.warning("ignoring invalid WATCHDOG_USEC=%r", usec)
        return None
    if timeout <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        # The variables are inherited by children we start; the watchdog
        # belongs to the process systemd named, which then must do the pinging.
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            log.warning("ignoring invalid WATCHDOG_PID=%r", pid)
            return None
    return timeout / 1_000_000


class Notifier:
    """Sends sd_notify messages to the service manager; a no-op when there is none."""

    def __init__(self, address: str | None, watchdog_timeout: float | None = None) -> None:
        """``address`` is the AF_UNIX address itself (abstract names start with NUL)."""
        self._address = address
        self._watchdog_timeout = watchdog_timeout if address is not None else None
        self._sock: socket.socket | None = None
        # Created lazily, and status() may be called from a worker thread too:
        # the lock keeps two first calls from creating two sockets.
        self._lock = threading.Lock()
        self._warned = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Notifier:
        """A notifier for ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` in ``env``."""
        return cls(_parse_address(env.get("NOTIFY_SOCKET")), _parse_watchdog(env))

    @property
    def enabled(self) -> bool:
        """Whether there is a service manager to notify."""
        return self._address is not None

    def ready(self) -> None:
        """Start-up is finished: with ``Type=notify`` systemd waits for this."""
        self._send("READY=1")

    def stopping(self) -> None:
        """Shutdown has begun, so systemd shows "deactivating" rather than a hung service."""
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        """A one-line status for ``systemctl status``; newlines become spaces, long text is cut."""
        line = text.translate(_LINE_BREAKS).strip()
        # Cut by encoded size (the limit is in bytes); "ignore" drops a
        # multi-byte character split by the cut, "replace" keeps lone
        # surrogates (from undecodable file names) from raising.
        data = line.encode("utf-8", "replace")[:MAX_STATUS_BYTES]
        self._send("STATUS=" + data.decode("utf-8", "ignore"))

    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings, or None when no watchdog applies to us.

        systemd advises pinging at half the timeout, so one late ping is not fatal.
        """
        if self._watchdog_timeout is None:
            return None
        return self._watchdog_timeout / 2

    async def watchdog(self) -> None:
        """Ping the watchdog every interval until cancelled; return at once if there is none.

        The pings are sent from the event loop itself, never from a thread: the
        watchdog's point is that a blocked or wedged loop stops them, so systemd
        kills and restarts the service instead of leaving it hung.
        """
        interval = self.watchdog_interval()
        if interval is None:
            return
        while True:
            self._send("WATCHDOG=1")
            await asyncio.sleep(interval)

    def close(self) -> None:
        """Close the socket; a later message opens a new one."""
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _socket(self) -> socket.socket:
        with self._lock:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # A full receive queue on systemd's side must drop our message
                # (EAGAIN) rather than stall the event loop that sends it.
                sock.setblocking(False)
                self._sock = sock
            return self._sock

    def _send(self, message: str) -> None:
        if self._address is None:
            return
        try:
            self._socket().sendto(message.encode("utf-8"), self._address)
        except OSError as exc:
            # ENOENT / ECONNREFUSED (the socket went away), EAGAIN (queue
            # full), EMFILE...: none is worth failing the crawl for. Warn the
            # first time so the cause is visible, then keep the log quiet,
            # since the watchdog would otherwise repeat it forever.
            if self._warned:
                log.debug("sd_notify %r failed: %s", message, exc)
            else:
                self._warned = True
                log.warning(
                    "sd_notify %r failed: %s; further failures logged at debug", message, exc
                )
