"""Server-side request forgery guard: only public addresses are ever connected to.

When the crawler runs as a service, the URLs come from other people, so a URL
(or a redirect, or a DNS answer) could point the crawler at loopback, the
private network or a cloud metadata endpoint. The one thing that matters is the
address a socket actually connects to, so the guard sits at two places:

* ``GuardedResolver`` filters every DNS answer aiohttp will connect to. Because
  aiohttp connects to exactly the addresses the resolver returns (and caches
  that filtered list), there is no window for DNS rebinding between the check
  and the connect.
* IP literals never reach a resolver in aiohttp (``TCPConnector._resolve_host``
  returns them as they are), so ``check_url_target`` vets literal hosts and
  ports of the first URL and of every redirect hop; ``guard_middleware`` runs it
  for every hop aiohttp is about to connect to.

Both refuse with ``BlockedAddress`` (an ``OSError``), which aiohttp carries to
the fetch layer as the ``__cause__`` of the exception it raises; ``blocked_cause``
finds it there.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientRequest, ClientResponse
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client_middlewares import ClientHandlerType, ClientMiddlewareType
from aiohttp.resolver import DefaultResolver
from yarl import URL

__all__ = [
    "AddressPolicy",
    "BlockedAddress",
    "GuardedResolver",
    "blocked_cause",
    "check_url_target",
    "guard_middleware",
    "parse_numeric_host",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

# Checked in order, so the first match gives the most specific reason. These are
# spelled out rather than left to ``is_global`` alone because the ``ipaddress``
# tables differ between Python patch releases (3.11.7 calls 192.0.0.0/24 and
# ::127.0.0.1 global, for instance), and because a named reason is what an
# operator needs to read in a failure record.
_V4_RULES: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (_V4("0.0.0.0/32"), "unspecified"),
    (_V4("0.0.0.0/8"), "this network (0.0.0.0/8)"),
    (_V4("127.0.0.0/8"), "loopback"),
    (_V4("169.254.0.0/16"), "link-local"),  # cloud metadata lives at 169.254.169.254
    (_V4("10.0.0.0/8"), "private"),
    (_V4("172.16.0.0/12"), "private"),
    (_V4("192.168.0.0/16"), "private"),
    (_V4("100.64.0.0/10"), "shared address space"),  # carrier-grade NAT
    # The whole block, including the two anycast addresses IANA marks global
    # (192.0.0.9, 192.0.0.10): an image crawler never needs them.
    (_V4("192.0.0.0/24"), "IETF protocol assignments"),
    (_V4("192.0.2.0/24"), "documentation"),
    (_V4("198.51.100.0/24"), "documentation"),
    (_V4("203.0.113.0/24"), "documentation"),
    (_V4("198.18.0.0/15"), "benchmarking"),
    (_V4("192.88.99.0/24"), "6to4 relay anycast (deprecated)"),
    (_V4("224.0.0.0/4"), "multicast"),
    (_V4("255.255.255.255/32"), "broadcast"),
    (_V4("240.0.0.0/4"), "reserved"),
)

_NAT64 = _V6("64:ff9b::/96")  # well-known prefix: the last 32 bits are the IPv4 target
_V6_RULES: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_V6("::/128"), "unspecified"),
    (_V6("::1/128"), "loopback"),
    (_V6("::ffff:0:0:0/96"), "IPv4-translated (SIIT)"),
    (_V6("64:ff9b:1::/48"), "local-use NAT64"),
    (_V6("100::/64"), "discard-only"),
    (_V6("fe80::/10"), "link-local"),
    (_V6("fec0::/10"), "site-local (deprecated)"),
    (_V6("fc00::/7"), "private"),  # unique local addresses
    (_V6("ff00::/8"), "multicast"),
    (_V6("2001:db8::/32"), "documentation"),
    (_V6("3fff::/20"), "documentation"),
    (_V6("2001::/32"), "Teredo"),
    # Global unicast is 2000::/3; everything else (::/8 with the deprecated
    # IPv4-compatible ::a.b.c.d, 100::/8, 4000::/2, ...) is unassigned or special.
    (_V6("::/96"), "IPv4-compatible (deprecated)"),
)
_GLOBAL_UNICAST = _V6("2000::/3")


def _rule(addr: IPAddress) -> str | None:
    """The first table entry ``addr`` falls in."""
    if isinstance(addr, ipaddress.IPv4Address):
        return next((reason for net, reason in _V4_RULES if addr in net), None)
    return next((reason for net, reason in _V6_RULES if addr in net), None)


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address a translation mechanism would deliver ``addr`` to, if any.

    (IPv4-mapped ``::ffff:a.b.c.d`` is not here: it is unwrapped before the
    allowlist is consulted, since a dual-stack socket connects to the IPv4
    address itself.)
    """
    packed = int(addr)
    if addr in _NAT64:
        return "NAT64", ipaddress.IPv4Address(packed & 0xFFFFFFFF)
    if addr.sixtofour is not None:
        return "6to4", addr.sixtofour
    if addr.teredo is not None:
        return "Teredo", addr.teredo[1]  # the client, already de-obfuscated
    if packed >> 32 == 0 and packed > 1:  # ::a.b.c.d (:: and ::1 are ruled on by the table)
        return "IPv4-compatible", ipaddress.IPv4Address(packed)
    if packed >> 32 == 0xFFFF0000:  # ::ffff:0:a.b.c.d
        return "IPv4-translated", ipaddress.IPv4Address(packed & 0xFFFFFFFF)
    return None


def _refusal(addr: IPAddress) -> str | None:
    """Why ``addr`` is not a public destination, or None if it is (allowlist not consulted)."""
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(addr)
        if embedded is not None:
            label, inner = embedded
            if (reason := _refusal(inner)) is not None:
                return f"{label} of {inner}: {reason}"
            if label == "NAT64":
                # The gateway delivers to a public IPv4 host. Refusing these would
                # break every IPv4-only site on an IPv6-only network with DNS64.
                return None
    if (reason := _rule(addr)) is not None:
        return reason
    if isinstance(addr, ipaddress.IPv6Address) and addr not in _GLOBAL_UNICAST:
        return "reserved"
    if addr.is_multicast:
        return "multicast"
    if addr.is_reserved:
        return "reserved"
    if not addr.is_global:  # the catch-all for anything the tables above forgot
        return "not global"
    return None


def _parse_ip(ip: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(ip)  # accepts an IPv6 zone ("fe80::1%eth0")
    except ValueError:
        return None


@dataclass(frozen=True)
class AddressPolicy:
    """Which destinations the crawler may connect to.

    ``allow``: CIDR ranges permitted even though they are not public (tests
    allow ``127.0.0.0/8``). ``ports``: the ports URLs may name; empty means any.
    """

    allow: tuple[str, ...] = ()
    ports: tuple[int, ...] = (80, 443)
    # Parsed once, here, so a typo in the allowlist fails at startup rather
    # than at the first connection.
    _networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Settings may hand in lists; keep the dataclass hashable.
        object.__setattr__(self, "allow", tuple(self.allow))
        object.__setattr__(self, "ports", tuple(self.ports))
        networks = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in self.allow)
        object.__setattr__(self, "_networks", networks)
        for port in self.ports:
            if not 0 < port < 65536:
                raise ValueError(f"port out of range: {port}")

    def allows(self, addr: IPAddress) -> bool:
        # Compare versions explicitly: older ``ipaddress`` answers ``in`` across
        # versions by comparing integers, so 0.0.0.1 would be "in" ::/96.
        return any(addr.version == net.version and addr in net for net in self._networks)

    def check(self, ip: str) -> str | None:
        """None if connecting to ``ip`` is allowed, else a short reason."""
        addr = _parse_ip(ip)
        if addr is None:
            return "not an IP address"
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            # ::ffff:a.b.c.d on a dual-stack socket *is* a.b.c.d: judge (and
            # allowlist) the IPv4 address. Other embeddings (NAT64, 6to4, ...)
            # go through a translator, so an IPv4 allowlist entry does not
            # extend to them; only an IPv6 entry covering the outer address does.
            addr = addr.ipv4_mapped
        if self.allows(addr):
            return None
        return _refusal(addr)

    def check_port(self, port: int) -> str | None:
        if not self.ports or port in self.ports:
            return None
        return f"port {port} not allowed"


_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_OCT_DIGITS = frozenset("01234567")
_DEC_DIGITS = frozenset("0123456789")


def _numeric_part(part: str) -> int | None:
    """One dot-separated part as inet_aton reads it: 0x hex, leading-0 octal, else decimal."""
    if part[:2] in ("0x", "0X"):
        digits = part[2:]
        if digits == "":
            # WHATWG reads a bare "0x" as 0 (glibc refuses it). Reading more
            # hosts as numbers only means more get checked, never fewer.
            return 0
        return int(digits, 16) if set(digits) <= _HEX_DIGITS else None
    if len(part) > 1 and part[0] == "0":
        return int(part, 8) if set(part) <= _OCT_DIGITS else None
    # Explicit ASCII sets: str.isdigit() also accepts other scripts' digits.
    # More than 10 decimal digits is out of range anyway, and int() refuses
    # very long decimal strings (hex and octal have no such limit).
    return int(part) if len(part) <= 10 and set(part) <= _DEC_DIGITS else None


def parse_numeric_host(host: str) -> str | None:
    """The dotted IPv4 address a numeric host means to inet_aton and browsers, else None.

    Accepts 1 to 4 parts, each decimal, 0x-hex or 0-octal, the last filling the
    remaining bytes ("2130706433", "0x7f000001", "017700000001", "127.1",
    "0x7f.1"), and trailing dots ("127.0.0.1."). A canonical address comes back
    unchanged. Callers check the result before any DNS lookup, because the
    system resolver would quietly turn these into addresses.
    """
    # All trailing dots, not just one: aiohttp squeezes "host.." to "host."
    # before resolving, and over-matching only means more hosts are checked.
    parts = host.rstrip(".").split(".")
    if not 1 <= len(parts) <= 4 or any(part == "" for part in parts):
        return None
    values: list[int] = []
    for part in parts:
        value = _numeric_part(part)
        if value is None:
            return None
        values.append(value)
    *leading, last = values
    if any(v > 0xFF for v in leading) or last >= 1 << (8 * (5 - len(values))):
        return None  # inet_aton refuses these, and browsers call the URL invalid
    number = last
    for index, value in enumerate(leading):
        number |= value << (8 * (3 - index))
    return str(ipaddress.IPv4Address(number))


def _literal_ip(host: str) -> str | None:
    """The address ``host`` names without DNS (IPv6 literal or numeric IPv4), else None."""
    if ":" in host:
        return host if _parse_ip(host) is not None else None
    return parse_numeric_host(host)


def _url_refusal(url: str | URL, policy: AddressPolicy) -> tuple[str, str, str] | None:
    """``(host, address, reason)`` if the URL's literal host or its port is refused."""
    try:
        parsed = url if isinstance(url, URL) else URL(url)
        # yarl is what aiohttp parses with, so host and port here are exactly
        # what aiohttp would connect to (no parser differential).
        host = parsed.raw_host  # what aiohttp resolves or connects to
        port = parsed.port
    except ValueError:
        return (str(url), str(url), "unparseable URL")  # fail closed
    if not host:
        return (str(url), str(url), "no host")
    if port is None:
        return (host, host, "no port for this scheme")
    if (reason := policy.check_port(port)) is not None:
        return (host, host, reason)
    # The IPv6 zone comes percent-encoded in raw_host ("fe80::1%25eth0").
    ip = _literal_ip((parsed.host or host) if ":" in host else host)
    if ip is not None and (reason := policy.check(ip)) is not None:
        return (host, ip, reason)
    return None  # a name: the resolver judges the addresses it resolves to


def check_url_target(url: str | URL, policy: AddressPolicy) -> str | None:
    """None if the URL may be fetched as far as can be told without DNS, else why not.

    Rejects ports outside ``policy.ports`` and literal hosts the policy refuses:
    IPv4, bracketed IPv6 and the numeric IPv4 forms ``parse_numeric_host``
    reads. Names pass; ``GuardedResolver`` judges what they resolve to. Call it
    for the first URL and every redirect hop (``guard_middleware`` does).
    """
    refusal = _url_refusal(url, policy)
    return None if refusal is None else _describe(*refusal)


def _describe(host: str, address: str, reason: str) -> str:
    if address == host:
        return f"{host} refused: {reason}"
    return f"{host} -> {address} refused: {reason}"


class BlockedAddress(OSError):
    """A destination the policy refuses.

    An ``OSError`` because aiohttp only turns resolver ``OSError`` s into
    ``ClientConnectorDNSError`` (anything else escapes the fetch layer's
    ``except (aiohttp.ClientError, OSError)``).
    """

    def __init__(self, host: str, address: str, reason: str) -> None:
        # errno None, strerror the message: ClientConnectorError copies strerror
        # into its own message, so the reason shows in the failure detail.
        super().__init__(None, _describe(host, address, reason))
        self.host = host
        self.address = address
        self.reason = reason

    def __str__(self) -> str:
        return self.strerror or ""

    def __reduce__(self) -> tuple[Any, ...]:
        # OSError pickles from .args, which is (None, message), not our signature.
        return (type(self), (self.host, self.address, self.reason))


def blocked_cause(exc: BaseException) -> BlockedAddress | None:
    """The ``BlockedAddress`` behind an exception aiohttp raised, if any.

    From the resolver: ``ClientConnectorDNSError`` with ``os_error`` and
    ``__cause__`` both the ``BlockedAddress``. From ``guard_middleware``:
    ``ClientOSError`` with ``__cause__`` the ``BlockedAddress``.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, BlockedAddress):
            return current
        seen.add(id(current))
        os_error = getattr(current, "os_error", None)
        if isinstance(os_error, BlockedAddress):
            return os_error
        current = current.__cause__
    return None


class GuardedResolver(AbstractResolver):
    """A resolver that never returns an address ``policy`` refuses.

    Wraps ``resolver`` (by default aiohttp's ``DefaultResolver``, created on
    first use so this can be built outside a running loop). Refused addresses
    are dropped; if none is left, ``BlockedAddress`` is raised. A
    ``TCPConnector`` given a resolver does not close it: close this one
    yourself (it closes the inner resolver only if it made it).
    """

    def __init__(self, policy: AddressPolicy, resolver: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = resolver
        self._owns_inner = resolver is None

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._inner is None:
            self._inner = DefaultResolver()
        results = await self._inner.resolve(host, port, family)
        kept: list[ResolveResult] = []
        refused: list[tuple[str, str]] = []
        for result in results:
            reason = self._policy.check(result["host"])
            if reason is None:
                kept.append(result)
            else:
                refused.append((result["host"], reason))
        if not kept and refused:
            # Dropping rather than failing on a mixed answer is safe: aiohttp
            # connects only to what we return.
            address, reason = refused[0]
            raise BlockedAddress(host, address, reason)
        return kept

    async def close(self) -> None:
        if self._owns_inner and self._inner is not None:
            await self._inner.close()
            self._inner = None


def guard_middleware(policy: AddressPolicy) -> ClientMiddlewareType:
    """A client middleware running ``check_url_target`` on every request aiohttp sends.

    aiohttp calls middlewares once per hop, redirects included, with the URL it
    is about to connect to, so literal-IP redirects are caught before any
    connection is made. Raises ``BlockedAddress``, which aiohttp re-raises as
    ``ClientOSError`` caused by it.
    """

    async def middleware(req: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        refusal = _url_refusal(req.url, policy)
        if refusal is not None:
            raise BlockedAddress(*refusal)
        return await handler(req)

    return middleware
