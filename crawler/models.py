"""Values that cross a boundary: source -> fetch -> pool -> store -> manifest.

All frozen: once a stage has produced a value nobody downstream may change it.
``ImageJob``/``ImageResult``/``Failure`` cross the process boundary, so they
hold builtins only (they must pickle cheaply and unpickle without our code
doing anything clever).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Any, Literal

Status = Literal["ok", "failed", "skipped"]


@dataclass(frozen=True, slots=True)
class UrlEntry:
    """One line of input: the URL as given and the columns that came with it."""

    url: str
    meta: dict[str, Any] | None = None
    line: int = 0
    # Set when the line itself could not be read (bad JSON, no url column):
    # it still becomes a record, so no input line is ever lost.
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """An expected failure, as a value. ``kind`` is an ``errors.ErrorKind`` or ``http_<n>``."""

    kind: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ThumbSpec:
    sizes: tuple[int, ...] = (256,)
    format: Literal["jpeg", "webp"] = "jpeg"
    quality: int = 85
    background: tuple[int, int, int] = (255, 255, 255)

    @property
    def ext(self) -> str:
        return "jpg" if self.format == "jpeg" else "webp"


@dataclass(frozen=True, slots=True)
class ImageJob:
    """What the pool is asked to do with one body."""

    data: bytes
    thumbs: ThumbSpec
    max_pixels: int
    formats: tuple[str, ...]
    min_width: int = 0
    min_height: int = 0
    max_aspect_ratio: float = 0.0


@dataclass(frozen=True, slots=True)
class ImageResult:
    """What the pool hands back: hashes, geometry and encoded thumbnails, never the original."""

    sha256: str
    phash: str
    width: int
    height: int
    format: str
    ext: str
    thumbnails: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True, slots=True)
class Fetched:
    """A complete body, with what the server said about it."""

    body: bytes
    final_url: str
    http_status: int
    content_type: str | None
    # The format the bytes say they are, and a note when Content-Type disagrees.
    sniffed: str
    note: str | None = None
    # Validators for a later conditional GET (--refresh-after).
    etag: str | None = None
    last_modified: str | None = None


@dataclass(frozen=True, slots=True)
class NotModified:
    """A conditional GET answered 304: what we have is still current."""

    final_url: str


@dataclass(frozen=True, slots=True)
class FetchFailed:
    failure: Failure
    final_url: str | None = None
    http_status: int | None = None
    content_type: str | None = None
    # Seconds the server asked us to wait (Retry-After), if it did.
    retry_after: float | None = None
    # The host could not be reached at all (refused, DNS, connect timeout):
    # what the circuit breaker counts.
    unreachable: bool = False


@dataclass(frozen=True, slots=True)
class Record:
    """One line of ``manifest.jsonl``: what happened to one input URL."""

    url: str
    status: Status
    error: str | None = None
    detail: str | None = None
    http_status: int | None = None
    final_url: str | None = None
    content_type: str | None = None
    bytes: int | None = None
    sha256: str | None = None
    phash: str | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    path: str | None = None
    thumbnails: dict[str, str] = field(default_factory=dict)
    duplicate_of: str | None = None
    near_dup_group: str | None = None
    meta: dict[str, Any] | None = None
    fetched_at: str | None = None
    elapsed_ms: int | None = None
    attempts: int = 0

    def to_json(self) -> str:
        # Not dataclasses.asdict: it deep-copies every field, once per record.
        fields = {name: getattr(self, name) for name in _RECORD_FIELDS}
        return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))


_RECORD_FIELDS = tuple(f.name for f in dataclass_fields(Record))
