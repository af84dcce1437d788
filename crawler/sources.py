"""URL lists -> ``AsyncIterator[UrlEntry]``, streamed; and the URL checks every entry passes.

Files are parsed by a plain generator in a worker thread, a batch at a time,
so the event loop never blocks on disk and memory holds one batch, whatever
the length of the list. Formats: plain text (one URL per line, blank lines and
``#`` comments ignored), CSV/TSV with a ``url`` column, JSON Lines with a
``url`` key. Other columns or keys travel with the entry as ``meta``.
"""

from __future__ import annotations

import asyncio
import csv
import json
import sys
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal
from urllib.parse import urlsplit, urlunsplit

from crawler.models import UrlEntry

Format = Literal["txt", "csv", "tsv", "jsonl"]
FORMATS: tuple[Format, ...] = ("txt", "csv", "tsv", "jsonl")
BATCH = 512
MAX_URL_LENGTH = 8192
_SUFFIXES: dict[str, Format] = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_DEFAULT_PORTS = {"http": 80, "https": 443}


class SourceError(ValueError):
    """The input as a whole cannot be read: a usage error (exit 2), not a per-URL failure."""


@dataclass(frozen=True)
class Source:
    """A URL list on disk (or stdin, when ``path`` is None), opened lazily."""

    path: Path | None
    format: Format

    @property
    def name(self) -> str:
        return "<stdin>" if self.path is None else str(self.path)

    async def entries(self) -> AsyncGenerator[UrlEntry]:
        fh = (
            sys.stdin
            if self.path is None
            else self.path.open(encoding="utf-8", errors="replace", newline="")
        )
        try:
            batches = _batches(_parse(fh, self.format, self.name))
            end: list[UrlEntry] = []
            while batch := await asyncio.to_thread(next, batches, end):
                for entry in batch:
                    yield entry
        finally:
            if self.path is not None:
                fh.close()

    async def count(self) -> int | None:
        """Number of entries, counted in a thread; None for stdin (it can only be read once)."""
        if self.path is None:
            return None
        return await asyncio.to_thread(_count, self.path, self.format)


def open_source(spec: str, fmt: str = "auto") -> Source:
    """Resolve the URLS argument; fail early (``SourceError``) if it cannot be read at all."""
    if fmt != "auto" and fmt not in FORMATS:
        raise SourceError(f"unknown input format {fmt!r} (choose from auto, {', '.join(FORMATS)})")
    if spec == "-":
        return Source(None, "txt" if fmt == "auto" else fmt)  # type: ignore[arg-type]
    path = Path(spec)
    resolved: Format = _SUFFIXES.get(path.suffix.lower(), "txt") if fmt == "auto" else fmt  # type: ignore[assignment]
    try:
        with path.open(encoding="utf-8", errors="replace", newline="") as fh:
            if resolved in ("csv", "tsv"):
                _csv_header(fh, resolved, spec)
    except IsADirectoryError:
        raise SourceError(f"{spec}: is a directory, expected a file of URLs") from None
    except OSError as exc:
        raise SourceError(f"cannot read {spec}: {exc.strerror or exc}") from None
    return Source(path, resolved)


def check_url(raw: str) -> tuple[str | None, str]:
    """Return ``(normalised_url, "")`` for a fetchable URL, else ``(None, reason)``.

    Normalised means: scheme and host lower-cased, IDNA host, default port and
    fragment dropped, empty path made ``/``. The result is the dedup key and
    what is fetched; the record keeps the URL as given.
    """
    url = raw.strip()
    if not url:
        return None, "empty URL"
    if len(url) > MAX_URL_LENGTH:
        return None, f"URL longer than {MAX_URL_LENGTH} characters"
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        return None, "URL contains whitespace or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return None, f"malformed URL: {exc}"
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        return (
            None,
            f"unsupported scheme {scheme!r}, only http and https" if scheme else "not a URL",
        )
    host = parts.hostname
    if not host:
        return None, "URL has no host"
    if "[" not in parts.netloc:  # IPv6 literals need no IDNA
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None, f"invalid host name {host!r}"
    else:
        host = f"[{host}]"
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    if parts.username or parts.password:
        netloc = f"{parts.netloc.rpartition('@')[0]}@{netloc}"
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, "")), ""


def _parse(fh: IO[str], fmt: Format, name: str) -> Iterator[UrlEntry]:
    if fmt == "txt":
        for number, line in enumerate(fh, 1):
            url = line.strip()
            if url and not url.startswith("#"):
                yield UrlEntry(url, None, number)
    elif fmt == "jsonl":
        for number, line in enumerate(fh, 1):
            if line.strip():
                yield _json_entry(line, number)
    else:
        url_key, header, rows = _csv_header(fh, fmt, name)
        url_at = header.index(url_key)
        for number, row in enumerate(rows, 2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                problem = f"row {number}: {len(row)} columns, the header has {len(header)}"
                yield UrlEntry(",".join(row)[:200], None, number, problem)
                continue
            meta = {k: v for k, v in zip(header, row, strict=True) if k != url_key}
            yield UrlEntry(row[url_at].strip(), meta or None, number)


def _csv_header(fh: IO[str], fmt: Format, name: str) -> tuple[str, list[str], Iterator[list[str]]]:
    rows = csv.reader(fh, delimiter="\t" if fmt == "tsv" else ",")
    first = next(rows, None)
    if first is None:
        raise SourceError(
            f"{name}: empty {fmt.upper()} file, expected a header with a 'url' column"
        )
    header = [h.strip() for h in first]
    matches = [h for h in header if h.lower() == "url"]
    if not matches:
        shown = ", ".join(header)[:200]
        raise SourceError(f"{name}: no 'url' column in the {fmt.upper()} header ({shown})")
    return matches[0], header, rows


def _json_entry(line: str, number: int) -> UrlEntry:
    snippet = line.strip()[:200]
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return UrlEntry(snippet, None, number, f"line {number}: not valid JSON ({exc.msg})")
    if not isinstance(obj, dict):
        return UrlEntry(snippet, None, number, f"line {number}: expected a JSON object")
    url = obj.pop("url", None)
    if not isinstance(url, str):
        return UrlEntry(snippet, None, number, f"line {number}: no string 'url' key")
    return UrlEntry(url.strip(), obj or None, number)


def _batches(entries: Iterator[UrlEntry]) -> Iterator[list[UrlEntry]]:
    batch: list[UrlEntry] = []
    for entry in entries:
        batch.append(entry)
        if len(batch) >= BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _count(path: Path, fmt: Format) -> int:
    if fmt in ("csv", "tsv"):
        with path.open(encoding="utf-8", errors="replace", newline="") as fh:
            return sum(1 for _ in _parse(fh, fmt, str(path)))
    count = 0
    with path.open("rb") as fh:
        for line in fh:
            stripped = line.strip()
            count += bool(stripped) and (fmt == "jsonl" or not stripped.startswith(b"#"))
    return count
