from __future__ import annotations

import os
from pathlib import Path

import pytest

import crawler.store
from crawler.models import ImageResult
from crawler.store import TMP_DIR, TMP_PREFIX, Store, image_path, thumb_path

SHA = "ab" + "cd" + "0" * 60
RESULT = ImageResult(SHA, "f" * 16, 10, 20, "PNG", "png", ((64, b"thumb64"), (32, b"thumb32")))


def test_layout() -> None:
    assert image_path(SHA, "png") == f"images/ab/cd/{SHA}.png"
    assert thumb_path(256, SHA, "jpg") == f"thumbs/256/ab/cd/{SHA}.jpg"


@pytest.fixture(params=["unnamed", "named"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    """A store on each write path: O_TMPFILE + link, and the fallback (temp file + rename)."""
    if request.param == "named":

        def no_tmpfile(path: Path, data: bytes) -> None:
            raise crawler.store._NoUnnamed

        monkeypatch.setattr(crawler.store, "_put_unnamed", no_tmpfile)
    return Store(tmp_path, "jpg")


async def test_save_writes_everything_atomically(store: Store) -> None:
    original, thumbs = await store.save(RESULT, b"original")
    assert (store.root / original).read_bytes() == b"original"
    assert thumbs == {"64": thumb_path(64, SHA, "jpg"), "32": thumb_path(32, SHA, "jpg")}
    assert (store.root / thumbs["32"]).read_bytes() == b"thumb32"
    assert (store.root / original).stat().st_mode & 0o777 == 0o644 & ~_umask()
    assert not list(store.root.rglob(f"{TMP_PREFIX}*"))


def test_unnamed_files_are_used_where_the_filesystem_has_them(tmp_path: Path) -> None:
    # Linux on ext4/xfs/tmpfs: the fast path is the one taken, and it needs no .tmp/.
    store = Store(tmp_path, "jpg")
    store.write_all([(image_path(SHA, "png"), b"original")])
    assert store._unnamed
    assert (tmp_path / image_path(SHA, "png")).read_bytes() == b"original"
    assert not (tmp_path / TMP_DIR).exists()


def test_a_refused_link_falls_back_to_named_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", refused)
    store = Store(tmp_path, "jpg")
    store.write_all([(image_path(SHA, "png"), b"original")])
    assert not store._unnamed
    assert (tmp_path / image_path(SHA, "png")).read_bytes() == b"original"
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [tmp_path / image_path(SHA, "png")]


async def test_existing_content_is_not_rewritten(store: Store) -> None:
    original, _ = await store.save(RESULT, b"original")
    (store.root / original).chmod(0o444)
    mtime = (store.root / original).stat().st_mtime_ns
    await Store(store.root, "jpg").save(RESULT, b"original")
    assert (store.root / original).stat().st_mtime_ns == mtime


async def test_failed_write_leaves_no_file(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        await store.save(RESULT, b"original")
    assert not [p for p in store.root.rglob("*") if p.is_file()]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


async def test_clean_removes_leftovers(tmp_path: Path) -> None:
    store = Store(tmp_path, "jpg")
    (tmp_path / TMP_DIR).mkdir()
    (tmp_path / TMP_DIR / ".tmp-x-half.jpg").write_bytes(b"half")
    await store.clean()
    assert list((tmp_path / TMP_DIR).iterdir()) == []
