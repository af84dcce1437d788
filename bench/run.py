"""``make bench``: how close the crawl comes to what this machine's cores can do.

In one run, each measurement repeated (median of ``--repeat``):

1. ceiling: the crawler's own image function over the corpus, read from
   local disk, in the same kind of process pool: no network, no storage;
   and the same with each image's files written as the crawler writes them
   (content-addressed, fsynced): the most any crawl that keeps its images
   can do here; and the ceiling with one worker, which says how far two
   workers scale on this machine (the ideal crawl/inline is about that);
2. crawl: ``python -m crawler`` end to end over the corpus served from
   127.0.0.1, default settings, into a fresh directory;
3. inline: the same crawl with the image function run on the event loop;
4. the floor: CPU per image of the two things no crawl can skip, fetching the
   body (plain aiohttp) and writing its files (``Store.write``); with the
   ceiling and the one-image crawl's fixed cost they give the ideal crawl,
   the most a crawl could do here, and so the most crawl/ceiling and
   crawl/inline can be (``ideal_rate``).

Then the memory benchmark (a long URL list against a server answering each
URL quickly) and the near-duplicate grouping of 1,000,000 hashes. Every crawl
is verified (records, thumbnails and their sizes) so a crawl that silently
fails cannot look fast. Figures are printed and written to .bench/result.json.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from PIL import Image

from bench import corpus
from bench.server import StaticServer
from crawler import imaging
from crawler.models import Failure, ImageJob, ImageResult
from crawler.pipeline import WINDOW_BYTES, Window
from crawler.pool import MAX_BATCH, SINGLE_THREADED, ImagePool, make_executor
from crawler.settings import Settings
from crawler.store import Store

WORK = Path(".bench")
PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")
CORES = len(os.sched_getaffinity(0))


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, utime+stime ticks, rss pages) of a live process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[21])


class TreeSampler(threading.Thread):
    """Samples a process tree: peak total RSS, and CPU time per process (summed at the end)."""

    def __init__(self, root: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.interval = interval
        self.peak_rss = 0
        self.cpu_ticks: dict[int, int] = {}
        self.stop = threading.Event()
        self.on_sample: Callable[[int], None] | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)
        self.sample()

    def sample(self) -> None:
        stats = {pid: s for pid in _pids() if (s := _stat(pid)) is not None}
        tree = {self.root}
        grew = True
        while grew:
            grew = False
            for pid, (ppid, _, _) in stats.items():
                if ppid in tree and pid not in tree:
                    tree.add(pid)
                    grew = True
        rss = sum(stats[p][2] for p in tree if p in stats) * PAGE
        self.peak_rss = max(self.peak_rss, rss)
        for pid in tree:
            if pid in stats:
                self.cpu_ticks[pid] = max(self.cpu_ticks.get(pid, 0), stats[pid][1])
        if self.on_sample is not None:
            self.on_sample(rss)

    @property
    def cpu_seconds(self) -> float:
        return sum(self.cpu_ticks.values()) / TICK


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def run_measured(
    cmd: Sequence[str], on_sample: Callable[[int], None] | None = None
) -> dict[str, Any]:
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampler = TreeSampler(proc.pid)
    sampler.on_sample = on_sample
    sampler.start()
    _, err = proc.communicate()
    wall = time.monotonic() - started
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return {
        "wall": wall,
        "cpu": sampler.cpu_seconds,
        "root_cpu": sampler.cpu_ticks.get(proc.pid, 0) / TICK,
        "peak_rss": sampler.peak_rss,
    }


def verify(out: Path, expected: int, sizes: Sequence[int] = (256,)) -> None:
    """The crawl did the work: every image ok, one thumbnail each, fitting its box."""
    records = [json.loads(line) for line in (out / "manifest.jsonl").open()]
    ok = [r for r in records if r["status"] == "ok"]
    if len(records) != expected or len(ok) != expected:
        bad = [r for r in records if r["status"] != "ok"][:3]
        raise SystemExit(f"{out}: {len(ok)}/{len(records)} ok of {expected}: {bad}")
    for size in sizes:
        thumbs = list((out / "thumbs" / str(size)).rglob("*.jpg"))
        distinct = len({r["sha256"] for r in ok})
        if len(thumbs) != distinct:
            raise SystemExit(f"{out}: {len(thumbs)} thumbnails for {distinct} images")
        for path in thumbs[:: max(1, len(thumbs) // 50)]:
            with Image.open(path) as im:
                if max(im.size) > size or im.format != "JPEG":
                    raise SystemExit(f"{path}: {im.format} {im.size} does not fit {size}")


_stores: dict[str, Store] = {}  # per worker: Store remembers the directories it made


def process_and_store(job: ImageJob, root: str) -> ImageResult | Failure:
    """In a worker: the image function, then its files written as the crawler writes them."""
    result = imaging.process(job)
    if isinstance(result, ImageResult):
        _stores.setdefault(root, Store(Path(root), job.thumbs.ext)).write(result, job.data)
    return result


def ceiling(paths: Sequence[Path], store: Path | None = None, workers: int = 0) -> float:
    """Images/s of the image function alone, in the crawler's own pool (and storage, if given).

    The images go through ``ImagePool`` exactly as a crawl's do (same batches,
    same window), read from disk instead of fetched. ``workers``: the pool's
    size (default: one per core, as the crawler's).
    """
    return uvloop.run(_ceiling(paths, store, workers))


async def _ceiling(paths: Sequence[Path], store: Path | None, workers: int) -> float:
    settings = Settings()
    pool_settings = replace(settings.pool, workers=workers) if workers else settings.pool
    fn = imaging.process if store is None else partial(process_and_store, root=str(store))
    executor = make_executor(pool_settings, settings.image.max_pixels)
    pool = ImagePool(executor, fn=fn, workers=pool_settings.size, max_batch=MAX_BATCH)
    spec = settings.image.thumb_spec()
    window = Window(pool.window, WINDOW_BYTES)

    async def one(path: Path, data: bytes) -> None:
        try:
            result = await pool.process(
                ImageJob(data, spec, settings.image.max_pixels, settings.image.formats)
            )
        finally:
            window.release(len(data))
        if isinstance(result, Failure):
            raise SystemExit(f"{path}: {result.kind}: {result.detail}")

    try:
        await pool.start()  # workers started before the clock does
        started = time.monotonic()
        async with asyncio.TaskGroup() as tasks:
            for path in paths:
                # Page-cached, ~50 us: a thread hop would cost the ceiling more than it saves.
                data = path.read_bytes()
                await window.acquire(len(data))
                tasks.create_task(one(path, data))
        return len(paths) / (time.monotonic() - started)
    finally:
        await pool.shutdown()


def crawl_once(name: str, urls: Path, n: int, inline: bool, run: int) -> dict[str, Any]:
    # A new directory each time, and nothing deleted before a measurement: ext4
    # avoids reusing recently deleted inodes, and after an `rm -rf` of the last
    # run's files, creating new ones cost the crawl ~2x more system time.
    out = WORK / "out" / f"{name}-{run}-{time.time_ns()}"
    stats = WORK / f"{name}-{run}.json"
    if inline:
        cmd = [sys.executable, "-m", "bench.inline", str(urls), str(out), str(stats)]
    else:
        cmd = [sys.executable, "-m", "crawler", str(urls), "--out", str(out), "--quiet",
               "--stats-json", str(stats)]  # fmt: skip
    measured = run_measured(cmd)
    verify(out, n)
    summary = json.loads(stats.read_text())
    measured["images_per_s"] = n / measured["wall"]
    measured["loop_lag_ms"] = summary["loop_lag_ms"]
    measured["crawler_cpu_ms_per_image"] = measured.pop("root_cpu") / n * 1000
    measured["workers_cpu_ms_per_image"] = (measured["cpu"] / n * 1000) - measured[
        "crawler_cpu_ms_per_image"
    ]
    return measured


def startup(urls: Path) -> float:
    """Seconds for a crawl of one image: what every run pays before and after its images."""
    first = WORK / "one.txt"
    first.write_text(urls.read_text().splitlines()[0] + "\n")
    out = WORK / "out" / f"one-{time.time_ns()}"
    cmd = [sys.executable, "-m", "crawler", str(first), "--out", str(out), "--quiet"]
    return float(run_measured(cmd)["wall"])


def floor_costs(urls: Path, paths: Sequence[Path], run: int) -> dict[str, float]:
    """CPU ms per image of what no crawl can skip: fetching each body (plain aiohttp,
    nothing around it, as many at once as the crawler's per-host limit) and writing
    its files (``Store.write``, fsync included, with a real thumbnail of the first
    image standing in for each image's)."""
    fetch = uvloop.run(_fetch_all(urls.read_text().split()))
    image = Settings().image
    spec = image.thumb_spec()
    sample = imaging.process(ImageJob(paths[0].read_bytes(), spec, image.max_pixels, image.formats))
    assert isinstance(sample, ImageResult)
    store = Store(WORK / "out" / f"floor-{run}-{time.time_ns()}", spec.ext)
    spent = 0.0
    for path in paths:  # one body at a time: this process's peak RSS is inherited by the next
        body = path.read_bytes()
        result = replace(sample, sha256=hashlib.sha256(body).hexdigest())
        before = _cpu()
        store.write(result, body)
        spent += _cpu() - before
    return {"fetch": fetch, "store": spent / len(paths) * 1000}


async def _fetch_all(urls: Sequence[str]) -> float:
    slots = asyncio.Semaphore(Settings().hosts.per_host)

    async def one(session: aiohttp.ClientSession, url: str) -> None:
        async with slots, session.get(url) as resp:
            body = bytearray()
            async for chunk in resp.content.iter_any():
                body += chunk
            if resp.status != 200 or not body:
                raise SystemExit(f"{url}: {resp.status}, {len(body)} bytes")

    async with aiohttp.ClientSession() as session:
        before = _cpu()
        async with asyncio.TaskGroup() as tasks:
            for url in urls:
                tasks.create_task(one(session, url))
        return (_cpu() - before) / len(urls) * 1000


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def ideal_rate(n: int, ceiling: float, startup: float, floor_ms: float) -> float:
    """Images/s of a crawl with no cost of its own beyond ``floor_ms`` of CPU per image
    (fetch and store) on top of the ceiling's, every core busy from the moment its
    fixed start-up and shut-down (``startup`` seconds) allow."""
    core_seconds = n * (CORES / ceiling + floor_ms / 1000)
    return n / (startup + core_seconds / CORES)


def memory_benchmark(server: StaticServer, n: int) -> dict[str, Any]:
    """Peak RSS of the crawl's process tree at 10% and at 100% of a long list of quick URLs."""
    # Written afresh each time: the server's port changes from run to run, and
    # a list cached from an earlier run measured connection failures to a dead
    # port, not requests (the second session's 82.8 s figure was that).
    urls = WORK / f"long-{n}.txt"
    with urls.open("w") as fh:
        for i in range(n):
            fh.write(
                f"{server.url}/tiny/{i}.gif\n" if i % 10 == 0 else f"{server.url}/missing/{i}\n"
            )
    out = WORK / "out" / f"long-{time.time_ns()}"
    out.mkdir(parents=True)
    manifest = out / "manifest.jsonl"
    seen = {"lines": 0, "offset": 0, "peak": 0, "at10": 0}

    def watch(rss: int) -> None:
        seen["peak"] = max(seen["peak"], rss)
        if manifest.exists():
            with manifest.open("rb") as fh:
                fh.seek(seen["offset"])
                chunk = fh.read()
            seen["offset"] += len(chunk)
            seen["lines"] += chunk.count(b"\n")
        if seen["lines"] <= n // 10:
            seen["at10"] = seen["peak"]

    cmd = [sys.executable, "-m", "crawler", str(urls), "--out", str(out), "--quiet"]
    measured = run_measured(cmd, watch)
    outcomes: dict[str, int] = {}
    with manifest.open() as fh:
        for line in fh:
            record = json.loads(line)
            outcome = record["error"] or record["status"]
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    expected = {"ok": (n + 9) // 10, "http_404": n - (n + 9) // 10}
    if outcomes != expected:  # every URL answered as served, none failed to connect
        raise SystemExit(f"long list: outcomes {outcomes}, expected {expected}")
    return {
        "urls": n,
        "wall": round(measured["wall"], 1),
        "urls_per_s": round(n / measured["wall"]),
        "peak_rss_mb_at_10pct": round(seen["at10"] / 2**20, 1),
        "peak_rss_mb_at_100pct": round(measured["peak_rss"] / 2**20, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=1500, help="corpus images (default 1500)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--long", type=int, default=1_000_000, help="URLs in the memory benchmark")
    parser.add_argument("--hashes", type=int, default=1_000_000, help="hashes to group")
    args = parser.parse_args(argv)
    WORK.mkdir(exist_ok=True)
    # Every measured process single-threads BLAS as the crawler's pool does, the
    # inline baseline included: spinning OpenBLAS threads would handicap it.
    for name in SINGLE_THREADED:
        os.environ.setdefault(name, "1")

    t0 = time.monotonic()
    paths = corpus.build(WORK / "corpus", args.count)
    total_bytes = sum(p.stat().st_size for p in paths)
    print(f"corpus: {len(paths)} images, {total_bytes / 1e6:.0f} MB ({time.monotonic() - t0:.0f}s)")

    result: dict[str, Any] = {
        "machine": {
            "cores": CORES,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "corpus": {"images": len(paths), "mb": round(total_bytes / 1e6, 1)},
    }
    runs: dict[str, list[dict[str, Any]]] = {
        "ceiling": [],
        "one_worker": [],
        "stored": [],
        "crawl": [],
        "inline": [],
        "startup": [],
        "floor": [],
    }
    with StaticServer(WORK / "corpus") as server:
        result["server"] = server.kind
        urls = WORK / "urls.txt"
        urls.write_text("".join(f"{server.url}/{p.name}\n" for p in paths))
        server_cpu_before = server.cpu_seconds()
        for run in range(args.repeat):
            runs["ceiling"].append({"images_per_s": ceiling(paths)})
            runs["one_worker"].append({"images_per_s": ceiling(paths, workers=1)})
            store_dir = WORK / "out" / f"stored-{run}-{time.time_ns()}"
            runs["stored"].append({"images_per_s": ceiling(paths, store_dir)})
            runs["crawl"].append(crawl_once("crawl", urls, len(paths), False, run))
            runs["inline"].append(crawl_once("inline", urls, len(paths), True, run))
            runs["startup"].append({"seconds": startup(urls)})
            runs["floor"].append(floor_costs(urls, paths, run))
            print(
                f"run {run + 1}: ceiling {runs['ceiling'][-1]['images_per_s']:.1f}/s, "
                f"one worker {runs['one_worker'][-1]['images_per_s']:.1f}/s, "
                f"with storage {runs['stored'][-1]['images_per_s']:.1f}/s, "
                f"crawl {runs['crawl'][-1]['images_per_s']:.1f}/s, "
                f"inline {runs['inline'][-1]['images_per_s']:.1f}/s, "
                f"one-image crawl {runs['startup'][-1]['seconds']:.2f}s, "
                f"fetch {runs['floor'][-1]['fetch']:.2f} + store {runs['floor'][-1]['store']:.2f}"
                " ms of CPU per image"
            )
        result["server_cpu_s"] = round(server.cpu_seconds() - server_cpu_before, 1)
        if args.long:
            result["memory"] = memory_benchmark(server, args.long)
            print(f"memory: {result['memory']}")

    def med(name: str, key: str) -> float:
        return float(statistics.median(r[key] for r in runs[name]))

    crawl, inline, top, stored = (
        med("crawl", "images_per_s"),
        med("inline", "images_per_s"),
        med("ceiling", "images_per_s"),
        med("stored", "images_per_s"),
    )

    def lag(name: str) -> dict[str, float]:
        keys = ("p50", "p99", "max")
        return {k: statistics.median(r["loop_lag_ms"][k] for r in runs[name]) for k in keys}

    floor_ms = med("floor", "fetch") + med("floor", "store")
    ideal = ideal_rate(len(paths), top, med("startup", "seconds"), floor_ms)
    result["median"] = {
        "ceiling_images_per_s": round(top, 1),
        "ceiling_with_storage_images_per_s": round(stored, 1),
        "one_worker_images_per_s": round(med("one_worker", "images_per_s"), 1),
        "pool_scaling": round(top / med("one_worker", "images_per_s"), 2),
        "crawl_images_per_s": round(crawl, 1),
        "inline_images_per_s": round(inline, 1),
        "crawl_mb_per_s": round(total_bytes / 1e6 / med("crawl", "wall"), 1),
        "crawl_cpu_utilisation": round(med("crawl", "cpu") / (med("crawl", "wall") * CORES), 2),
        "crawl_peak_rss_mb": round(med("crawl", "peak_rss") / 2**20, 1),
        "crawl_cpu_ms_per_image": {
            "crawler_process": round(med("crawl", "crawler_cpu_ms_per_image"), 2),
            "workers_and_forkserver": round(med("crawl", "workers_cpu_ms_per_image"), 2),
        },
        "one_image_crawl_s": round(med("startup", "seconds"), 2),
        "floor_cpu_ms_per_image": {
            "fetch": round(med("floor", "fetch"), 2),
            "store": round(med("floor", "store"), 2),
        },
        "ideal_crawl_images_per_s": round(ideal, 1),
        "crawl_loop_lag_ms": lag("crawl"),
        "inline_loop_lag_ms": lag("inline"),
        "crawl_over_ceiling": round(crawl / top, 3),
        "crawl_over_ceiling_with_storage": round(crawl / stored, 3),
        "crawl_over_inline": round(crawl / inline, 2),
        # The most the ratios can be here: see ideal_rate.
        "ideal_crawl_over_ceiling": round(ideal / top, 3),
        "ideal_crawl_over_inline": round(ideal / inline, 2),
    }
    result["runs"] = runs
    if args.hashes:
        out = subprocess.run(
            [sys.executable, "bench/neardup_bench.py", str(args.hashes)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        result["neardup"] = json.loads(out.stdout.strip().splitlines()[-1])
    (WORK / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    # Outputs go only after every measurement (see crawl_once).
    subprocess.run(["rm", "-rf", str(WORK / "out")], check=True)
    print(
        json.dumps({k: result[k] for k in ("median", "memory", "neardup") if k in result}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
