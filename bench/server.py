"""A local static file server for the benchmark that is not the bottleneck.

``StaticServer(root)`` serves ``root`` on 127.0.0.1 (and nowhere else) from
its own processes, so the crawler under test never shares an event loop or
a GIL with it, and its CPU time can be accounted for separately:

    with StaticServer(corpus_dir) as server:
        url = f"{server.url}/img-00000.jpg"
        ...
        print(server.kind, server.pids, server.cpu_seconds())

Routes, the same for both kinds:

* ``/<path>``      the file ``root/<path>`` (404 when missing);
* ``/tiny/<any>``  a fixed 43-byte 1x1 GIF, for benchmarks that need many
                   distinct URLs with next to no transfer;
* ``/missing/<any>`` always 404.

nginx is used when it is installed (``bench/install-nginx``): 2 worker
processes, sendfile, long keep-alive, no access log, a config of its own in a
temporary directory and no other server blocks. Otherwise the fallback is
this module run as a separate aiohttp process:

    python -m bench.server DIR [--port P]

which prints ``LISTENING http://127.0.0.1:<port>`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import grp
import http.client
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Literal

from aiohttp import web

HOST = "127.0.0.1"
# The smallest valid GIF: 1x1, one palette entry, 43 bytes.
TINY_GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff"
    b"!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
KIND_ENV = "BENCH_STATIC_SERVER"  # "nginx", "aiohttp" or "auto" (the default)
Kind = Literal["nginx", "aiohttp"]

_NGINX_CONF = """\
# Written by bench/server.py for one benchmark run; nothing else is included.
{user}worker_processes {workers};
worker_rlimit_nofile 65536;
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;

events {{
    worker_connections 8192;
    multi_accept on;
}}

http {{
    types {{
        image/jpeg jpg jpeg;
        image/png png;
        image/gif gif;
        image/webp webp;
        image/tiff tif tiff;
        image/bmp bmp;
        application/json json;
        text/html html;
        text/plain txt;
    }}
    default_type application/octet-stream;
    access_log off;
    log_not_found off;
    server_tokens off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    open_file_cache max=20000 inactive=120s;
    open_file_cache_valid 120s;
    open_file_cache_errors on;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;

    server {{
        listen {host}:{port} backlog=4096;
        server_name _;
        root {tmp}/docroot;
        location / {{
            try_files $uri =404;
        }}
        location /tiny/ {{
            root {tmp};
            try_files /tiny.gif =404;
        }}
        location /missing/ {{
            return 404;
        }}
    }}
}}
"""


def find_nginx() -> str | None:
    """The nginx binary: on PATH, or in /usr/sbin (not on a non-root PATH)."""
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from ``state`` on (index 0 = field 3), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode(errors="replace")
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _proc_stat(int(entry))
            if fields is not None and fields[1] == str(pid):
                kids.append(int(entry))
    return sorted(kids)


def _cpu_of(pids: list[int]) -> float:
    """utime + stime + cutime + cstime over ``pids``, in seconds."""
    ticks = 0
    for pid in pids:
        fields = _proc_stat(pid)
        if fields is not None:
            # Fields 14-17 of stat: utime stime cutime cstime.
            ticks += sum(int(v) for v in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def _get(port: int, path: str, timeout: float = 1.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class ServerError(RuntimeError):
    pass


# Servers still running when the interpreter exits (an unhandled exception
# outside a ``with``, sys.exit) are stopped rather than left behind.
_live: set[StaticServer] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_live):
        server.stop(timeout=2.0)


class StaticServer:
    """Serve ``root`` on 127.0.0.1:``port`` (0: any free port) from separate processes.

    ``kind``: "nginx", "aiohttp" or "auto" (nginx when installed); the
    ``BENCH_STATIC_SERVER`` environment variable overrides "auto".
    Use as a context manager, or call ``start()`` / ``stop()``.
    """

    def __init__(
        self,
        root: Path,
        port: int = 0,
        *,
        kind: str = "auto",
        workers: int = 2,
        startup_timeout: float = 15.0,
    ) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ServerError(f"not a directory: {self.root}")
        self._requested_port = port
        self._workers = workers
        self._startup_timeout = startup_timeout
        wanted = os.environ.get(KIND_ENV, "auto") if kind == "auto" else kind
        if wanted not in ("auto", "nginx", "aiohttp"):
            raise ValueError(f"unknown server kind {wanted!r}")
        self._nginx = find_nginx() if wanted in ("auto", "nginx") else None
        if wanted == "nginx" and self._nginx is None:
            raise ServerError("nginx requested but not installed (run bench/install-nginx)")
        self.kind: Kind = "nginx" if self._nginx else "aiohttp"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: Path | None = None
        self._final_cpu: float | None = None

    # -- public API -------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL without a trailing slash: ``f"{server.url}/{name}"``."""
        if not self.port:
            raise ServerError("server not started")
        return f"http://{HOST}:{self.port}"

    def url_for(self, name: str) -> str:
        return f"{self.url}/{name.lstrip('/')}"

    @property
    def pid(self) -> int:
        """The main (nginx master / aiohttp) process."""
        if self._proc is None:
            raise ServerError("server not started")
        return self._proc.pid

    @property
    def pids(self) -> list[int]:
        """The main process and its live children (nginx workers); [] once stopped."""
        if self._proc is None or self._proc.returncode is not None:
            return []
        return [self._proc.pid, *_children(self._proc.pid)]

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def cpu_seconds(self) -> float:
        """User + system CPU of the server processes so far, children included.

        Live processes are read from /proc/<pid>/stat; after ``stop()`` it is
        the exact total the kernel reported when the main process was reaped.
        """
        if self._final_cpu is not None:
            return self._final_cpu
        if self._proc is None:
            return 0.0
        return _cpu_of(self.pids)

    def start(self) -> StaticServer:
        if self._proc is not None:
            raise ServerError("already started")
        self._final_cpu = None
        self._tmp = Path(tempfile.mkdtemp(prefix=f"bench-{self.kind}-"))
        try:
            if self.kind == "nginx":
                self._start_nginx()
            else:
                self._start_aiohttp()
        except BaseException:
            self.stop()
            raise
        _live.add(self)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful stop (SIGQUIT for nginx, SIGTERM for aiohttp), then SIGKILL."""
        _live.discard(self)
        proc, self._proc = self._proc, None
        if proc is not None:
            self._final_cpu = self._terminate(proc, timeout)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> StaticServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = self.url if self.running else "stopped"
        return f"<StaticServer {self.kind} {state} root={self.root}>"

    # -- nginx ----------------------------------------------------------------------

    def _nginx_conf(self, port: int) -> str:
        assert self._tmp is not None
        user = ""
        if os.geteuid() == 0:
            # Workers run as whoever started the benchmark, so they can read
            # anything it can (pytest's tmp dirs are 0700), not as nginx's
            # default "nobody", which could not.
            name = pwd.getpwuid(os.geteuid()).pw_name
            group = grp.getgrgid(os.getegid()).gr_name
            user = f"user {name} {group};\n"
        return _NGINX_CONF.format(
            user=user, workers=self._workers, tmp=self._tmp, host=HOST, port=port
        )

    def _start_nginx(self) -> None:
        assert self._tmp is not None
        assert self._nginx is not None
        tmp = self._tmp
        if any(c in str(tmp) for c in ' ";{}$#\\\n'):
            raise ServerError(f"temporary directory path unusable in nginx.conf: {tmp}")
        # The served root goes in through a symlink, so its path needs no quoting.
        (tmp / "docroot").symlink_to(self.root, target_is_directory=True)
        (tmp / "tiny.gif").write_bytes(TINY_GIF)
        attempts = 1 if self._requested_port else 5
        for attempt in range(attempts):
            port = self._requested_port or _free_port()
            conf = tmp / "nginx.conf"
            conf.write_text(self._nginx_conf(port))
            stderr = open(tmp / "stderr.log", "wb")  # noqa: SIM115 - handed to the child
            try:
                self._proc = subprocess.Popen(
                    [self._nginx, "-p", f"{tmp}/", "-c", str(conf)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    start_new_session=True,
                )
            finally:
                stderr.close()
            self.port = port
            if self._wait_ready():
                return
            log = self._logs()
            self._terminate(self._proc, 2.0)
            self._proc = None
            self.port = 0
            if "in use" not in log or attempt == attempts - 1:
                raise ServerError(f"nginx did not start:\n{log}")

    def _logs(self) -> str:
        assert self._tmp is not None
        out = []
        for name in ("stderr.log", "error.log"):
            with contextlib.suppress(OSError):
                out.append((self._tmp / name).read_text(errors="replace"))
        return "".join(out).strip()

    def _wait_ready(self) -> bool:
        """Poll until /tiny/ answers with our GIF (True) or the process died / timed out."""
        assert self._proc is not None
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            with contextlib.suppress(OSError, http.client.HTTPException):
                if _get(self.port, "/tiny/ready.gif") == (200, TINY_GIF):
                    return True
            time.sleep(0.02)
        return False

    # -- aiohttp fallback ---------------------------------------------------------------

    def _start_aiohttp(self) -> None:
        assert self._tmp is not None
        stderr = open(self._tmp / "stderr.log", "wb")  # noqa: SIM115 - handed to the child
        try:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.server",
                    str(self.root),
                    "--port",
                    str(self._requested_port),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,
                cwd=Path(__file__).resolve().parent.parent,
            )
        finally:
            stderr.close()
        assert self._proc.stdout is not None
        line = b""
        deadline = time.monotonic() + self._startup_timeout
        while not line.endswith(b"\n") and time.monotonic() < deadline:
            ready, _, _ = select.select([self._proc.stdout], [], [], 0.1)
            if ready:
                chunk = os.read(self._proc.stdout.fileno(), 256)
                if not chunk:
                    break
                line += chunk
        self._proc.stdout.close()
        words = line.decode(errors="replace").split()
        if len(words) != 2 or words[0] != "LISTENING":
            raise ServerError(f"aiohttp server did not start: {line!r}\n{self._logs()}")
        self.port = int(words[1].rsplit(":", 1)[1])
        if not self._wait_ready():
            raise ServerError(f"aiohttp server does not answer:\n{self._logs()}")

    # -- stopping -------------------------------------------------------------------------

    def _terminate(self, proc: subprocess.Popen[bytes], timeout: float) -> float:
        """Stop ``proc`` and its children; their total CPU seconds."""
        if proc.returncode is not None:
            return 0.0
        kids = _children(proc.pid)
        before = _cpu_of([proc.pid, *kids])
        first = signal.SIGQUIT if self.kind == "nginx" else signal.SIGTERM
        for sig, wait in ((first, timeout), (signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            if sig == signal.SIGKILL:
                for kid in kids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(kid, sig)
            rusage = self._reap(proc, wait)
            if rusage is not None:
                # Workers exit before the master, which reaps them: the master's
                # rusage from wait4 covers them too.
                return max(before, rusage)
        return before

    @staticmethod
    def _reap(proc: subprocess.Popen[bytes], timeout: float) -> float | None:
        """wait4() for ``proc`` up to ``timeout``: its CPU seconds incl. children, or None."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            except ChildProcessError:  # already reaped elsewhere: usage unknown
                proc.poll()
                return 0.0
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return float(usage.ru_utime + usage.ru_stime)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)


# -- the aiohttp server process -------------------------------------------------------------


def make_app(root: Path) -> web.Application:
    """The fallback server's routes: /tiny/*, /missing/*, and files under ``root``."""
    root = Path(root).resolve()

    async def tiny(request: web.Request) -> web.Response:
        return web.Response(body=TINY_GIF, content_type="image/gif")

    async def missing(request: web.Request) -> web.Response:
        raise web.HTTPNotFound()

    async def serve_file(request: web.Request) -> web.StreamResponse:
        parts = request.match_info["path"].split("/")
        if any(not part or part.startswith(".") for part in parts):
            raise web.HTTPNotFound()
        # FileResponse stats and opens in an executor and answers 404 when missing.
        return web.FileResponse(root.joinpath(*parts))

    app = web.Application()
    app.router.add_get("/tiny/{tail:.*}", tiny)
    app.router.add_get("/missing/{tail:.*}", missing)
    app.router.add_get("/{path:.+}", serve_file)
    return app


async def serve(root: Path, port: int) -> None:
    """Run the fallback server on 127.0.0.1 until SIGTERM / SIGINT."""
    runner = web.AppRunner(make_app(root), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, HOST, port, backlog=4096)
    await site.start()
    bound = runner.addresses[0][1]
    sys.stdout.write(f"LISTENING http://{HOST}:{bound}\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.server",
        description="Serve DIR on 127.0.0.1 with aiohttp (the fallback when nginx is missing).",
    )
    parser.add_argument("directory", type=Path)
    parser.add_argument("--port", type=int, default=0, help="0 (default): any free port")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        parser.error(f"not a directory: {args.directory}")
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up
    except ImportError:
        asyncio.run(serve(args.directory, args.port))
    else:
        uvloop.run(serve(args.directory, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
