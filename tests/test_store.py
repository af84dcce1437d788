from __future__ import annotations

from pathlib import Path

import pytest

from crawler.models import ImageResult
from crawler.store import TMP_DIR, TMP_PREFIX, Store, image_path, thumb_path

SHA = "ab" + "cd" + "0" * 60
RESULT = ImageResult(SHA, "f" * 16, 10, 20, "PNG", "png", ((64, b"thumb64"), (32, b"thumb32")))


def test_layout() -> None:
    assert image_path(SHA, "png") == f"images/ab/cd/{SHA}.png"
    assert thumb_path(256, SHA, "jpg") == f"thumbs/256/ab/cd/{SHA}.jpg"


async def test_save_writes_everything_atomically(tmp_path: Path) -> None:
    store = Store(tmp_path, "jpg")
    original, thumbs = await store.save(RESULT, b"original")
    assert (tmp_path / original).read_bytes() == b"original"
    assert thumbs == {"64": thumb_path(64, SHA, "jpg"), "32": thumb_path(32, SHA, "jpg")}
    assert (tmp_path / thumbs["32"]).read_bytes() == b"thumb32"
    assert not list(tmp_path.rglob(f"{TMP_PREFIX}*"))


async def test_existing_content_is_not_rewritten(tmp_path: Path) -> None:
    store = Store(tmp_path, "jpg")
    original, _ = await store.save(RESULT, b"original")
    (tmp_path / original).chmod(0o444)
    mtime = (tmp_path / original).stat().st_mtime_ns
    await Store(tmp_path, "jpg").save(RESULT, b"original")
    assert (tmp_path / original).stat().st_mtime_ns == mtime


async def test_failed_write_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_replace(self: Path, target: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        await Store(tmp_path, "jpg").save(RESULT, b"original")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


async def test_clean_removes_leftovers(tmp_path: Path) -> None:
    store = Store(tmp_path, "jpg")
    (tmp_path / TMP_DIR).mkdir()
    (tmp_path / TMP_DIR / ".tmp-x-half.jpg").write_bytes(b"half")
    await store.clean()
    assert list((tmp_path / TMP_DIR).iterdir()) == []
