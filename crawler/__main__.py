"""``python -m crawler URLS``: parse arguments, load settings, crawl, report.

Exit codes: 0 when the crawl ran to its end (whatever failed per URL),
2 for usage errors (bad flag, unreadable input, bad config), 128 + the
signal's number when stopped by SIGINT (130) or SIGTERM (143): work in
flight gets ``crawl.grace_period`` to finish, a second signal quits at once.
Either way the ledger is consistent and the same command resumes.

``python -m crawler dups DIR`` lists the near-duplicate groups of a crawl.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvloop

from crawler import __version__
from crawler.errors import ErrorKind
from crawler.pool import prestart
from crawler.report import Stats
from crawler.settings import Settings, SettingsError, load_settings
from crawler.sources import FORMATS, Source, SourceError, open_source
from crawler.state import LEDGER, MANIFEST, Revisit

EXIT_OK, EXIT_USAGE = 0, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="crawler",
        description="Fetch image URLs; store each image once by content hash, with thumbnails, "
        "hashes and a manifest that accounts for every URL.",
        epilog="Settings are layered: defaults < --config file (or $CRAWLER_CONFIG) < "
        "CRAWLER_<SECTION>_<KEY> environment variables < these flags. See config/crawler.toml.",
    )
    p.add_argument(
        "urls",
        metavar="URLS",
        help="file of URLs (.txt, .csv/.tsv with a url column, .jsonl), or - for stdin",
    )
    p.add_argument("-o", "--out", metavar="DIR", help="output directory (default: downloads)")
    p.add_argument("-c", "--config", metavar="FILE", type=Path, help="TOML settings file")
    p.add_argument(
        "--input-format",
        choices=("auto", *FORMATS),
        default="auto",
        help="format of URLS (default: from the file extension; text for stdin)",
    )
    p.add_argument(
        "--concurrency", type=int, metavar="N", help="requests in flight in total (default: 64)"
    )
    p.add_argument(
        "--per-host", type=int, metavar="N", help="requests in flight per host (default: 8)"
    )
    p.add_argument(
        "--workers", type=int, metavar="N", help="image worker processes (default: one per core)"
    )
    p.add_argument(
        "--thumb-size", metavar="PX[,PX...]", help="thumbnail box size(s) in pixels (default: 256)"
    )
    p.add_argument(
        "--thumb-format", choices=("jpeg", "webp"), help="thumbnail format (default: jpeg)"
    )
    p.add_argument("--max-attempts", type=int, metavar="N", help="tries per URL (default: 3)")
    p.add_argument(
        "--start-method",
        choices=("forkserver", "spawn", "fork"),
        help="how pool workers are started (default: forkserver)",
    )
    p.add_argument(
        "--retry-failed",
        nargs="?",
        const="",
        metavar="KIND[,KIND...]",
        help="fetch again URLs that failed in an earlier run (only these error kinds, if given)",
    )
    p.add_argument(
        "--refresh-after",
        type=float,
        metavar="DAYS",
        help="revalidate images fetched more than DAYS ago (conditional GET; 304 keeps them)",
    )
    p.add_argument(
        "--stats-json",
        metavar="FILE",
        type=Path,
        help="also write the summary (counts, rates, event-loop lag) as JSON to FILE",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line and no summary")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The settings the flags name, in the same shape as a config file."""
    flags = {
        ("crawl", "out"): args.out,
        ("crawl", "concurrency"): args.concurrency,
        ("hosts", "per_host"): args.per_host,
        ("pool", "workers"): args.workers,
        ("image", "thumb_sizes"): args.thumb_size,
        ("image", "thumb_format"): args.thumb_format,
        ("fetch", "max_attempts"): args.max_attempts,
        ("pool", "start_method"): args.start_method,
    }
    out: dict[str, dict[str, Any]] = {}
    for (section, key), value in flags.items():
        if value is not None:
            out.setdefault(section, {})[key] = value
    if args.quiet:
        out.setdefault("crawl", {})["progress"] = False
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["dups"]:
        return dups_main(args_list[1:])
    if args_list[:1] == ["serve"]:
        return serve_main(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        env_config = os.environ.get("CRAWLER_CONFIG")
        config = args.config or (Path(env_config) if env_config else None)
        settings = load_settings(config, os.environ, overrides(args))
        source = open_source(args.urls, args.input_format)
        revisit = Revisit(
            retry_failed=None if args.retry_failed is None else _kinds(args.retry_failed),
            refresh_before=None
            if args.refresh_after is None
            else time.time() - args.refresh_after * 86400,
        )
    except (SettingsError, SourceError, ValueError) as exc:
        parser.exit(EXIT_USAGE, f"{parser.prog}: error: {exc}\n")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    prestart(settings.pool)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(
            _run(source, settings, revisit, quiet=args.quiet, stats_json=args.stats_json)
        )


def serve_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="crawler serve",
        description="Run the crawl service: an HTTP API that accepts crawl jobs (see README).",
    )
    parser.add_argument("-c", "--config", metavar="FILE", type=Path, help="TOML settings file")
    parser.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default: 8080)")
    args = parser.parse_args(argv)
    flags = {"host": args.host, "port": args.port}
    service = {k: v for k, v in flags.items() if v is not None}
    try:
        env_config = os.environ.get("CRAWLER_CONFIG")
        config = args.config or (Path(env_config) if env_config else None)
        settings = load_settings(config, os.environ, {"service": service} if service else None)
    except SettingsError as exc:
        parser.exit(EXIT_USAGE, f"{parser.prog}: error: {exc}\n")
    token = settings.service.token or os.environ.get("CRAWLER_TOKEN", "")
    # Imported here, like numpy for `dups`: a one-off crawl does not pay for them at start-up.
    from crawler.service.server import serve  # noqa: PLC0415 (lazy: see above)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(settings, token))


def dups_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="crawler dups", description="List groups of near-duplicate images in a crawl's output."
    )
    parser.add_argument("dir", metavar="DIR", type=Path, help="the crawl's output directory")
    parser.add_argument(
        "--distance", type=int, default=6, help="max differing phash bits (default: 6)"
    )
    args = parser.parse_args(argv)
    if not (args.dir / LEDGER).is_file():
        parser.exit(
            EXIT_USAGE, f"{parser.prog}: error: {args.dir} holds no crawl ({LEDGER} missing)\n"
        )
    if not 0 <= args.distance <= 32:
        parser.exit(EXIT_USAGE, f"{parser.prog}: error: --distance must be between 0 and 32\n")
    from crawler.dups import near_duplicates, render  # noqa: PLC0415 (lazy: see above)

    print(render(near_duplicates(args.dir, args.distance)))
    return EXIT_OK


def _kinds(value: str) -> frozenset[str]:
    kinds = frozenset(k.strip() for k in value.split(",") if k.strip())
    unknown = {
        k
        for k in kinds
        if k not in {str(e) for e in ErrorKind} and not re.fullmatch(r"http_\d{3}", k)
    }
    if unknown:
        raise ValueError(f"--retry-failed: unknown error kind(s): {', '.join(sorted(unknown))}")
    return kinds


async def _run(
    source: Source, settings: Settings, revisit: Revisit, *, quiet: bool, stats_json: Path | None
) -> int:
    # Imported here, after prestart(): aiohttp and the rest load while the
    # forkserver loads Pillow and numpy.
    from crawler.pipeline import crawl  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    stats = Stats()
    stop = asyncio.Event()
    received: list[int] = []

    async def count() -> None:
        stats.total = await source.count()

    counter = asyncio.create_task(count())
    task = asyncio.create_task(
        crawl(
            source.entries(),
            settings,
            stats=stats,
            progress=settings.crawl.progress,
            revisit=revisit,
            stop=stop,
        )
    )

    def on_signal(signum: int) -> None:
        received.append(signum)
        if len(received) > 1:
            # Every ledger commit is atomic, so even now the next run resumes cleanly.
            os._exit(128 + signum)
        grace = settings.crawl.grace_period
        print(
            f"\n{signal.Signals(signum).name}: stopping; finishing work in flight "
            f"(up to {grace:g}s), again to quit at once",
            file=sys.stderr,
        )
        stop.set()
        loop.call_later(grace, task.cancel)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        summary = await task
    except asyncio.CancelledError:
        if not received:
            raise
        summary = stats.summary()
    finally:
        counter.cancel()
    if stats_json is not None:
        text = json.dumps(summary.to_dict(), indent=2)
        await asyncio.to_thread(stats_json.write_text, text + "\n")
    if not quiet:
        print(summary.render(), file=sys.stderr)
        print(f"  manifest: {Path(settings.crawl.out) / MANIFEST}", file=sys.stderr)
    return 128 + received[0] if received else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
