"""Content-addressed storage with atomic writes.

Originals live at ``images/ab/cd/<sha256>.<ext>``, thumbnails at
``thumbs/<size>/ab/cd/<sha256>.<ext>``. A file is written to ``.tmp/``,
fsynced, and renamed into place, so a reader (or a crawl resumed after a
crash) never sees half an image: the name exists only once the whole content
does. ``.tmp/`` is on the same filesystem (the rename is atomic) and one
directory, so what a crash leaves behind is cleared at start-up without
walking the tree. Since the name is the content's hash, a path that already
exists needs no second write.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from pathlib import Path

import aiofiles
import aiofiles.os

from crawler.models import ImageResult

TMP_PREFIX = ".tmp-"
TMP_DIR = ".tmp"


def image_path(sha256: str, ext: str) -> str:
    return f"images/{sha256[:2]}/{sha256[2:4]}/{sha256}.{ext}"


def thumb_path(size: int, sha256: str, ext: str) -> str:
    return f"thumbs/{size}/{sha256[:2]}/{sha256[2:4]}/{sha256}.{ext}"


class Store:
    def __init__(self, root: Path, thumb_ext: str) -> None:
        self.root = root
        self.thumb_ext = thumb_ext
        self._dirs: set[Path] = set()

    def paths(self, result: ImageResult) -> tuple[str, dict[str, str]]:
        """Relative paths of the original and of each thumbnail, keyed by size."""
        thumbs = {
            str(size): thumb_path(size, result.sha256, self.thumb_ext)
            for size, _ in result.thumbnails
        }
        return image_path(result.sha256, result.ext), thumbs

    async def clean(self) -> None:
        """Remove temporary files a crashed run left behind."""
        tmp = self.root / TMP_DIR
        await aiofiles.os.makedirs(tmp, exist_ok=True)
        for name in await aiofiles.os.listdir(tmp):
            with contextlib.suppress(FileNotFoundError):
                await aiofiles.os.remove(tmp / name)

    async def save(self, result: ImageResult, body: bytes) -> tuple[str, dict[str, str]]:
        """Write the original and its thumbnails (those not already there). Raises OSError.

        All of an image's files in one executor call: a thread hop per file
        operation (open, write, fsync, close, rename: a dozen per image) cost
        the event loop's process more CPU than the writes themselves.
        """
        original, thumbs = self.paths(result)
        files = [(original, body)] + [(thumbs[str(size)], data) for size, data in result.thumbnails]
        await asyncio.to_thread(self.write_all, files)
        return original, thumbs

    def write_all(self, files: list[tuple[str, bytes]]) -> None:
        """Blocking: for a thread (as ``save`` does) or a worker process."""
        for relative, data in files:
            self._put(relative, data)

    def _put(self, relative: str, data: bytes) -> None:
        path = self.root / relative
        if path.exists():
            return
        for directory in (path.parent, self.root / TMP_DIR):
            if directory not in self._dirs:
                directory.mkdir(parents=True, exist_ok=True)
                self._dirs.add(directory)
        tmp = self.root / TMP_DIR / f"{TMP_PREFIX}{secrets.token_hex(6)}-{path.name}"
        try:
            with tmp.open("wb") as fh:
                fh.write(data)
                fh.flush()
                # Data on disk before the name: after a power cut the name never
                # points at an empty file (the ledger commit comes later still).
                os.fsync(fh.fileno())
            tmp.replace(path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
