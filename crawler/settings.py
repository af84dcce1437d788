"""Settings: frozen dataclasses, layered defaults < config file < environment < CLI flags.

One ``Settings`` value is built at start-up and passed explicitly; nothing
reads configuration from globals. Every key has a default here and is
documented in ``config/crawler.toml`` (a test keeps the two equal). Unknown
sections or keys are an error, not a silent no-op: a typo in a config file
must not quietly crawl with the default.

Environment variables are ``CRAWLER_<SECTION>_<KEY>``, e.g.
``CRAWLER_FETCH_MAX_BYTES=1000000``; lists are comma-separated.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from crawler.hosts import HostPolicy
from crawler.models import ThumbSpec
from crawler.probe import DEFAULT_FORMATS

ENV_PREFIX = "CRAWLER_"
StartMethod = Literal["fork", "spawn", "forkserver"]


class SettingsError(ValueError):
    """A bad configuration value: reported as a one-line usage error (exit 2)."""


@dataclass(frozen=True)
class CrawlSettings:
    out: str = "downloads"
    concurrency: int = 64
    max_pending: int = 10_000
    progress: bool = True
    grace_period: float = 20.0

    def __post_init__(self) -> None:
        _at_least(self, "grace_period", 0)
        _at_least(self, "concurrency", 1)
        _at_least(self, "max_pending", 1)


@dataclass(frozen=True)
class FetchSettings:
    connect_timeout: float = 10.0
    read_timeout: float = 20.0
    total_timeout: float = 60.0
    min_rate: int = 1024
    min_rate_grace: float = 10.0
    max_bytes: int = 50 * 1024 * 1024
    max_attempts: int = 3
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    retry_after_max: float = 120.0
    max_redirects: int = 5
    user_agent: str = "image-crawler/0.1 (+https://github.com/image-crawler/image-crawler)"
    headers: dict[str, str] = field(default_factory=dict)
    cookies: bool = False
    ttl_dns_cache: int = 300

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "read_timeout", "total_timeout"):
            _positive(self, name)
        for name in (
            "min_rate",
            "min_rate_grace",
            "backoff_base",
            "backoff_max",
            "retry_after_max",
        ):
            _at_least(self, name, 0)
        _at_least(self, "max_bytes", 1)
        _at_least(self, "max_attempts", 1)
        _at_least(self, "max_redirects", 0)


@dataclass(frozen=True)
class HostSettings:
    per_host: int = 8
    per_host_rate: float = 0.0
    adaptive: bool = True
    breaker_threshold: int = 10
    breaker_cooldown: float = 60.0
    respect_robots: bool = True
    robots_timeout: float = 10.0
    respect_opt_out: bool = True
    opt_out_tags: tuple[str, ...] = ("noai", "noimageai", "noindex")

    def __post_init__(self) -> None:
        _at_least(self, "per_host", 1)
        _at_least(self, "per_host_rate", 0)
        _at_least(self, "breaker_threshold", 1)
        _at_least(self, "breaker_cooldown", 0)
        _positive(self, "robots_timeout")

    def policy(self) -> HostPolicy:
        return HostPolicy(
            per_host=self.per_host,
            rate=self.per_host_rate,
            adaptive=self.adaptive,
            breaker_threshold=self.breaker_threshold,
            breaker_cooldown=self.breaker_cooldown,
        )


@dataclass(frozen=True)
class ImageSettings:
    thumb_sizes: tuple[int, ...] = (256,)
    thumb_format: Literal["jpeg", "webp"] = "jpeg"
    thumb_quality: int = 85
    background: tuple[int, ...] = (255, 255, 255)
    max_pixels: int = 100_000_000
    min_width: int = 0
    min_height: int = 0
    max_aspect_ratio: float = 0.0
    formats: tuple[str, ...] = DEFAULT_FORMATS

    def __post_init__(self) -> None:
        if not self.thumb_sizes or any(not 8 <= s <= 4096 for s in self.thumb_sizes):
            raise SettingsError("image.thumb_sizes: give one or more sizes between 8 and 4096")
        if len(set(self.thumb_sizes)) != len(self.thumb_sizes):
            raise SettingsError("image.thumb_sizes: sizes must be distinct")
        if not 1 <= self.thumb_quality <= 100:
            raise SettingsError("image.thumb_quality: must be between 1 and 100")
        if len(self.background) != 3 or any(not 0 <= c <= 255 for c in self.background):
            raise SettingsError("image.background: must be three integers 0-255 (R, G, B)")
        _at_least(self, "max_pixels", 1)
        for name in ("min_width", "min_height", "max_aspect_ratio"):
            _at_least(self, name, 0)
        if 0 < self.max_aspect_ratio < 1:
            raise SettingsError("image.max_aspect_ratio: must be 0 (no limit) or at least 1")
        unknown = set(self.formats) - set(DEFAULT_FORMATS)
        if not self.formats or unknown:
            raise SettingsError(
                f"image.formats: choose from {', '.join(DEFAULT_FORMATS)}"
                + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else "")
            )

    def thumb_spec(self) -> ThumbSpec:
        r, g, b = self.background
        return ThumbSpec(
            sizes=self.thumb_sizes,
            format=self.thumb_format,
            quality=self.thumb_quality,
            background=(r, g, b),
        )


@dataclass(frozen=True)
class PoolSettings:
    workers: int = 0
    start_method: StartMethod = "forkserver"
    max_tasks_per_child: int = 1000

    def __post_init__(self) -> None:
        _at_least(self, "workers", 0)
        _at_least(self, "max_tasks_per_child", 1)

    @property
    def size(self) -> int:
        """``workers``, where 0 means one per core this process may run on."""
        return self.workers or len(os.sched_getaffinity(0)) or 1


@dataclass(frozen=True)
class ServiceSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    token: str = ""
    max_urls_per_job: int = 100_000
    max_body_bytes: int = 16 * 1024 * 1024
    max_queued_jobs: int = 1000
    max_running_jobs: int = 4
    min_free_bytes: int = 1024 * 1024 * 1024
    ssrf_protection: bool = True
    allow_ranges: tuple[str, ...] = ()
    allowed_ports: tuple[int, ...] = (80, 443)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise SettingsError("service.port: must be between 1 and 65535")
        for name in ("max_urls_per_job", "max_body_bytes", "max_queued_jobs", "max_running_jobs"):
            _at_least(self, name, 1)
        _at_least(self, "min_free_bytes", 0)


@dataclass(frozen=True)
class Settings:
    crawl: CrawlSettings = field(default_factory=CrawlSettings)
    fetch: FetchSettings = field(default_factory=FetchSettings)
    hosts: HostSettings = field(default_factory=HostSettings)
    image: ImageSettings = field(default_factory=ImageSettings)
    pool: PoolSettings = field(default_factory=PoolSettings)
    service: ServiceSettings = field(default_factory=ServiceSettings)


Overrides = Mapping[str, Mapping[str, Any]]


def load_settings(
    config: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Overrides | None = None,
) -> Settings:
    """Build ``Settings`` from the layers, later ones winning. Raises ``SettingsError``."""
    layers: list[tuple[str, Overrides]] = []
    if config is not None:
        layers.append((str(config), _read_toml(config)))
    if env is not None:
        layers.append(("environment", _from_env(env)))
    if overrides:
        layers.append(("command line", overrides))

    sections: dict[str, dict[str, Any]] = {}
    for origin, layer in layers:
        for section, values in layer.items():
            cls = _section_class(section, origin)
            if not isinstance(values, Mapping):
                raise SettingsError(f"{origin}: [{section}] must be a table")
            hints = typing.get_type_hints(cls)
            for key, raw in values.items():
                if key not in hints:
                    raise SettingsError(f"{origin}: unknown key {section}.{key}")
                sections.setdefault(section, {})[key] = _coerce(
                    raw, hints[key], f"{origin}: {section}.{key}"
                )
    try:
        return Settings(
            **{name: _section_class(name, "")(**vals) for name, vals in sections.items()}
        )
    except TypeError as exc:  # pragma: no cover - _coerce already checked names and types
        raise SettingsError(str(exc)) from exc


def to_toml_dict(settings: Settings) -> dict[str, dict[str, Any]]:
    return {
        f.name: dataclasses.asdict(getattr(settings, f.name)) for f in dataclasses.fields(settings)
    }


def _section_class(section: str, origin: str) -> type[Any]:
    hints = typing.get_type_hints(Settings)
    if section not in hints:
        raise SettingsError(f"{origin}: unknown section [{section}]")
    cls: type[Any] = hints[section]
    return cls


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise SettingsError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config {path} is not valid TOML: {exc}") from exc


def _from_env(env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    sections = typing.get_type_hints(Settings)
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("_")
        if section in sections and key:
            out.setdefault(section, {})[key] = value
    return out


def _coerce(raw: Any, hint: Any, where: str) -> Any:
    """Check (and, for strings from the environment, parse) one value against its type."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if raw not in choices:
            raise SettingsError(f"{where}: must be one of {', '.join(map(str, choices))}")
        return raw
    if origin is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        if isinstance(raw, str):
            raw = [part.strip() for part in raw.split(",") if part.strip()]
        if not isinstance(raw, list | tuple):
            raise SettingsError(f"{where}: must be a list")
        return tuple(_coerce(v, item, where) for v in raw)
    if origin is dict:
        if isinstance(raw, str):  # from the environment: "Name=value,Other=value"
            pairs = [part.partition("=") for part in raw.split(",") if part.strip()]
            raw = {k.strip(): v.strip() for k, _, v in pairs}
        if not isinstance(raw, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
        ):
            raise SettingsError(f"{where}: must be a table of strings")
        return dict(raw)
    if origin in (typing.Union, types.UnionType):  # pragma: no cover - no optional keys yet
        raise SettingsError(f"{where}: unsupported type")
    if hint is bool:
        if isinstance(raw, str) and raw.lower() in {
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        }:
            return raw.lower() in {"1", "true", "yes", "on"}
        if not isinstance(raw, bool):
            raise SettingsError(f"{where}: must be true or false")
        return raw
    if hint in (int, float):
        if isinstance(raw, str):
            try:
                raw = hint(raw.replace("_", ""))
            except ValueError:
                raise SettingsError(f"{where}: must be a number, got {raw!r}") from None
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise SettingsError(f"{where}: must be a number")
        if hint is int and not float(raw).is_integer():
            raise SettingsError(f"{where}: must be a whole number")
        return hint(raw)
    if hint is str:
        if not isinstance(raw, str):
            raise SettingsError(f"{where}: must be a string")
        return raw
    raise SettingsError(f"{where}: unsupported type {hint}")  # pragma: no cover


def _at_least(obj: object, name: str, low: float) -> None:
    if getattr(obj, name) < low:
        section = type(obj).__name__.removesuffix("Settings").lower()
        raise SettingsError(f"{section}.{name}: must be at least {low}")


def _positive(obj: object, name: str) -> None:
    if getattr(obj, name) <= 0:
        section = type(obj).__name__.removesuffix("Settings").lower()
        raise SettingsError(f"{section}.{name}: must be greater than 0")
