"""``python -m crawler URLS``: parse arguments, load settings, crawl, report.

Exit codes: 0 when the crawl ran to its end (whatever failed per URL),
2 for usage errors (bad flag, unreadable input, bad config), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvloop

from crawler import __version__
from crawler.pipeline import crawl
from crawler.report import Stats
from crawler.settings import Settings, SettingsError, load_settings
from crawler.sources import FORMATS, Source, SourceError, open_source

EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 2, 130


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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = args.config or (
            Path(os.environ["CRAWLER_CONFIG"]) if os.environ.get("CRAWLER_CONFIG") else None
        )
        settings = load_settings(config, os.environ, overrides(args))
        source = open_source(args.urls, args.input_format)
    except (SettingsError, SourceError) as exc:
        parser.exit(EXIT_USAGE, f"{parser.prog}: error: {exc}\n")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_run(source, settings, quiet=args.quiet))
    except KeyboardInterrupt:
        print(f"\n{parser.prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


async def _run(source: Source, settings: Settings, *, quiet: bool) -> None:
    stats = Stats()

    async def count() -> None:
        stats.total = await source.count()

    counter = asyncio.create_task(count())
    summary = await crawl(source.entries(), settings, stats=stats, progress=settings.crawl.progress)
    counter.cancel()
    if not quiet:
        print(summary.render(), file=sys.stderr)
        print(f"  manifest: {Path(settings.crawl.out) / 'manifest.jsonl'}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
