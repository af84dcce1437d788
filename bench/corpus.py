"""A deterministic, cached benchmark corpus of photo-like images.

``build(directory, count, seed)`` plans every image from ``(count, seed)``
alone — name, format, size, encoder settings, content seed — renders the plan
on a small process pool, and records it in ``directory/MANIFEST.json``. A
later call with the same ``count``, ``seed`` and ``VERSION`` whose files are
all still there, at the recorded sizes, returns the list without rendering
anything. Bump ``VERSION`` whenever the plan or the rendering changes.

The mix: about 96 % JPEG photos between 640x480 and 2048x1536 (landscape and
portrait, quality 85-92), and about 4 % split between PNG (RGB and RGBA, kept
at most 512x384, 200-450 KB), GIF (single-frame and three-frame animated) and WebP.
Every image has its own content seed, so no two files are byte-identical.

    python -m bench.corpus DIR [--count N] [--seed S] [--workers W]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from crawler import samples

VERSION = 2
MANIFEST = "MANIFEST.json"
DEFAULT_WORKERS = 2
# Share of the corpus that is not JPEG, split as evenly as possible in this order.
OTHER_SHARE = 0.04
OTHER_FORMATS = ("png", "gif", "webp")

# (width, height, weight): the JPEG size mix, mostly 4:3 landscape, a sixth portrait.
JPEG_SIZES: tuple[tuple[int, int, int], ...] = (
    (640, 480, 14),
    (800, 600, 18),
    (1024, 768, 22),
    (1280, 960, 14),
    (1600, 1200, 10),
    (2048, 1536, 6),
    (480, 640, 3),
    (600, 800, 4),
    (768, 1024, 5),
    (960, 1280, 2),
    (1200, 1600, 1),
    (1536, 2048, 1),
)
JPEG_QUALITIES = (85, 86, 87, 88, 89, 90, 91, 92)
PNG_SIZES = ((400, 300), (480, 360), (512, 384), (384, 512))
GIF_SIZES = ((320, 240), (480, 360), (640, 480))
WEBP_SIZES = ((640, 480), (800, 600), (1024, 768), (1280, 960), (768, 1024))
_NAME_RE = re.compile(r"^img-\d{5,}\.(jpg|png|gif|webp)$")


@dataclass(frozen=True)
class Spec:
    """Everything needed to render one file, planned up front from (count, seed)."""

    name: str
    fmt: str  # "jpeg" | "png" | "gif" | "webp"
    width: int
    height: int
    content_seed: int
    quality: int = 0  # JPEG / WebP only
    variant: str = ""  # PNG: "rgb" | "rgba"; GIF: "still" | "animated"


@dataclass(frozen=True)
class Entry:
    name: str
    fmt: str
    width: int
    height: int
    bytes: int
    sha256: str


def plan(count: int, seed: int) -> list[Spec]:
    """The corpus as a list of specs: a pure function of ``count`` and ``seed``."""
    if count < 0:
        raise ValueError("count must be >= 0")
    rng = random.Random(f"bench.corpus:{VERSION}:{seed}")
    n_other = round(count * OTHER_SHARE)
    other_at = sorted(rng.sample(range(count), n_other))
    other_fmt = {idx: OTHER_FORMATS[k % len(OTHER_FORMATS)] for k, idx in enumerate(other_at)}
    sizes = [(w, h) for w, h, _ in JPEG_SIZES]
    weights = [wt for _, _, wt in JPEG_SIZES]
    specs: list[Spec] = []
    for i in range(count):
        content_seed = seed * 1_000_003 + i
        fmt = other_fmt.get(i, "jpeg")
        if fmt == "jpeg":
            w, h = rng.choices(sizes, weights)[0]
            specs.append(
                Spec(f"img-{i:05d}.jpg", fmt, w, h, content_seed, rng.choice(JPEG_QUALITIES))
            )
        elif fmt == "png":
            w, h = rng.choice(PNG_SIZES)
            variant = rng.choice(("rgb", "rgba"))
            specs.append(Spec(f"img-{i:05d}.png", fmt, w, h, content_seed, variant=variant))
        elif fmt == "gif":
            w, h = rng.choice(GIF_SIZES)
            variant = rng.choice(("still", "animated"))
            specs.append(Spec(f"img-{i:05d}.gif", fmt, w, h, content_seed, variant=variant))
        else:
            w, h = rng.choice(WEBP_SIZES)
            q = rng.choice((75, 80, 85))
            specs.append(Spec(f"img-{i:05d}.webp", fmt, w, h, content_seed, q))
    return specs


def _save(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def render(spec: Spec) -> bytes:
    """The encoded bytes of one spec (deterministic for a given Pillow build)."""
    w, h, s = spec.width, spec.height, spec.content_seed
    if spec.fmt == "jpeg":
        return samples.photo_jpeg(w, h, s, quality=spec.quality)
    if spec.fmt == "webp":
        return samples.webp(w, h, s, quality=spec.quality)
    photo = samples._photo(w, h, s)
    if spec.fmt == "png":
        if spec.variant == "rgba":
            # A smooth diagonal alpha ramp: real transparency that compresses well.
            ramp = np.add.outer(np.arange(h), np.arange(w)) * 255 // max(w + h - 2, 1)
            photo.putalpha(Image.fromarray(ramp.astype(np.uint8), "L"))
        return _save(photo, "PNG")
    if spec.fmt == "gif":
        if spec.variant == "animated":
            frames = [photo] + [samples._photo(w, h, s + k * 7919) for k in (1, 2)]
            pal = [f.quantize(256, method=Image.Quantize.MEDIANCUT) for f in frames]
            return _save(pal[0], "GIF", save_all=True, append_images=pal[1:], duration=120, loop=0)
        return _save(photo.quantize(256, method=Image.Quantize.MEDIANCUT), "GIF")
    raise ValueError(f"unknown format {spec.fmt!r}")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _render_to(args: tuple[str, Spec]) -> Entry:
    """Pool task: render one spec into ``directory`` and describe the file written."""
    directory, spec = args
    data = render(spec)
    _write_atomic(Path(directory) / spec.name, data)
    return Entry(
        spec.name, spec.fmt, spec.width, spec.height, len(data), hashlib.sha256(data).hexdigest()
    )


def read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _cached(directory: Path, count: int, seed: int) -> list[Path] | None:
    """The file list if the manifest matches and every file is there at its size."""
    manifest = read_manifest(directory)
    if manifest is None or (
        manifest.get("version"),
        manifest.get("count"),
        manifest.get("seed"),
    ) != (
        VERSION,
        count,
        seed,
    ):
        return None
    try:
        files = manifest["files"]
        paths = []
        for entry in files:
            path = directory / entry["name"]
            if path.stat().st_size != entry["bytes"]:
                return None
            paths.append(path)
    except (OSError, KeyError, TypeError):
        return None
    return paths if len(paths) == count else None


def build(
    directory: Path, count: int = 1500, seed: int = 2026, workers: int | None = None
) -> list[Path]:
    """Build (or reuse) the corpus in ``directory``; the image paths, in plan order.

    Rendering runs on ``workers`` processes (default 2, this machine's cores).
    The manifest is removed before and written (atomically) after rendering,
    so an interrupted build is never mistaken for a complete one. Stray
    ``img-*`` files from an earlier, larger build are removed.
    """
    directory = Path(directory)
    cached = _cached(directory, count, seed)
    if cached is not None:
        return cached

    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)
    specs = plan(count, seed)
    wanted = {spec.name for spec in specs}
    for old in directory.iterdir():
        stray_tmp = old.name.startswith(".img-") and ".tmp-" in old.name
        if stray_tmp or (_NAME_RE.match(old.name) and old.name not in wanted):
            old.unlink(missing_ok=True)

    n_workers = max(
        1, workers if workers is not None else min(DEFAULT_WORKERS, os.cpu_count() or 1)
    )
    tasks = [(str(directory), spec) for spec in specs]
    if n_workers == 1 or count < 8:
        entries = [_render_to(task) for task in tasks]
    else:
        # fork is quickest and re-imports nothing (spawn re-runs the caller's main
        # module, and cannot at all when it came from stdin), but forking a
        # multi-threaded process can deadlock the child: spawn then.
        method = "fork" if threading.active_count() == 1 else "spawn"
        try:
            with ProcessPoolExecutor(n_workers, mp_context=get_context(method)) as pool:
                entries = list(pool.map(_render_to, tasks, chunksize=8))
        except BrokenProcessPool:
            # e.g. spawn from a main module read from stdin: render here instead.
            print("bench.corpus: process pool failed, rendering serially", file=sys.stderr)
            entries = [_render_to(task) for task in tasks]

    formats = Counter(entry.fmt for entry in entries)
    manifest = {
        "version": VERSION,
        "count": count,
        "seed": seed,
        "total_bytes": sum(entry.bytes for entry in entries),
        "formats": dict(sorted(formats.items())),
        "build_seconds": round(time.perf_counter() - started, 2),
        "files": [asdict(entry) for entry in entries],
    }
    _write_atomic(directory / MANIFEST, json.dumps(manifest, indent=1).encode())
    return [directory / spec.name for spec in specs]


def summary(directory: Path) -> str:
    manifest = read_manifest(directory) or {}
    total = int(manifest.get("total_bytes", 0))
    formats = manifest.get("formats", {})
    mix = " ".join(f"{fmt}={n}" for fmt, n in formats.items())
    return (
        f"{manifest.get('count', 0)} images, {total / 1e6:.1f} MB ({mix}) in {directory}"
        f" [seed {manifest.get('seed')}, v{manifest.get('version')},"
        f" built in {manifest.get('build_seconds')} s]"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.corpus", description=__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--count", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    build(args.directory, args.count, args.seed, args.workers)
    print(f"{summary(args.directory)}; this run {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
