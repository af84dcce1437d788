"""Time near-duplicate grouping on N synthetic perceptual hashes, and check the answer.

    python bench/neardup_bench.py [N] [--distance D]

The hashes are deterministic: uniformly random 64-bit values, of which 2% are
then overwritten with near copies (0..6 bits flipped) of other values, making
clusters of about four. Prints the median time of ``group_ints`` over three
runs, the groups found and the peak RSS, then verifies the grouping of a few
hundred hashes (random ones and planted ones) against brute force over all N,
so a fast but wrong result fails. Last line: the result as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from crawler import neardup

SEED = 20_240_601
PLANTED_SHARE = 0.02
MAX_FLIPS = 6
CHECK_RANDOM = 300
CHECK_PLANTED = 100


def build(n: int) -> tuple[NDArray[np.uint64], NDArray[np.int64]]:
    """The hashes, and the positions holding planted near copies."""
    rng = np.random.default_rng(SEED)
    values = rng.integers(0, 2**64, n, dtype=np.uint64)
    positions = rng.permutation(n)
    planted = positions[: int(n * PLANTED_SHARE)]
    # Sources are drawn from values that are never overwritten, so every copy
    # really is within MAX_FLIPS bits of a hash that is still there.
    sources = rng.choice(positions[planted.size :], max(planted.size // 3, 1))
    source = sources[rng.integers(0, sources.size, planted.size)]
    flips = rng.integers(0, MAX_FLIPS + 1, planted.size)
    # For each copy, `flips` distinct random bit positions.
    bit_order = np.argsort(rng.random((planted.size, 64)), axis=1)
    chosen = np.arange(64)[None, :] < flips[:, None]
    bits = np.where(chosen, np.uint64(1) << bit_order.astype(np.uint64), np.uint64(0))
    values[planted] = values[source] ^ np.bitwise_or.reduce(bits, axis=1)
    return values, planted.astype(np.int64)


def check(
    values: NDArray[np.uint64], labels: NDArray[np.int64], distance: int, sample: NDArray[np.int64]
) -> list[str]:
    """Each sampled hash's group, found by brute-force breadth-first search over all
    hashes, against the group ``labels`` gives it. Returns the differences."""
    problems = []
    for start in sample.tolist():
        group = {start}
        frontier = [start]
        while frontier:
            near = np.bitwise_count(values ^ values[frontier.pop()]) <= distance
            new = set(np.flatnonzero(near).tolist()) - group
            group |= new
            frontier.extend(new)
        claimed = set(np.flatnonzero(labels == labels[start]).tolist())
        if claimed != group or labels[start] != min(group):
            problems.append(f"hash {start}: label {labels[start]}, group {claimed}, truth {group}")
    return problems


def peak_rss_mib() -> float:
    """This process's own peak RSS. Not ``ru_maxrss``: Linux carries it across fork and
    exec, so it would report the parent's peak if that was higher (it was: 351 MiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=1_000_000)
    parser.add_argument("--distance", type=int, default=6)
    args = parser.parse_args()
    n, distance = args.n, args.distance

    values, planted = build(n)
    rss_before = peak_rss_mib()
    blocks, share = neardup._plan(np.unique(values).size, distance)
    print(f"{n:,} hashes, distance {distance}: {len(blocks)} blocks, {share} shared per table")

    times = []
    labels = np.empty(0, dtype=np.int64)
    for run in range(3):
        started = time.perf_counter()
        labels = neardup.group_ints(values, distance)
        times.append(time.perf_counter() - started)
        print(f"run {run + 1}: {times[-1]:.2f} s", flush=True)
    peak_rss = peak_rss_mib()

    sizes = np.bincount(labels, minlength=n)
    groups = int(np.count_nonzero(sizes > 1))
    grouped = int(sizes[sizes > 1].sum())
    median = statistics.median(times)
    print(f"median {median:.2f} s; {groups:,} groups holding {grouped:,} hashes")
    print(f"peak RSS {peak_rss:.0f} MiB ({rss_before:.0f} MiB before grouping)")

    rng = np.random.default_rng(SEED + 1)
    sample = np.concatenate(
        [
            rng.choice(n, min(CHECK_RANDOM, n), replace=False),
            rng.choice(planted, min(CHECK_PLANTED, planted.size), replace=False),
        ]
    )
    started = time.perf_counter()
    problems = check(values, labels, distance, sample)
    elapsed = time.perf_counter() - started
    print(f"checked {sample.size} hashes against brute force in {elapsed:.1f} s")
    for problem in problems[:10]:
        print("WRONG", problem)

    result = {
        "n": n,
        "distance": distance,
        "median_s": round(median, 3),
        "runs_s": [round(t, 3) for t in times],
        "groups": groups,
        "grouped_hashes": grouped,
        "peak_rss_mib": round(peak_rss),
        "checked": int(sample.size),
        "wrong": len(problems),
        "ok": not problems,
    }
    print(json.dumps(result))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
