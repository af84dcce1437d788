"""Content-addressed storage with atomic writes.

Originals live at ``images/ab/cd/<sha256>.<ext>``, thumbnails at
``thumbs/<size>/ab/cd/<sha256>.<ext>``. A file is written unnamed
(``O_TMPFILE``) in its directory, fsynced, and only then linked to its name,
so a reader (or a crawl resumed after a crash) never sees half an image: the
name exists only once the whole content does, and a crash leaves nothing
behind. Where the filesystem has no ``O_TMPFILE``, the file is written to
``.tmp/`` (same filesystem, one directory, cleared at start-up) and renamed
into place. Since the name is the content's hash, a path that already exists
needs no second write.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
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
        # Linux: O_TMPFILE, named through /proc/self/fd (kept by the unit's ProcSubset=pid).
        self._unnamed = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")

    def paths(self, result: ImageResult) -> tuple[str, dict[str, str]]:
        """Relative paths of the original and of each thumbnail, keyed by size."""
        thumbs = {
            str(size): thumb_path(size, result.sha256, self.thumb_ext)
            for size, _ in result.thumbnails
        }
        return image_path(result.sha256, result.ext), thumbs

    async def clean(self) -> None:
        """Remove temporary files a crashed run left behind (only the fallback path makes them)."""
        tmp = self.root / TMP_DIR
        try:
            names = await aiofiles.os.listdir(tmp)
        except FileNotFoundError:
            return
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                await aiofiles.os.remove(tmp / name)

    async def save(self, result: ImageResult, body: bytes) -> tuple[str, dict[str, str]]:
        """Write the original and its thumbnails (those not already there). Raises OSError.

        All of an image's files in one executor call: a thread hop per file
        operation (open, write, fsync, close, rename: a dozen per image) cost
        the event loop's process more CPU than the writes themselves.
        """
        return await asyncio.to_thread(self.write, result, body)

    def write(self, result: ImageResult, body: bytes) -> tuple[str, dict[str, str]]:
        """``save``, blocking: for a thread (as ``save`` does) or a worker process."""
        original, thumbs = self.paths(result)
        files = [(original, body)] + [(thumbs[str(size)], data) for size, data in result.thumbnails]
        self.write_all(files)
        return original, thumbs

    def write_all(self, files: list[tuple[str, bytes]]) -> None:
        for relative, data in files:
            self._put(relative, data)

    def _put(self, relative: str, data: bytes) -> None:
        path = self.root / relative
        if path.exists():
            return
        if path.parent not in self._dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(path.parent)
        if self._unnamed:
            try:
                _put_unnamed(path, data)
                return
            except _NoUnnamed:
                self._unnamed = False  # this filesystem can't: named temp files from now on
        self._put_named(path, data)

    def _put_named(self, path: Path, data: bytes) -> None:
        tmp_dir = self.root / TMP_DIR
        if tmp_dir not in self._dirs:
            tmp_dir.mkdir(parents=True, exist_ok=True)
            self._dirs.add(tmp_dir)
        tmp = tmp_dir / f"{TMP_PREFIX}{secrets.token_hex(6)}-{path.name}"
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


class _NoUnnamed(Exception):
    """The filesystem (or kernel) has no O_TMPFILE."""


def _put_unnamed(path: Path, data: bytes) -> None:
    """Write ``data`` to an unnamed file in ``path``'s directory, fsync, then give it the name.

    Same guarantees as temp file + rename (the name appears only with the whole
    content, on disk), one directory operation fewer, and nothing to clean up
    after a crash: a file that never got a name is freed by the filesystem.
    The inode is also allocated near its directory instead of in one shared
    ``.tmp/``: measured in the pool with storage, 260-279 vs 237-259 images/s
    (median of 5 and of 6 interleaved runs).
    """
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fd = os.open(".", os.O_TMPFILE | os.O_WRONLY, 0o644, dir_fd=directory)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise _NoUnnamed from exc
            raise
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            try:
                os.link(f"/proc/self/fd/{fd}", path.name, dst_dir_fd=directory)
            except FileExistsError:
                pass  # the same content, stored meanwhile
            except OSError as exc:
                # A sandbox without /proc links (EXDEV, EPERM, ENOENT): the unnamed
                # file is freed on close and the caller writes a named one instead.
                if exc.errno in (errno.EXDEV, errno.EPERM, errno.ENOENT):
                    raise _NoUnnamed from exc
                raise
        finally:
            os.close(fd)
    finally:
        os.close(directory)
