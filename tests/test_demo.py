"""`make demo` stays true: the demo module crawls its own local site to the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_demo_crawls_its_samples(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "crawler.demo"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "downloads/manifest.jsonl").open()]
    statuses = {r["status"] for r in records}
    assert statuses == {"ok", "failed", "skipped"}
    assert sum(r["status"] == "ok" for r in records) >= 10
    assert sum(r["duplicate_of"] is not None for r in records) == 1
    assert len(list((tmp_path / "downloads/thumbs/256").rglob("*.jpg"))) >= 10
    assert "manifest:" in result.stderr
