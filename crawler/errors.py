"""The error kinds a record's ``error`` field may hold.

Every failure a URL can meet is named here, once. Layers below the pipeline
translate their own exceptions into one of these kinds at their boundary
(``fetch.py`` for the network, ``imaging.py`` for decoding), so nothing above
them needs to know about aiohttp or Pillow exceptions.

HTTP statuses are open-ended, so they are spelled ``http_<status>`` by
:func:`http_error` rather than enumerated.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorKind(StrEnum):
    INVALID_URL = "invalid_url"
    BLOCKED_ADDRESS = "blocked_address"
    TIMEOUT = "timeout"
    DNS = "dns"
    CONNECTION = "connection"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    TOO_LARGE = "too_large"
    TRUNCATED = "truncated"
    NOT_AN_IMAGE = "not_an_image"
    DECOMPRESSION_BOMB = "decompression_bomb"
    TOO_SMALL = "too_small"
    BAD_ASPECT_RATIO = "bad_aspect_ratio"
    RATE_LIMITED = "rate_limited"
    HOST_UNREACHABLE = "host_unreachable"
    ROBOTS = "robots"
    OPT_OUT = "opt_out"
    WORKER_CRASHED = "worker_crashed"
    STORAGE = "storage"
    INTERNAL = "internal"


# Kinds that mean "we chose not to fetch": the record is ``skipped``, not ``failed``.
SKIP_KINDS = frozenset({ErrorKind.ROBOTS, ErrorKind.OPT_OUT})
# Kinds worth another attempt; HTTP statuses are decided by ``retryable_status``.
RETRYABLE_KINDS = frozenset({ErrorKind.TIMEOUT, ErrorKind.CONNECTION, ErrorKind.TRUNCATED})


def retryable_status(status: int) -> bool:
    return status in (408, 429) or 500 <= status <= 599


def http_error(status: int) -> str:
    return f"http_{status}"


class CrawlError(Exception):
    """An expected failure of one URL, carrying its kind.

    Raised inside a layer and turned into a ``Failure`` value at its edge;
    it never escapes the handling of a single URL.
    """

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail
