"""``python -m crawler serve`` as systemd runs it: notify protocol, stop and restart mid-job."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from crawler import samples
from tests.server import LocalServer

TOKEN = "serve-test-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Notifications:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="sdn-")  # AF_UNIX paths are short
        self.path = str(Path(self._dir.name) / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.seen: list[str] = []

    async def expect(self, message: str) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(20):
            while message not in self.seen:
                self.seen.append((await loop.sock_recv(self.sock, 4096)).decode())

    def close(self) -> None:
        self.sock.close()
        self._dir.cleanup()


@pytest.fixture
async def notify() -> AsyncIterator[Notifications]:
    n = Notifications()
    yield n
    n.close()


async def start(state: Path, port: int, notify: Notifications) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "STATE_DIRECTORY": str(state),
        "CRAWLER_TOKEN": TOKEN,
        "CRAWLER_SERVICE_ALLOW_RANGES": "127.0.0.0/8",
        "CRAWLER_SERVICE_ALLOWED_PORTS": "",
        "CRAWLER_SERVICE_MIN_FREE_BYTES": "0",
        "CRAWLER_CRAWL_GRACE_PERIOD": "0.5",
        "CRAWLER_HOSTS_PER_HOST": "2",
        "CRAWLER_POOL_WORKERS": "1",
        "NOTIFY_SOCKET": notify.path,
        "WATCHDOG_USEC": "200000",
    }
    notify.seen.clear()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "crawler", "serve", "--port", str(port), env=env
    )
    await notify.expect("READY=1")
    return proc


async def api(port: int, method: str, path: str, **kwargs: object) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    url = f"http://127.0.0.1:{port}{path}"
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.request(method, url, **kwargs) as resp,  # type: ignore[arg-type]
    ):
        if resp.content_type == "application/x-ndjson":
            return {"lines": (await resp.text()).splitlines()}
        body: dict[str, object] = await resp.json()
        return body


async def wait_done(port: int, job_id: str) -> dict[str, object]:
    async with asyncio.timeout(60):
        while (job := await api(port, "GET", f"/v1/jobs/{job_id}"))["state"] != "done":
            await asyncio.sleep(0.05)
    return job


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
async def test_stop_mid_job_then_restart_completes_it(
    stop: signal.Signals, server: LocalServer, notify: Notifications, tmp_path: Path
) -> None:
    n = 60
    server.delay = 0.05
    urls = [server.add(f"{i}.gif", samples.gif_palette(10 + i, 10)) for i in range(n)]
    port = free_port()
    proc = await start(tmp_path, port, notify)
    await notify.expect("WATCHDOG=1")
    job = await api(port, "POST", "/v1/jobs", json={"urls": urls})
    while sum(server.hits.values()) < 15:
        await asyncio.sleep(0.01)
    proc.send_signal(stop)
    assert await asyncio.wait_for(proc.wait(), 10) == (0 if stop == signal.SIGTERM else -9)
    if stop == signal.SIGTERM:
        await notify.expect("STOPPING=1")

    proc = await start(tmp_path, port, notify)
    try:
        done = await wait_done(port, str(job["id"]))
        lines = (await api(port, "GET", f"/v1/jobs/{job['id']}/records"))["lines"]
        assert isinstance(lines, list)
        records = [json.loads(line) for line in lines]
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 10)
    assert done["by_status"] == {"ok": n}
    assert sorted(r["url"] for r in records) == sorted(urls)
    image_hits = sum(v for k, v in server.hits.items() if k.startswith("/img/"))
    assert image_hits <= n + 16  # at most what was in flight when it stopped


async def test_without_a_token_it_listens_on_loopback_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from crawler.service.server import serve
    from crawler.settings import load_settings

    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    port = free_port()
    settings = load_settings(
        overrides={"service": {"host": "0.0.0.0", "port": port}, "pool": {"workers": 1}}
    )
    ready = asyncio.Event()
    task = asyncio.create_task(serve(settings, token="", ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/v1/jobs") as resp,
        ):
            assert resp.status == 200  # no token: open, but only to local users
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # serve() stops on SIGTERM, as under systemd
        await asyncio.wait_for(task, 30)
    assert "no token configured: listening on 127.0.0.1 only, not 0.0.0.0" in caplog.text
