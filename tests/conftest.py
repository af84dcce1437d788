from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from crawler.errors import ErrorKind
from crawler.models import UrlEntry
from crawler.pool import make_executor
from crawler.settings import PoolSettings, Settings, load_settings
from tests.server import LocalServer


@pytest.fixture
async def server() -> AsyncIterator[LocalServer]:
    async with LocalServer() as srv:
        yield srv


@pytest.fixture(scope="session")
def executor() -> Iterator[ProcessPoolExecutor]:
    """One real process pool for the session: what crosses into it must pickle."""
    pool = make_executor(PoolSettings(workers=2), max_pixels=50_000_000)
    yield pool
    pool.shutdown(cancel_futures=True)


def make_settings(out: Path, **sections: dict[str, Any]) -> Settings:
    """Test settings: fast backoff, small concurrency, the given overrides on top."""
    layers: dict[str, dict[str, Any]] = {
        "crawl": {"out": str(out), "concurrency": 8, "progress": False},
        "fetch": {"backoff_base": 0.01, "backoff_max": 0.05, "total_timeout": 10.0},
        "pool": {"workers": 2},
    }
    for section, values in sections.items():
        layers.setdefault(section, {}).update(values)
    return load_settings(overrides=layers)


async def entries(urls: Sequence[str | UrlEntry]) -> AsyncIterator[UrlEntry]:
    for n, url in enumerate(urls, 1):
        yield url if isinstance(url, UrlEntry) else UrlEntry(url, None, n)


KINDS = {str(k) for k in ErrorKind}


def read_manifest(out: Path) -> list[dict[str, Any]]:
    """The manifest's records; every test that reads one also checks no unknown error kind leaks."""
    lines = (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    for r in records:
        known = r["error"] in KINDS or re.fullmatch(r"http_\d{3}", r["error"] or "")
        assert r["error"] is None or known, r
    return records


def by_url(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    result = {r["url"]: r for r in records}
    assert len(result) == len(records), "more than one record for a URL"
    return result
