"""The SSRF guard: address decisions, numeric host tricks, URL targets, and aiohttp wiring.

Decisions are tested by calling the policy directly: no test connects to, or
resolves, anything but loopback. Names in the live tests go through a fake
resolver with canned answers; the only server listens on 127.0.0.1.
"""

from __future__ import annotations

import pickle
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer

from crawler.guard import (
    AddressPolicy,
    BlockedAddress,
    GuardedResolver,
    blocked_cause,
    check_url_target,
    guard_middleware,
    parse_numeric_host,
)

DEFAULT = AddressPolicy()
LOOPBACK_OK = AddressPolicy(allow=("127.0.0.0/8",), ports=())


# --- address decisions -------------------------------------------------------

BLOCKED = [
    ("127.0.0.1", "loopback"),
    ("127.1.2.3", "loopback"),
    ("::1", "loopback"),
    ("10.0.0.1", "private"),
    ("10.255.255.255", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.254", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("0.1.2.3", "this network (0.0.0.0/8)"),
    ("100.64.0.1", "shared address space"),
    ("192.0.0.1", "IETF protocol assignments"),
    ("198.18.0.1", "benchmarking"),
    ("192.0.2.1", "documentation"),
    ("2001:db8::1", "documentation"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.0.0.1", "private"),
    ("::ffff:169.254.169.254", "link-local"),
    ("64:ff9b::7f00:1", "NAT64 of 127.0.0.1: loopback"),
    ("64:ff9b::a9fe:a9fe", "NAT64 of 169.254.169.254: link-local"),
    ("2002:7f00:1::", "6to4 of 127.0.0.1: loopback"),
    ("2002:a00:1::", "6to4 of 10.0.0.1: private"),
    ("::127.0.0.1", "IPv4-compatible of 127.0.0.1: loopback"),
    ("::8.8.8.8", "IPv4-compatible (deprecated)"),
    ("::ffff:0:7f00:1", "IPv4-translated of 127.0.0.1: loopback"),
    # Teredo's client field is the bit-inverted 192.0.2.45.
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo of 192.0.2.45: documentation"),
    ("2001::1", "Teredo of 255.255.255.254: reserved"),
    ("2001::f7f7:f7f7", "Teredo"),  # client 8.8.8.8: public, but Teredo is not
    ("fec0::1", "site-local (deprecated)"),
    ("4000::1", "reserved"),
    ("not-an-ip", "not an IP address"),
]


@pytest.mark.parametrize(("ip", "reason"), BLOCKED)
def test_blocked_addresses(ip: str, reason: str) -> None:
    assert DEFAULT.check(ip) == reason


# Decision only: nothing here is ever connected to.
@pytest.mark.parametrize(
    "ip", ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "64:ff9b::808:808", "2002:808:808::"]
)
def test_public_addresses_allowed(ip: str) -> None:
    assert DEFAULT.check(ip) is None


@pytest.mark.parametrize("ip", ["127.0.0.1", "127.255.0.9", "::ffff:127.0.0.1"])
def test_allowlist_permits_loopback(ip: str) -> None:
    assert LOOPBACK_OK.check(ip) is None


def test_allowlist_is_narrow() -> None:
    # 127/8 lets loopback through, nothing else; and an IPv4 entry does not
    # extend to IPv6 (::1) or to translators that embed the IPv4 address.
    for ip in ("::1", "10.0.0.1", "169.254.169.254", "64:ff9b::7f00:1", "2002:7f00:1::"):
        assert LOOPBACK_OK.check(ip) is not None, ip
    # 0.0.0.1 is numerically inside ::/96; the versions must not be mixed up.
    assert AddressPolicy(allow=("::/96",)).check("0.0.0.1") is not None
    assert AddressPolicy(allow=("::1/128",)).check("::1") is None


def test_policy_validates_configuration() -> None:
    with pytest.raises(ValueError, match="does not appear to be"):
        AddressPolicy(allow=("localhost",))
    with pytest.raises(ValueError, match="port out of range"):
        AddressPolicy(ports=(0,))
    # Lists (from settings files) become tuples, so the policy stays hashable.
    policy = AddressPolicy(allow=["10.0.0.0/8"], ports=[443])  # type: ignore[arg-type]
    assert hash(policy) == hash(AddressPolicy(allow=("10.0.0.0/8",), ports=(443,)))


@pytest.mark.parametrize(
    ("policy", "port", "allowed"),
    [
        (DEFAULT, 80, True),
        (DEFAULT, 443, True),
        (DEFAULT, 8080, False),
        (DEFAULT, 22, False),
        (AddressPolicy(ports=()), 8080, True),
        (AddressPolicy(ports=(8443,)), 443, False),
    ],
)
def test_ports(policy: AddressPolicy, port: int, allowed: bool) -> None:
    reason = policy.check_port(port)
    assert (reason is None) is allowed
    if not allowed:
        assert reason == f"port {port} not allowed"


# --- numeric host tricks -----------------------------------------------------

TRICKS = [
    "2130706433",
    "0x7f000001",
    "0X7F000001",
    "017700000001",
    "127.1",
    "0x7f.1",
    "127.0.1",
    "0177.0.0.1",
    "0x7f.0x0.0x0.0x1",
    "127.0.0.1",
    "127.0.0.1.",
]


@pytest.mark.parametrize("host", TRICKS)
def test_numeric_tricks_mean_loopback(host: str) -> None:
    assert parse_numeric_host(host) == "127.0.0.1"
    # The C library's inet_aton, the reading being defended against, agrees
    # (it is purely local: no lookup). glibc refuses only the trailing dot.
    if not host.endswith("."):
        assert socket.inet_ntoa(socket.inet_aton(host)) == "127.0.0.1"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("4294967295", "255.255.255.255"),
        ("0", "0.0.0.0"),
        ("3232235777", "192.168.1.1"),
        ("10.1", "10.0.0.1"),
        ("4294967296", None),  # one past 32 bits
        ("256.0.0.1", None),
        ("1.2.3.4.5", None),
        ("127..1", None),
        ("08", None),  # not octal
        ("0x7g", None),
        ("example.com", None),
        ("１２７.０.０.１", None),  # fullwidth digits are not ASCII (yarl maps them first)
        ("9" * 5000, None),  # too long for int(): must not raise
        ("", None),
    ],
)
def test_numeric_host_edges(host: str, expected: str | None) -> None:
    assert parse_numeric_host(host) == expected


# --- URL targets -------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://127.0.0.1/a.png", "127.0.0.1 refused: loopback"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::1]/a.png", "::1 refused: loopback"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://[fe80::1%25eth0]/", "link-local"),
        ("http://[64:ff9b::7f00:1]/", "NAT64 of 127.0.0.1"),
        ("http://2130706433/", "2130706433 -> 127.0.0.1 refused: loopback"),
        ("http://0x7f000001/", "-> 127.0.0.1 refused: loopback"),
        ("http://017700000001/", "-> 127.0.0.1 refused: loopback"),
        ("http://127.1/", "-> 127.0.0.1 refused: loopback"),
        ("http://0x7f.1/", "-> 127.0.0.1 refused: loopback"),
        ("http://127.0.0.1./", "-> 127.0.0.1 refused: loopback"),
        ("http://１２７.０.０.１/", "127.0.0.1 refused: loopback"),  # yarl folds to ASCII
        ("http://example.com:8080/", "port 8080 not allowed"),
        ("https://8.8.8.8:22/", "port 22 not allowed"),
        ("http:///nohost", "no host"),
        ("http://[::1/", "unparseable URL"),
    ],
)
def test_url_target_refused(url: str, fragment: str) -> None:
    reason = check_url_target(url, DEFAULT)
    assert reason is not None and fragment in reason


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/a.png",  # names are the resolver's business
        "https://images.example.org/x.jpg",
        "http://localhost/",  # even this one: the resolver sees 127.0.0.1
        "http://8.8.8.8/a.png",  # decision only
        "https://[2606:4700::1111]/a.png",
    ],
)
def test_url_target_allowed(url: str) -> None:
    assert check_url_target(url, DEFAULT) is None


def test_url_target_allowlist() -> None:
    assert check_url_target("http://127.0.0.1:8080/", LOOPBACK_OK) is None
    assert check_url_target("http://0x7f.1:8080/", LOOPBACK_OK) is None
    assert check_url_target("http://[::1]:8080/", LOOPBACK_OK) is not None


def test_blocked_address_pickles() -> None:
    exc = pickle.loads(pickle.dumps(BlockedAddress("h.test", "127.0.0.1", "loopback")))
    assert isinstance(exc, BlockedAddress) and isinstance(exc, OSError)
    assert (exc.host, exc.address, exc.reason) == ("h.test", "127.0.0.1", "loopback")
    assert str(exc) == "h.test -> 127.0.0.1 refused: loopback"


# --- the resolver, with canned answers ---------------------------------------


def _answer(host: str, ip: str, port: int) -> ResolveResult:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    return ResolveResult(
        hostname=host,
        host=ip,
        port=port,
        family=family,
        proto=0,
        flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
    )


class FakeResolver(AbstractResolver):
    """Canned answers; unknown names fail like a real NXDOMAIN. Never touches the network."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []
        self.closed = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [_answer(host, ip, port) for ip in self.table[host]]

    async def close(self) -> None:
        self.closed = True


async def test_resolver_drops_refused_addresses() -> None:
    inner = FakeResolver({"mixed.test": ["127.0.0.1", "8.8.8.8", "10.0.0.1", "2606:4700::1111"]})
    resolver = GuardedResolver(DEFAULT, inner)
    kept = await resolver.resolve("mixed.test", 80, socket.AF_UNSPEC)
    assert [r["host"] for r in kept] == ["8.8.8.8", "2606:4700::1111"]


async def test_resolver_raises_when_nothing_is_left() -> None:
    inner = FakeResolver({"internal.test": ["10.0.0.5", "fd00::5"]})
    resolver = GuardedResolver(DEFAULT, inner)
    with pytest.raises(BlockedAddress) as info:
        await resolver.resolve("internal.test", 443)
    exc = info.value
    assert (exc.host, exc.address, exc.reason) == ("internal.test", "10.0.0.5", "private")
    assert str(exc) == "internal.test -> 10.0.0.5 refused: private"
    assert exc.errno is None


async def test_resolver_passes_through_other_failures_and_close() -> None:
    inner = FakeResolver({"empty.test": []})
    resolver = GuardedResolver(DEFAULT, inner)
    assert await resolver.resolve("empty.test") == []
    with pytest.raises(socket.gaierror):
        await resolver.resolve("nxdomain.test")
    await resolver.close()
    assert not inner.closed  # not ours to close


# --- live: aiohttp against a 127.0.0.1 server --------------------------------


@pytest.fixture
async def local() -> AsyncIterator[TestServer]:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def hop(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/hop", hop)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


def _session(
    policy: AddressPolicy, inner: FakeResolver, middleware: bool = True
) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(policy, inner))
    return aiohttp.ClientSession(
        connector=connector,
        middlewares=(guard_middleware(policy),) if middleware else (),
        trust_env=False,
        timeout=aiohttp.ClientTimeout(total=5),
    )


async def test_live_blocked_name(local: TestServer) -> None:
    inner = FakeResolver({"blocked.test": ["127.0.0.1"]})
    async with _session(AddressPolicy(ports=()), inner) as session:
        with pytest.raises(aiohttp.ClientConnectorDNSError) as info:
            await session.get(f"http://blocked.test:{local.port}/ok")
    exc = info.value
    # The chain the fetch layer sees: ClientConnectorDNSError whose os_error and
    # __cause__ are the BlockedAddress.
    assert isinstance(exc.os_error, BlockedAddress)
    assert exc.__cause__ is exc.os_error
    assert blocked_cause(exc) is exc.os_error
    assert exc.os_error.reason == "loopback"
    assert "blocked.test -> 127.0.0.1 refused: loopback" in str(exc)
    assert inner.asked == ["blocked.test"]


async def test_live_allowed_name_connects(local: TestServer) -> None:
    inner = FakeResolver({"allowed.test": ["127.0.0.1"]})
    async with (
        _session(LOOPBACK_OK, inner) as session,
        session.get(f"http://allowed.test:{local.port}/ok") as resp,
    ):
        assert resp.status == 200
        assert await resp.text() == "ok"
    assert inner.asked == ["allowed.test"]


async def test_live_ip_literal_skips_the_resolver(local: TestServer) -> None:
    # Why check_url_target exists: without it a literal is connected to even
    # though the resolver would refuse the very same address.
    inner = FakeResolver({})
    async with (
        _session(AddressPolicy(ports=()), inner, middleware=False) as session,
        session.get(f"http://127.0.0.1:{local.port}/ok") as resp,
    ):
        assert resp.status == 200
    assert inner.asked == []


async def test_live_noncanonical_literal_rejected_by_aiohttp(local: TestServer) -> None:
    # aiohttp 3.14 refuses all-digit non-canonical IPv4 hosts itself, before
    # any resolver or connection (the middleware would refuse them first).
    inner = FakeResolver({})
    async with _session(AddressPolicy(ports=()), inner, middleware=False) as session:
        with pytest.raises(aiohttp.InvalidUrlClientError):
            await session.get(f"http://2130706433:{local.port}/ok")
    assert inner.asked == []


async def test_live_middleware_refuses_literal(local: TestServer) -> None:
    inner = FakeResolver({})
    async with _session(AddressPolicy(ports=()), inner) as session:
        with pytest.raises(aiohttp.ClientOSError) as info:
            await session.get(f"http://127.0.0.1:{local.port}/ok")
    exc = info.value
    assert not isinstance(exc, aiohttp.ClientConnectorError)
    assert isinstance(exc.__cause__, BlockedAddress)
    assert blocked_cause(exc) is exc.__cause__
    assert exc.__cause__.reason == "loopback"


async def test_live_redirect_to_refused_literal(local: TestServer) -> None:
    # Allow only 127.0.0.1 and redirect to 127.0.0.2: if the guard failed, the
    # stray connection would still stay on loopback.
    policy = AddressPolicy(allow=("127.0.0.1/32",), ports=())
    inner = FakeResolver({"allowed.test": ["127.0.0.1"]})
    target = f"http://127.0.0.2:{local.port}/ok"
    async with _session(policy, inner) as session:
        with pytest.raises(aiohttp.ClientOSError) as info:
            await session.get(f"http://allowed.test:{local.port}/hop", params={"to": target})
    blocked = blocked_cause(info.value)
    assert blocked is not None
    assert (blocked.address, blocked.reason) == ("127.0.0.2", "loopback")


async def test_live_redirect_to_refused_name(local: TestServer) -> None:
    policy = AddressPolicy(allow=("127.0.0.1/32",), ports=())
    inner = FakeResolver({"allowed.test": ["127.0.0.1"], "inside.test": ["127.0.0.2"]})
    target = f"http://inside.test:{local.port}/ok"
    async with _session(policy, inner) as session:
        with pytest.raises(aiohttp.ClientConnectorDNSError) as info:
            await session.get(f"http://allowed.test:{local.port}/hop", params={"to": target})
    blocked = blocked_cause(info.value)
    assert blocked is not None and blocked.host == "inside.test"
    assert inner.asked == ["allowed.test", "inside.test"]


def test_blocked_cause_ignores_other_errors() -> None:
    assert blocked_cause(OSError("nope")) is None
    assert blocked_cause(ValueError()) is None
