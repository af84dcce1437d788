"""robots.txt cache: status handling, single flight, expiry, eviction and RFC 9309 matching.

The network is a fake callback that records every robots.txt URL it is asked for,
so each test can assert exactly how many fetches happened.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from crawler.robots import FAILURE_TTL, MAX_ROBOTS_CHARS, RobotsCache, product_token

AGENT = "image-crawler/0.1 (+https://github.com/image-crawler/image-crawler)"
ROBOTS = "http://site.example/robots.txt"
SITE = "http://site.example"

Response = tuple[int, str] | None


class FakeFetch:
    """Answers from ``responses`` (mutable between calls); optionally holds every
    fetch at ``gate`` so callers can pile up while one is in flight."""

    def __init__(self, responses: dict[str, Response | Exception], *, gated: bool = False) -> None:
        self.responses = responses
        self.calls: list[str] = []
        self.started = asyncio.Event()
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()

    async def __call__(self, url: str) -> Response:
        self.calls.append(url)
        self.started.set()
        await self.gate.wait()
        response = self.responses[url]
        if isinstance(response, Exception):
            raise response
        return response


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def robots(text: str, *, agent: str = AGENT) -> tuple[FakeFetch, RobotsCache]:
    fetch = FakeFetch({ROBOTS: (200, text)})
    return fetch, RobotsCache(fetch, agent)


async def test_group_for_our_agent_does_not_bind_others() -> None:
    text = "User-agent: Image-Crawler\nDisallow: /private\n\nUser-agent: *\nDisallow: /nobody\n"
    fetch, ours = robots(text)
    assert await ours.allowed(f"{SITE}/private/a.jpg") is False
    assert await ours.allowed(f"{SITE}/public/a.jpg") is True
    # Our group replaces the * group rather than adding to it.
    assert await ours.allowed(f"{SITE}/nobody/a.jpg") is True
    assert fetch.calls == [ROBOTS]

    fetch, theirs = robots(text, agent="otherbot/2.0")
    assert await theirs.allowed(f"{SITE}/private/a.jpg") is True
    assert await theirs.allowed(f"{SITE}/nobody/a.jpg") is False
    assert fetch.calls == [ROBOTS]


async def test_star_group_applies_when_no_group_names_us() -> None:
    fetch, cache = robots("User-agent: otherbot\nDisallow: /\n\nUser-agent: *\nDisallow: /tmp\n")
    assert await cache.allowed(f"{SITE}/tmp/a.jpg") is False
    assert await cache.allowed(f"{SITE}/a.jpg") is True
    assert fetch.calls == [ROBOTS]


async def test_allow_overrides_disallow_in_same_group() -> None:
    fetch, cache = robots("User-agent: *\nAllow: /images/public\nDisallow: /images\n")
    assert await cache.allowed(f"{SITE}/images/public/a.jpg") is True
    assert await cache.allowed(f"{SITE}/images/secret/a.jpg") is False
    assert await cache.allowed(f"{SITE}/other/a.jpg") is True
    assert fetch.calls == [ROBOTS]


async def verdicts(text: str, *paths: str) -> list[bool]:
    """Whether each path of SITE is allowed under robots.txt ``text``."""
    _, cache = robots(text)
    return [await cache.allowed(f"{SITE}{path}") for path in paths]


async def test_the_longest_match_wins_and_allow_wins_a_tie() -> None:
    paths = ("/images/public/a.jpg", "/images/secret/a.jpg")
    text = "User-agent: *\nDisallow: /images\nAllow: /images/public\n"
    assert await verdicts(text, *paths) == [True, False]
    text = "User-agent: *\nAllow: /\nDisallow: /private\n"
    assert await verdicts(text, "/private/a.jpg", "/a.jpg") == [False, True]
    assert await verdicts("User-agent: *\nDisallow: /a\nAllow: /a\n", "/a.jpg") == [True]
    # A wildcard pattern's length is its own, not that of what it matched.
    text = "User-agent: *\nAllow: /*.jpg\nDisallow: /private/\n"
    assert await verdicts(text, "/private/a.jpg", "/other/a.jpg") == [False, True]


async def test_agent_lines_name_the_product_token_case_insensitively() -> None:
    assert await verdicts("User-agent: Image-Crawler/2.0\nDisallow: /\n", "/a.jpg") == [False]
    # Not a substring match (urllib's): these name other crawlers.
    for other in ("CRAWLER", "image-crawler-pro", "image"):
        assert await verdicts(f"User-agent: {other}\nDisallow: /\n", "/a.jpg") == [True], other


async def test_groups_that_name_us_are_merged_and_replace_the_star_groups() -> None:
    text = (
        "User-agent: image-crawler\nDisallow: /one\n\n"
        "User-agent: *\nDisallow: /everyone\n\n"
        "User-agent: otherbot\nUser-agent: image-crawler\nDisallow: /two\n"
    )
    paths = ("/one/a.jpg", "/two/a.jpg", "/everyone/a.jpg")
    assert await verdicts(text, *paths) == [False, False, True]


async def test_a_group_that_names_us_with_no_rules_allows_everything() -> None:
    text = "User-agent: image-crawler\nDisallow:\n\nUser-agent: *\nDisallow: /\n"
    assert await verdicts(text, "/a.jpg") == [True]


async def test_rules_outside_any_group_and_other_lines_are_ignored() -> None:
    text = (
        "Disallow: /before-any-group\nSitemap: https://site.example/map.xml\n"
        "User-agent: *  # everyone\nCrawl-delay: 5\nDisallow: /tmp  # scratch\n"
        "Disallow: not-a-path\n"
    )
    paths = ("/before-any-group/a.jpg", "/tmp/a.jpg", "/not-a-path")
    assert await verdicts(text, *paths) == [True, False, True]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410])
async def test_4xx_allows_everything_for_the_full_ttl(status: int) -> None:
    clock = FakeClock()
    fetch = FakeFetch({ROBOTS: (status, "User-agent: *\nDisallow: /\n")})
    cache = RobotsCache(fetch, AGENT, ttl=3600.0, clock=clock)
    assert await cache.allowed(f"{SITE}/a.jpg") is True
    clock.now = 3599.0
    assert await cache.allowed(f"{SITE}/b.jpg") is True
    assert fetch.calls == [ROBOTS]
    clock.now = 3600.0
    assert await cache.allowed(f"{SITE}/c.jpg") is True
    assert fetch.calls == [ROBOTS, ROBOTS]


@pytest.mark.parametrize(
    "failure",
    [(500, "User-agent: *\nDisallow: /\n"), (503, ""), (429, ""), (302, ""), None],
    ids=["500", "503", "429", "302", "no-response"],
)
async def test_errors_allow_and_are_retried_after_the_failure_ttl(failure: Response) -> None:
    clock = FakeClock()
    fetch = FakeFetch({ROBOTS: failure})
    cache = RobotsCache(fetch, AGENT, clock=clock)
    assert await cache.allowed(f"{SITE}/private/a.jpg") is True
    clock.now = FAILURE_TTL - 1
    assert await cache.allowed(f"{SITE}/private/a.jpg") is True
    assert fetch.calls == [ROBOTS]

    fetch.responses[ROBOTS] = (200, "User-agent: *\nDisallow: /private\n")
    clock.now = FAILURE_TTL
    assert await cache.allowed(f"{SITE}/private/a.jpg") is False
    assert fetch.calls == [ROBOTS, ROBOTS]
    # A success is then kept for the full ttl, not the failure one.
    clock.now = FAILURE_TTL * 10
    assert await cache.allowed(f"{SITE}/private/a.jpg") is False
    assert fetch.calls == [ROBOTS, ROBOTS]


async def test_failure_ttl_never_exceeds_ttl() -> None:
    clock = FakeClock()
    fetch = FakeFetch({ROBOTS: None})
    cache = RobotsCache(fetch, AGENT, ttl=5.0, clock=clock)
    assert await cache.allowed(f"{SITE}/a.jpg") is True
    clock.now = 5.0
    assert await cache.allowed(f"{SITE}/a.jpg") is True
    assert fetch.calls == [ROBOTS, ROBOTS]


async def test_callback_exception_allows_and_leaves_no_broken_entry() -> None:
    clock = FakeClock()
    fetch = FakeFetch({ROBOTS: RuntimeError("bug in the fetch layer")}, gated=True)
    cache = RobotsCache(fetch, AGENT, clock=clock)
    waiters = [asyncio.create_task(cache.allowed(f"{SITE}/private/{n}.jpg")) for n in range(5)]
    await fetch.started.wait()
    fetch.gate.set()
    assert await asyncio.gather(*waiters) == [True] * 5
    assert fetch.calls == [ROBOTS]

    # Cached like a network failure, then retried and honoured.
    fetch.responses[ROBOTS] = (200, "User-agent: *\nDisallow: /private\n")
    assert await cache.allowed(f"{SITE}/private/a.jpg") is True
    assert fetch.calls == [ROBOTS]
    clock.now = FAILURE_TTL
    assert await cache.allowed(f"{SITE}/private/a.jpg") is False
    assert await cache.allowed(f"{SITE}/public/a.jpg") is True
    assert fetch.calls == [ROBOTS, ROBOTS]


async def test_concurrent_callers_share_one_fetch() -> None:
    fetch = FakeFetch({ROBOTS: (200, "User-agent: *\nDisallow: /private\n")}, gated=True)
    cache = RobotsCache(fetch, AGENT)
    urls = [f"{SITE}/{'private' if n % 2 else 'public'}/{n}.jpg" for n in range(100)]
    waiters = [asyncio.create_task(cache.allowed(url)) for url in urls]
    await fetch.started.wait()
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    fetch.gate.set()
    assert await asyncio.gather(*waiters) == [n % 2 == 0 for n in range(100)]
    assert fetch.calls == [ROBOTS]


async def test_cancelled_waiter_does_not_cancel_the_shared_fetch() -> None:
    fetch = FakeFetch({ROBOTS: (200, "User-agent: *\nDisallow: /private\n")}, gated=True)
    cache = RobotsCache(fetch, AGENT)
    doomed = asyncio.create_task(cache.allowed(f"{SITE}/private/a.jpg"))
    survivor = asyncio.create_task(cache.allowed(f"{SITE}/private/b.jpg"))
    await fetch.started.wait()
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    fetch.gate.set()
    assert await survivor is False
    assert await cache.allowed(f"{SITE}/public/a.jpg") is True
    assert fetch.calls == [ROBOTS]


async def test_fetch_completes_and_is_cached_when_its_only_waiter_is_cancelled() -> None:
    fetch = FakeFetch({ROBOTS: (200, "User-agent: *\nDisallow: /private\n")}, gated=True)
    cache = RobotsCache(fetch, AGENT)
    doomed = asyncio.create_task(cache.allowed(f"{SITE}/private/a.jpg"))
    await fetch.started.wait()
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    fetch.gate.set()
    assert await cache.allowed(f"{SITE}/private/a.jpg") is False
    assert fetch.calls == [ROBOTS]


async def test_origin_is_scheme_host_and_port() -> None:
    fetch = FakeFetch({})
    fetch.responses = {
        "http://site.example/robots.txt": (200, "User-agent: *\nDisallow: /a\n"),
        "http://site.example:8080/robots.txt": (200, "User-agent: *\nDisallow: /b\n"),
        "https://site.example/robots.txt": (404, ""),
        "http://[::1]:8080/robots.txt": (200, "User-agent: *\nDisallow: /c\n"),
    }
    cache = RobotsCache(fetch, AGENT)
    assert await cache.allowed("http://site.example/a/1.jpg") is False
    assert await cache.allowed("http://site.example/b/1.jpg") is True
    assert await cache.allowed("http://site.example:8080/a/1.jpg") is True
    assert await cache.allowed("http://site.example:8080/b/1.jpg") is False
    assert await cache.allowed("https://site.example/a/1.jpg") is True
    assert await cache.allowed("http://[::1]:8080/c/1.jpg") is False
    # Same origins spelled differently: case, default port, credentials.
    assert await cache.allowed("HTTP://Site.EXAMPLE/a/2.jpg") is False
    assert await cache.allowed("http://site.example:80/a/3.jpg") is False
    assert await cache.allowed("http://user:pw@site.example/a/4.jpg") is False
    assert await cache.allowed("https://site.example:443/a/5.jpg") is True
    assert fetch.calls == [
        "http://site.example/robots.txt",
        "http://site.example:8080/robots.txt",
        "https://site.example/robots.txt",
        "http://[::1]:8080/robots.txt",
    ]


async def test_lru_evicts_the_least_recently_used_origin() -> None:
    fetch = FakeFetch({f"http://{h}.example/robots.txt": (404, "") for h in "abc"})
    cache = RobotsCache(fetch, AGENT, max_origins=2)
    for host in "abac":  # the second "a" makes "b" the least recently used
        assert await cache.allowed(f"http://{host}.example/x.jpg") is True
    assert fetch.calls == [f"http://{h}.example/robots.txt" for h in "abc"]
    assert await cache.allowed("http://a.example/y.jpg") is True
    assert await cache.allowed("http://c.example/y.jpg") is True
    assert len(fetch.calls) == 3
    assert await cache.allowed("http://b.example/y.jpg") is True
    assert fetch.calls == [f"http://{h}.example/robots.txt" for h in "abcb"]


async def test_entries_expire_after_ttl() -> None:
    clock = FakeClock()
    fetch = FakeFetch({ROBOTS: (200, "User-agent: *\nDisallow: /old\n")})
    cache = RobotsCache(fetch, AGENT, ttl=100.0, clock=clock)
    assert await cache.allowed(f"{SITE}/old/a.jpg") is False
    fetch.responses[ROBOTS] = (200, "User-agent: *\nDisallow: /new\n")
    clock.now = 99.5
    assert await cache.allowed(f"{SITE}/old/a.jpg") is False
    assert fetch.calls == [ROBOTS]
    clock.now = 100.0
    assert await cache.allowed(f"{SITE}/old/a.jpg") is True
    assert await cache.allowed(f"{SITE}/new/a.jpg") is False
    assert fetch.calls == [ROBOTS, ROBOTS]


async def test_query_strings_take_part_in_matching() -> None:
    fetch, cache = robots("User-agent: *\nDisallow: /search?q=\nDisallow: /img?size=large\n")
    assert await cache.allowed(f"{SITE}/search?q=cats") is False
    assert await cache.allowed(f"{SITE}/search") is True
    assert await cache.allowed(f"{SITE}/search?page=2&q=cats") is True
    assert await cache.allowed(f"{SITE}/img?size=large&fmt=jpg") is False
    assert await cache.allowed(f"{SITE}/img?size=small") is True
    # An encoded "?" is part of the path, not the start of a query.
    assert await cache.allowed(f"{SITE}/search%3Fq%3Dcats") is True
    assert fetch.calls == [ROBOTS]


async def test_fragment_takes_no_part_in_matching() -> None:
    # "#" starts a comment in robots.txt, so a rule can only spell it encoded.
    _, cache = robots("User-agent: *\nDisallow: /page%23secret\n")
    assert await cache.allowed(f"{SITE}/page#secret") is True
    assert await cache.allowed(f"{SITE}/page%23secret") is False


async def test_percent_encoding_is_normalised_on_both_sides() -> None:
    text = (
        "User-agent: *\nDisallow: /caf%C3%A9\nDisallow: /a b\nDisallow: /%7euser\nDisallow: /x/y\n"
        "Disallow: /naïve\n"
    )
    fetch, cache = robots(text)
    assert await cache.allowed(f"{SITE}/café/menu.jpg") is False
    assert await cache.allowed(f"{SITE}/caf%C3%A9/menu.jpg") is False
    assert await cache.allowed(f"{SITE}/caf%c3%a9/menu.jpg") is False
    assert await cache.allowed(f"{SITE}/cafe/menu.jpg") is True
    assert await cache.allowed(f"{SITE}/a%20b.jpg") is False
    assert await cache.allowed(f"{SITE}/~user/a.jpg") is False
    assert await cache.allowed(f"{SITE}/%7Euser/a.jpg") is False
    assert await cache.allowed(f"{SITE}/na%C3%AFve.jpg") is False
    # RFC 9309 keeps %2F distinct from "/".
    assert await cache.allowed(f"{SITE}/x%2Fy.jpg") is True
    assert await cache.allowed(f"{SITE}/x/y.jpg") is False
    assert fetch.calls == [ROBOTS]


async def test_star_matches_any_run_and_a_final_dollar_the_end() -> None:
    text = "User-agent: *\nDisallow: /*.gif$\nDisallow: /*?\nDisallow: /a*/b$c\n"
    paths = ("/a.gif", "/deep/er/a.gif", "/a.gifs", "/a.jpg", "/a.jpg?size=1")
    assert await verdicts(text, *paths) == [False, False, True, True, False]
    # "$" anywhere but at the end is an ordinary character.
    assert await verdicts(text, "/ax/b$c/d.jpg", "/ax/bc/d.jpg") == [False, True]


async def test_blank_lines_and_bom_do_not_drop_rules() -> None:
    text = "\ufeffUser-agent: otherbot\n\nUser-agent: image-crawler\n\nDisallow: /private\n"
    fetch, cache = robots(text)
    assert await cache.allowed(f"{SITE}/private/a.jpg") is False
    assert await cache.allowed(f"{SITE}/public/a.jpg") is True
    _, other = robots(text, agent="otherbot")
    assert await other.allowed(f"{SITE}/private/a.jpg") is False
    assert fetch.calls == [ROBOTS]


async def test_empty_robots_txt_allows_everything() -> None:
    # An unset last_checked would make urllib answer False for everything.
    fetch, cache = robots("")
    assert await cache.allowed(f"{SITE}/a.jpg") is True
    assert fetch.calls == [ROBOTS]


async def test_huge_robots_txt_is_truncated_not_rejected() -> None:
    head = "User-agent: *\nDisallow: /early\n"
    cut_rule = "Disallow: /private\n"
    # Pad so the cap falls inside cut_rule, just after "Disallow: /p".
    padding = "#" * (MAX_ROBOTS_CHARS - len(head) - len("Disallow: /p") - 1) + "\n"
    text = head + padding + cut_rule + "Disallow: /late\n" * 20_000
    assert (head + padding + cut_rule)[MAX_ROBOTS_CHARS - 1] == "p"
    assert len(text) > MAX_ROBOTS_CHARS + 300_000
    fetch, cache = robots(text)
    assert await cache.allowed(f"{SITE}/early/a.jpg") is False
    assert await cache.allowed(f"{SITE}/late/a.jpg") is True
    assert await cache.allowed(f"{SITE}/private/a.jpg") is True
    # The clipped "Disallow: /p" must not survive as a rule of its own.
    assert await cache.allowed(f"{SITE}/public/a.jpg") is True
    assert fetch.calls == [ROBOTS]


async def test_urls_without_a_robots_txt_are_allowed_without_fetching() -> None:
    fetch = FakeFetch({})
    cache = RobotsCache(fetch, AGENT)
    for url in ["ftp://site.example/a.jpg", "data:image/png;base64,AAAA", "http:///a.jpg"]:
        assert await cache.allowed(url) is True
    assert await cache.allowed("http://site.example:99999/a.jpg") is True
    assert await cache.allowed("http://[::1/a.jpg") is True
    assert fetch.calls == []


def test_product_token() -> None:
    assert product_token(AGENT) == "image-crawler"
    assert product_token("Image-Crawler (+https://x)") == "image-crawler"
    assert product_token("  bot ") == "bot"


def test_invalid_arguments_are_rejected() -> None:
    fetch = FakeFetch({})
    with pytest.raises(ValueError, match="ttl"):
        RobotsCache(fetch, AGENT, ttl=0.0)
    with pytest.raises(ValueError, match="max_origins"):
        RobotsCache(fetch, AGENT, max_origins=0)
    with pytest.raises(ValueError, match="product token"):
        RobotsCache(fetch, " /1.0")


def test_module_does_not_import_aiohttp() -> None:
    probe = "import sys, crawler.robots; sys.exit('aiohttp' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0
