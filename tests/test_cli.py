"""The command line, run as a user runs it: a subprocess against a local server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crawler import samples
from tests.conftest import by_url, read_manifest
from tests.server import LocalServer

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


async def run_cli(
    *args: str, stdin: bytes | None = None, cwd: Path | None = None
) -> tuple[int, str, str]:
    """Run ``python -m crawler`` without blocking the loop that serves it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "crawler", *args,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=cwd,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def run_sync(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crawler", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
        check=False,
    )


def test_help_lists_the_options() -> None:
    result = run_sync("--help")
    assert result.returncode == 0
    for flag in (
        "--out",
        "--config",
        "--concurrency",
        "--per-host",
        "--workers",
        "--thumb-size",
        "--quiet",
    ):
        assert flag in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/nonexistent/urls.txt"], "cannot read /nonexistent/urls.txt: No such file or directory"),
        (["urls.txt", "--concurrency", "lots"], "argument --concurrency: invalid int value"),
        (["urls.txt", "--bogus"], "unrecognized arguments: --bogus"),
        ([], "the following arguments are required: URLS"),
        (["urls.txt", "--concurrency", "0"], "crawl.concurrency: must be at least 1"),
        (["urls.txt", "--thumb-size", "big"], "image.thumb_sizes: must be a number"),
        (["urls.txt", "--config", "/nonexistent.toml"], "cannot read config /nonexistent.toml"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/x.jpg\n")
    args = [str(tmp_path / a) if a == "urls.txt" else a for a in args]
    result = run_sync(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("crawler: error:")


def test_bad_config_key_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[fetch]\nmax_byte = 3\n")
    (tmp_path / "urls.txt").write_text("")
    result = run_sync(str(tmp_path / "urls.txt"), "--config", str(cfg))
    assert result.returncode == 2
    assert result.stderr.strip() == f"crawler: error: {cfg}: unknown key fetch.max_byte"


async def test_stdin_crawl_exits_0_with_failures(server: LocalServer, tmp_path: Path) -> None:
    ok = server.add("a.gif", samples.gif_palette(), "image/gif")
    missing = server.url("/img/none.jpg")
    out = tmp_path / "out"
    stats = tmp_path / "stats.json"
    code, _, stderr = await run_cli(
        "-", "--out", str(out), "--workers", "1", "--stats-json", str(stats),
        stdin=f"{ok}\n{missing}\n".encode(),
    )  # fmt: skip
    assert code == 0, stderr
    got = by_url(read_manifest(out))
    assert got[ok]["status"] == "ok" and got[missing]["error"] == "http_404"
    assert "crawled 2 URLs" in stderr and "http_404 1" in stderr
    assert "\r" not in stderr  # no progress line when stderr is not a terminal
    summary = json.loads(stats.read_text())
    assert summary["by_status"] == {"ok": 1, "failed": 1} and summary["total"] == 2
    assert set(summary["loop_lag_ms"]) == {"p50", "p99", "max"}


async def test_csv_and_jsonl_meta_carried_through(server: LocalServer, tmp_path: Path) -> None:
    a = server.add("a.png", samples.png_alpha(), "image/png")
    b = server.add("b.gif", samples.gif_palette(), "image/gif")
    csv_file = tmp_path / "in.csv"
    csv_file.write_text(f"url,caption,license\n{a},a red box,cc-by\n")
    jsonl_file = tmp_path / "in.jsonl"
    jsonl_file.write_text(json.dumps({"url": b, "caption": "flag", "score": 0.5}) + "\n{broken\n")

    code, _, err = await run_cli(
        str(csv_file), "--out", str(tmp_path / "o1"), "--quiet", "--workers", "1"
    )
    assert code == 0, err
    assert err == ""
    assert read_manifest(tmp_path / "o1")[0]["meta"] == {"caption": "a red box", "license": "cc-by"}

    code, _, err = await run_cli(
        str(jsonl_file), "--out", str(tmp_path / "o2"), "--quiet", "--workers", "1"
    )
    assert code == 0, err
    records = read_manifest(tmp_path / "o2")
    assert len(records) == 2
    good = by_url(records)[b]
    (broken,) = [r for r in records if r is not good]
    assert good["meta"] == {"caption": "flag", "score": 0.5}
    assert (broken["status"], broken["error"]) == ("failed", "invalid_url")
    assert "line 2: not valid JSON" in broken["detail"]


def test_the_crawling_process_does_not_load_the_image_libraries() -> None:
    # Pillow and numpy belong to the pool's workers (preloaded by the forkserver);
    # importing them in the crawler's own process only delays every crawl's start.
    code = (
        "import sys, crawler.__main__, crawler.pipeline;"
        "print(sorted(m for m in ('PIL', 'numpy', 'crawler.imaging', 'crawler.service.server')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_new_run_does_not_load_numpy_before_it_has_hashes_to_group(tmp_path: Path) -> None:
    # The ledger writes the manifest of a new output directory at once; with
    # nothing to group that must not import numpy (~0.1 s of every run's start).
    code = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from crawler.state import Ledger\n"
        "async def main():\n"
        f"    async with Ledger(Path({str(tmp_path)!r})):\n"
        "        print('numpy' in sys.modules)\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert (tmp_path / "manifest.jsonl").exists()
