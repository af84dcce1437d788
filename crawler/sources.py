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
import re
import string
import sys
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal
from urllib.parse import urlsplit

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
    given = next((f for f in FORMATS if f == fmt), None)
    if fmt != "auto" and given is None:
        raise SourceError(f"unknown input format {fmt!r} (choose from auto, {', '.join(FORMATS)})")
    if spec == "-":
        return Source(None, given or "txt")
    path = Path(spec)
    resolved: Format = given or _SUFFIXES.get(path.suffix.lower(), "txt")
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

    The result is the dedup key and what is fetched; the record keeps the URL as
    given. So only steps that cannot change which resource a server returns are
    taken, those of RFC 3986 6.2.2 and 6.2.3, and the result is a fixed point
    (``check_url(key) == (key, "")``):

    * scheme and host lower-cased, the host IDNA-encoded and one trailing dot
      dropped (the same DNS name); IPv4 literals kept as written (numeric forms
      are the SSRF guard's business), IPv6 literals lower-cased;
    * default port, fragment and an empty query (a bare ``?``, which aiohttp
      never sends anyway) dropped; an empty path made ``/``;
    * in userinfo, path and query: ``%xx`` upper-cased, escapes of unreserved
      characters (``A-Z a-z 0-9 - . _ ~``) decoded, escapes of anything else
      (``%2F``, ``%3F``, ``%26`` ...) kept, and characters that may not appear
      unescaped (non-ASCII, ``"<>[\\]^`{|}``) encoded as UTF-8 ``%XX``, as
      aiohttp would encode them when sending;
    * ``.`` and ``..`` segments removed from the path (RFC 3986 5.2.4).

    A ``%`` that starts no valid escape (``%zz``, a final ``%``) is kept as it
    is; escapes of hex digits are then not decoded in that component, because a
    decoded digit next to such a ``%`` could form a new escape (``%%414`` must
    not become ``%A4``).
    Query parameters keep their order. Rejected, with a reason: whitespace and
    control characters, lone surrogates, hosts no resolver would look up
    (labels over 63 or names over 253 characters, ``%``, ``<`` ...), text
    between ``]`` and the port, brackets in userinfo. Never raises.
    """
    url = raw.strip()
    if not url:
        return None, "empty URL"
    if len(url) > MAX_URL_LENGTH:
        return None, f"URL longer than {MAX_URL_LENGTH} characters"
    if url.isascii():
        # For ASCII, printable and no space is exactly "no _BAD_CHAR", and faster.
        if not url.isprintable() or " " in url:
            return None, "URL contains whitespace or control characters"
    else:
        if _BAD_CHAR.search(url):
            return None, "URL contains whitespace or control characters"
        try:
            url.encode("utf-8")
        except UnicodeEncodeError:
            return None, "URL contains a lone surrogate (not valid Unicode)"
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
    userinfo, _, hostport = parts.netloc.rpartition("@")
    if "[" in userinfo or "]" in userinfo:
        # urlsplit checks the first "[...]" of the netloc: it must be the host.
        return None, "malformed URL: brackets in the user name or password"
    if hostport.startswith("["):
        # urlsplit checks what is inside the brackets but ignores anything
        # between "]" and the port: "[::1]x" must not become "[::1]".
        after = hostport.partition("]")[2]
        if after and after[0] != ":":
            return None, f"malformed host {hostport[:100]!r}"
        host = f"[{host}]"  # hostname lower-cased the address, not a zone id
    elif "[" in hostport:
        return None, f"malformed host {hostport[:100]!r}"
    elif len(host) > 254:  # 253 and a trailing dot; also bounds the slow IDNA codec's work
        return None, "host name longer than 253 characters"
    else:
        if not host.isascii():
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                return None, f"invalid host name {host!r}"
        if not _HOST_NAME.fullmatch(host):
            return None, f"invalid host name {host!r}"
        host = host.removesuffix(".")
        if len(host) > 253:
            return None, "host name longer than 253 characters"
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    if parts.username or parts.password:
        netloc = f"{_normalise_escapes(userinfo, _USERINFO)}@{netloc}"
    path = _normalise_escapes(parts.path, _PATH) or "/"
    if "/." in path:
        path = _remove_dot_segments(path)
        if "%" in path:  # a stray "%" may have gone with a segment: decode what it held back
            path = _normalise_escapes(path, _PATH)
    query = parts.query
    if query:
        return f"{scheme}://{netloc}{path}?{_normalise_escapes(query, _QUERY)}", ""
    return f"{scheme}://{netloc}{path}", ""


# C0 controls, space, DEL and any other str.isspace() character.
_BAD_CHAR = re.compile(r"[\x00-\x20\x7f\s]")
# A name after IDNA: labels of 1 to 63 characters, one trailing dot allowed (the
# checks the idna codec makes on ASCII names, without its cost). "%", "\\", "<" ...
# are not looked up by any resolver: rejected here rather than failing in DNS.
_HOST_LABEL = r"[A-Za-z0-9\-_~!$&'()*+,;=]{1,63}"
_HOST_NAME = re.compile(rf"(?:{_HOST_LABEL}\.)*{_HOST_LABEL}\.?")
_UNRESERVED = string.ascii_letters + string.digits + "-._~"
_SUB_DELIMS = "!$&'()*+,;="
_USERINFO_OK = _UNRESERVED + _SUB_DELIMS + ":"
_PATH_OK = _USERINFO_OK + "@/"
_QUERY_OK = _PATH_OK + "?"


class _Component:
    """How to normalise one of userinfo, path, query, given the characters it allows as is."""

    def __init__(self, allowed: str) -> None:
        chars = re.escape(allowed)
        self.other = re.compile(f"[^{chars}]")  # fast test: is there a "%" or anything to encode?
        self.work = re.compile(rf"%[0-9A-Fa-f]{{2}}|[^{chars}%]+")  # each escape, each bad run


_USERINFO = _Component(_USERINFO_OK)
_PATH = _Component(_PATH_OK)
_QUERY = _Component(_QUERY_OK)
# A "%" that starts no escape (also what fetch.request_url encodes).
STRAY_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_BYTE_ESCAPE = [f"%{b:02X}" for b in range(256)]


def _escape_table(decode: str) -> dict[str, str]:
    """Every ``%xx`` spelling -> the character if it is in ``decode``, else ``%XX``."""
    table = {}
    for a in string.hexdigits:
        for b in string.hexdigits:
            char = chr(int(a + b, 16))
            table[f"%{a}{b}"] = char if char in decode else f"%{a}{b}".upper()
    return table


_ESCAPE_DECODED = _escape_table(_UNRESERVED)
# Next to a stray "%" a decoded hex digit could form a new escape: "%%414" is
# not "%A4". Other unreserved characters, "." among them, are still decoded.
_ESCAPE_DECODED_BUT_HEX = _escape_table(
    "".join(c for c in _UNRESERVED if c not in string.hexdigits)
)


def _normalise_escapes(text: str, component: _Component) -> str:
    """Percent-encoding normalisation of one component (RFC 3986 6.2.2.1, 6.2.2.2)."""
    if not component.other.search(text):
        return text
    escapes = _ESCAPE_DECODED
    if STRAY_PERCENT.search(text):
        escapes = _ESCAPE_DECODED_BUT_HEX

    def fix(match: re.Match[str]) -> str:
        found = match.group()
        if found[0] == "%":
            return escapes[found]
        return "".join([_BYTE_ESCAPE[b] for b in found.encode("utf-8")])

    return component.work.sub(fix, text)


def normalise_target(text: str) -> str:
    """A path with its ``?query``, percent-encoding normalised as ``check_url`` does it
    (unreserved escapes decoded, hex upper-cased, other characters encoded as UTF-8),
    so that two spellings of one target compare equal: robots.txt rules and URLs."""
    return _normalise_escapes(text, _QUERY)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 for an absolute path: "/a/./b/../c" -> "/a/c"."""
    segments = path.split("/")[1:]
    out: list[str] = []
    for segment in segments:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    if segments[-1] in (".", ".."):
        out.append("")
    return "/" + "/".join(out)


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
