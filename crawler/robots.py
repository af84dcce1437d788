"""robots.txt: fetched once per origin, cached, consulted before each download.

The network is reached only through a :data:`RobotsFetch` callback from the
fetch layer, which owns timeouts, redirects and the download size cap, so this
module never imports aiohttp.

Matching follows RFC 9309:

* Groups: our agent is the User-Agent's product token (``image-crawler`` from
  ``image-crawler/0.1 (+https://...)``). A group applies when one of its
  ``User-agent`` lines names that token, case-insensitively (``User-agent:
  Image-Crawler/2`` does, ``User-agent: crawler`` does not). Every group that
  names us is merged; only when none does, every ``*`` group is. Consecutive
  ``User-agent`` lines share a group; blank lines do not end one.
* Rules: the **longest** matching ``Allow``/``Disallow`` pattern wins, and
  ``Allow`` wins a tie. ``*`` matches any run of characters and a final ``$``
  the end of the path; patterns match from the start of the path and its query.
  An empty ``Disallow:`` disallows nothing.
* Both sides are compared after the URL normaliser's percent-encoding
  (``check_url`` for URLs, ``normalise_target`` for rules): ``%7E`` is ``~``
  and ``é`` is ``%C3%A9``, but ``%2F`` stays distinct from ``/`` and ``%3F``
  from ``?``. The fragment takes no part.

Statuses: 2xx is parsed; a 4xx other than 429 means there are no rules: allow all.
5xx, 429, any other status, a network failure (``None``) or a callback exception
also allow all (RFC 9309 says to assume disallow-all on 5xx; the product treats
errors as allow), but are cached for at most :data:`FAILURE_TTL` so a transient
error is retried.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeAlias
from urllib.parse import urlsplit

from crawler.sources import check_url, normalise_target

log = logging.getLogger(__name__)

RobotsFetch: TypeAlias = Callable[[str], Awaitable[tuple[int, str] | None]]
"""Given the robots.txt URL, return ``(status, text)``, or ``None`` on a network
failure or timeout. The callback enforces its own timeout and size cap."""

MAX_ROBOTS_CHARS = 500 * 1024
"""Only this much of a robots.txt is parsed (RFC 9309 asks for at least 500 KiB);
the fetch callback's size cap should be at least this large."""

FAILURE_TTL = 600.0
"""Longest time an error outcome (5xx, 429, no response) is cached before a retry."""

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Rule:
    allow: bool
    pattern: str  # normalised; its length is the rule's precedence
    regex: re.Pattern[str] | None  # None: a plain prefix (most rules), no regex needed

    @classmethod
    def of(cls, allow: bool, pattern: str) -> Rule:
        if "*" not in pattern and not pattern.endswith("$"):
            return cls(allow, pattern, None)
        anchored = pattern.endswith("$")
        body = pattern[:-1] if anchored else pattern
        regex = ".*".join(re.escape(part) for part in body.split("*"))
        return cls(allow, pattern, re.compile(regex + ("\\Z" if anchored else ""), re.DOTALL))

    def matches(self, target: str) -> bool:
        if self.regex is None:
            return target.startswith(self.pattern)
        return self.regex.match(target) is not None


@dataclass(frozen=True, slots=True)
class _Rules:
    rules: tuple[Rule, ...]  # ours (or the * groups'), as ``parse`` orders them; empty: allow all
    expires: float


class RobotsCache:
    """Per-origin robots.txt rules with single-flight fetching, a TTL and LRU bound."""

    def __init__(
        self,
        fetch: RobotsFetch,
        user_agent: str,
        *,
        ttl: float = 86400.0,
        max_origins: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        if max_origins < 1:
            raise ValueError(f"max_origins must be at least 1, got {max_origins}")
        self._agent = product_token(user_agent)
        if not self._agent:
            raise ValueError(f"user agent {user_agent!r} has no product token")
        self._fetch = fetch
        self._ttl = ttl
        self._failure_ttl = min(ttl, FAILURE_TTL)
        self._max_origins = max_origins
        self._clock = clock
        self._cache: OrderedDict[str, _Rules] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[_Rules]] = {}

    async def allowed(self, url: str) -> bool:
        """Whether robots.txt lets us fetch ``url``.

        URLs that ``check_url`` rejects (not http(s), no host, malformed) are allowed
        without a fetch: there is no robots.txt to ask, and the crawl records them
        as invalid itself.
        """
        key, _ = check_url(url)
        if key is None:
            return True
        parts = urlsplit(key)
        return await self.allowed_at(robots_origin(parts.scheme, parts.hostname, parts.port), key)

    async def allowed_at(self, origin: str | None, key: str) -> bool:
        """``allowed`` for a URL already normalised by ``check_url`` (the crawl's key),
        whose ``robots_origin`` the caller has."""
        if origin is None:
            return True
        rules = (await self._rules_for(origin)).rules
        if not rules:
            return True
        # The key's path and query: normalised as the rules are, with no fragment.
        return allows(rules, key[key.index("/", key.index("//") + 2) :])

    async def _rules_for(self, origin: str) -> _Rules:
        rules = self._cache.get(origin)
        if rules is not None and rules.expires > self._clock():
            self._cache.move_to_end(origin)
            return rules
        task = self._inflight.get(origin)
        if task is None:
            task = asyncio.create_task(self._load(origin))
            self._inflight[origin] = task
            task.add_done_callback(lambda _: self._inflight.pop(origin, None))
        # Shielded so that one caller giving up does not cancel the fetch others await.
        return await asyncio.shield(task)

    async def _load(self, origin: str) -> _Rules:
        robots_url = origin + "/robots.txt"
        try:
            response = await self._fetch(robots_url)
        except Exception:
            # A bug in the callback must not stop the crawl, nor be retried per URL.
            log.warning("robots.txt fetch for %s raised; allowing", robots_url, exc_info=True)
            response = None
        rules = self._interpret(response)
        self._cache[origin] = rules
        self._cache.move_to_end(origin)
        while len(self._cache) > self._max_origins:
            self._cache.popitem(last=False)
        return rules

    def _interpret(self, response: tuple[int, str] | None) -> _Rules:
        now = self._clock()
        if response is None:
            return _Rules((), now + self._failure_ttl)
        status, text = response
        if 200 <= status < 300:
            return _Rules(parse(text, self._agent), now + self._ttl)
        # 429 is a 4xx but says "come back later", not "there is no robots.txt".
        if 400 <= status < 500 and status != 429:
            return _Rules((), now + self._ttl)
        return _Rules((), now + self._failure_ttl)


def product_token(user_agent: str) -> str:
    """``image-crawler`` from ``image-crawler/0.1 (+https://...)``, lower-cased."""
    return re.split(r"[/\s]", user_agent.strip(), maxsplit=1)[0].lower()


def robots_origin(scheme: str, host: str | None, port: int | None) -> str | None:
    """Where a URL's robots.txt lives (``scheme://host[:port]``), from its urlsplit parts;
    None for a URL that has none (not http(s), no host)."""
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def parse(text: str, agent: str) -> tuple[Rule, ...]:
    """The rules of every group naming ``agent`` (a lower-case product token), or of
    every ``*`` group if none does."""
    # This runs on the event loop, which MAX_ROBOTS_CHARS bounds: a typical robots.txt
    # parses in well under a millisecond, a worst-case 500 KiB one (~18,000 rules, a
    # fifth with wildcards) in ~0.3 s, once per origin per TTL, and matching such a
    # file costs ~6 ms per URL: both as urllib's parser did, measured on that file.
    truncated = len(text) > MAX_ROBOTS_CHARS
    lines = text[:MAX_ROBOTS_CHARS].removeprefix("\ufeff").splitlines()
    if truncated:
        # The cut probably fell mid-line, and a clipped path is a different, shorter rule.
        del lines[-1:]
    ours: list[Rule] = []
    anyone: list[Rule] = []
    agents: set[str] = set()
    named = False  # some group names us: the * groups do not apply
    in_rules = False  # a user-agent line after rules starts a new group
    for line in lines:
        key, _, value = line.partition("#")[0].partition(":")
        key, value = key.strip().lower(), value.strip()
        if key == "user-agent":
            if in_rules:
                agents, in_rules = set(), False
            token = "*" if value == "*" else product_token(value)
            agents.add(token)
            named = named or token == agent
        elif key in ("allow", "disallow") and agents:
            in_rules = True
            mine, everyone = agent in agents, "*" in agents
            if not (mine or everyone) or not value.startswith(("/", "*")):
                continue  # another crawler's; or empty (disallows nothing), or not a path
            rule = Rule.of(key == "allow", normalise_target(value))
            if mine:
                ours.append(rule)
            if everyone:
                anyone.append(rule)
    # In the order they decide in: longest first, Allow first on a tie.
    return tuple(sorted(ours if named else anyone, key=lambda r: (-len(r.pattern), not r.allow)))


def allows(rules: tuple[Rule, ...], target: str) -> bool:
    """RFC 9309 2.2.2: the longest matching pattern decides, ``Allow`` on a tie.
    ``rules`` as ``parse`` orders them, so the first match decides."""
    for rule in rules:
        if rule.matches(target):
            return rule.allow
    return True
