"""``python -m crawler dups DIR``: the near-duplicate groups of a crawl, largest first."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from crawler.neardup import groups
from crawler.state import LEDGER


@dataclass(frozen=True)
class Member:
    sha256: str
    phash: str
    path: str
    url: str


def near_duplicates(out: Path, distance: int = 6) -> list[list[Member]]:
    """Groups of distinct stored images within ``distance`` bits of each other."""
    with sqlite3.connect(f"file:{out / LEDGER}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT json_extract(record, '$.sha256'), json_extract(record, '$.phash'),"
            " json_extract(record, '$.path'), url FROM urls"
            " WHERE status = 'ok' AND json_extract(record, '$.duplicate_of') IS NULL"
            " AND json_extract(record, '$.phash') IS NOT NULL ORDER BY seq"
        ).fetchall()
    members = list({sha: Member(sha, phash, path, url) for sha, phash, path, url in rows}.values())
    return [[members[i] for i in found] for found in groups([m.phash for m in members], distance)]


def render(found: list[list[Member]]) -> str:
    lines = []
    for n, members in enumerate(found, 1):
        lines.append(f"group {n}: {len(members)} images")
        lines += [f"  {m.phash}  {m.path}  {m.url}" for m in members]
    lines.append(f"{len(found)} groups of near duplicates")
    return "\n".join(lines)
