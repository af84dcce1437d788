from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from crawler.settings import Settings, SettingsError, load_settings, to_toml_dict

CONFIG = Path(__file__).parent.parent / "config" / "crawler.toml"


def test_shipped_config_documents_every_default() -> None:
    shipped = tomllib.loads(CONFIG.read_text())
    defaults = to_toml_dict(Settings())
    as_lists = {
        s: {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        for s, d in defaults.items()
    }
    assert shipped == as_lists
    assert load_settings(CONFIG) == Settings()


def test_layers_later_wins(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        "[crawl]\nconcurrency = 10\n[hosts]\nper_host = 3\n[image]\nthumb_sizes = [64, 128]\n"
    )
    env = {"CRAWLER_CRAWL_CONCURRENCY": "20", "CRAWLER_IMAGE_THUMB_SIZES": "32,48", "HOME": "/x"}
    s = load_settings(cfg, env, {"crawl": {"concurrency": 30}})
    assert s.crawl.concurrency == 30
    assert s.hosts.per_host == 3
    assert s.image.thumb_sizes == (32, 48)


def test_env_parses_types() -> None:
    env = {
        "CRAWLER_CRAWL_PROGRESS": "off",
        "CRAWLER_FETCH_MAX_BYTES": "1_000",
        "CRAWLER_FETCH_TOTAL_TIMEOUT": "2.5",
        "CRAWLER_POOL_START_METHOD": "spawn",
    }
    s = load_settings(env=env)
    assert (s.crawl.progress, s.fetch.max_bytes, s.fetch.total_timeout) == (False, 1000, 2.5)
    assert s.pool.start_method == "spawn"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[crawl]\nconcurency = 3\n", "unknown key crawl.concurency"),
        ("[crawler]\nout = 'x'\n", r"unknown section \[crawler\]"),
        ("[crawl]\nconcurrency = 'many'\n", "crawl.concurrency: must be a number"),
        ("[crawl]\nconcurrency = 0\n", "crawl.concurrency: must be at least 1"),
        ("[crawl]\nconcurrency = 1.5\n", "whole number"),
        ("[crawl]\nprogress = 1\n", "true or false"),
        ("[pool]\nstart_method = 'thread'\n", "must be one of fork, spawn, forkserver"),
        ("[image]\nthumb_sizes = [0]\n", "thumb_sizes"),
        ("[image]\nformats = ['JPEG', 'PSD']\n", "unknown: PSD"),
        ("[image]\nbackground = [1, 2]\n", "background"),
        ("crawl = 3\n", "must be a table"),
        ("[crawl\n", "not valid TOML"),
    ],
)
def test_bad_config_is_rejected_with_a_clear_message(
    tmp_path: Path, toml: str, message: str
) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    with pytest.raises(SettingsError, match=message):
        load_settings(cfg)


def test_bad_env_value_is_rejected() -> None:
    with pytest.raises(SettingsError, match=r"environment: fetch\.max_bytes"):
        load_settings(env={"CRAWLER_FETCH_MAX_BYTES": "lots"})
    with pytest.raises(SettingsError, match=r"unknown key fetch\.nope"):
        load_settings(env={"CRAWLER_FETCH_NOPE": "1"})


def test_missing_config_file() -> None:
    with pytest.raises(SettingsError, match="cannot read config"):
        load_settings(Path("/nonexistent/crawler.toml"))


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().crawl.concurrency = 3  # type: ignore[misc]


def test_workers_zero_means_one_per_core() -> None:
    assert Settings().pool.size >= 1
    assert load_settings(overrides={"pool": {"workers": 3}}).pool.size == 3
