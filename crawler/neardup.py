"""Group images whose 64-bit perceptual hashes are within a few bits of each other.

Two hashes are near duplicates when they differ in at most ``distance`` bits;
groups are the connected components of that relation, so a chain of small
differences joins images that are themselves far apart.

Comparing all pairs is out of the question at a million hashes, so candidates
come from the pigeonhole principle: cut the 64 bits into ``m > distance``
blocks; a pair differing in at most ``distance`` bits differs in at most
``distance`` blocks and so agrees exactly on at least ``r = m - distance`` of
them. For every choice of ``r`` blocks ("table") the hashes are sorted by
those blocks, and only hashes sharing them are compared. Every close pair
agrees on some table's blocks, so none is missed; every candidate is checked
by its true Hamming distance, so none is invented. For a million hashes and
distance 6 the cost model picks 8 blocks of 8 bits: 28 tables with 16-bit
keys, about 3 s on 2 cores. The cost climbs steeply with the distance (there,
~0.5 s at 3, ~15-20 s at 8); for small inputs or distances so large that no
block count pays off, all pairs are compared, which is correct but quadratic.
"""

from __future__ import annotations

import itertools
import math
from array import array
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

BITS = 64
HEX_DIGITS = BITS // 4

# Costs in nanoseconds, measured on a 2-core x86 box with numpy 2.4 and used
# only to choose the block count: per table, per hash and table, per extra
# 16-bit radix pass, per compared pair, per step of the offset loop.
_TABLE_NS = 50_000.0
_HASH_NS = 60.0
_RADIX_PASS_NS = 20.0
_PAIR_NS = 6.0
_STEP_NS = 10_000.0

# ASCII code -> hex digit value, 255 for anything that is not a hex digit.
_NIBBLE = np.full(256, 255, dtype=np.uint8)
_NIBBLE[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16)
_NIBBLE[np.frombuffer(b"ABCDEF", dtype=np.uint8)] = np.arange(10, 16)

_NO_INDEX = np.empty(0, dtype=np.int64)
_NO_INDEX.flags.writeable = False  # shared, so nobody may append to it in place

Blocks = list[tuple[int, int]]  # (shift, width) of each block
Plan = tuple[Blocks, int]  # blocks, and how many of them a close pair must share


def group(hashes: Sequence[str], distance: int = 6) -> list[int]:
    """For each hash, the input index of the first member of its group (itself if alone)."""
    labels: list[int] = group_ints(parse_hashes(hashes), distance).tolist()
    return labels


def grouped(values: array[int], distance: int = 6) -> dict[int, int]:
    """For each hash in a group of two or more: its index -> the index of the group's first
    member. ``values``: the hashes as an ``array('Q')`` (8 bytes each, no objects)."""
    labels = group_ints(np.frombuffer(values, dtype=np.uint64), distance)
    counts = np.bincount(labels, minlength=labels.size)
    members = np.flatnonzero(counts[labels] > 1)
    return dict(zip(members.tolist(), labels[members].tolist(), strict=True))


def groups(hashes: Sequence[str], distance: int = 6) -> list[list[int]]:
    """Groups of two or more, as input indices: largest first, ties by first index."""
    labels = group_ints(parse_hashes(hashes), distance)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.diff(sorted_labels, prepend=-1))
    sizes = np.diff(starts, append=labels.size)
    found = [order[s : s + n].tolist() for s, n in zip(starts, sizes, strict=True) if n > 1]
    found.sort(key=lambda g: (-len(g), g[0]))
    return found


def parse_hashes(hashes: Sequence[str]) -> NDArray[np.uint64]:
    """``str(imagehash.phash(...))`` strings to uint64, the first hex digit most significant."""
    for i, h in enumerate(hashes):
        if len(h) != HEX_DIGITS:
            msg = f"hash {i} is not {HEX_DIGITS} hex digits: {h!r}"
            raise ValueError(msg)
    # One vectorised pass instead of a million int(h, 16) calls, which would
    # also accept "0x", "_" and whitespace. Non-ASCII becomes "?", one byte per
    # character, so the bad hash is still found by its offset.
    text = "".join(hashes).encode("ascii", errors="replace")
    nibbles = _NIBBLE[np.frombuffer(text, dtype=np.uint8)]
    if (bad := np.flatnonzero(nibbles == 255)).size:
        i = int(bad[0]) // HEX_DIGITS
        msg = f"hash {i} is not {HEX_DIGITS} hex digits: {hashes[i]!r}"
        raise ValueError(msg)
    pairs = nibbles.reshape(-1, HEX_DIGITS)
    octets = np.ascontiguousarray((pairs[:, 0::2] << 4) | pairs[:, 1::2])
    return octets.view(">u8").ravel().astype(np.uint64)


def group_ints(values: NDArray[np.uint64], distance: int) -> NDArray[np.int64]:
    """Like :func:`group`, for hashes already held as a 1-D uint64 array."""
    if distance < 0:
        msg = f"distance must be >= 0, got {distance}"
        raise ValueError(msg)
    values = np.asarray(values, dtype=np.uint64)
    if values.ndim != 1:
        msg = f"expected a 1-D array, got shape {values.shape}"
        raise ValueError(msg)
    if distance >= BITS:
        return np.zeros(values.size, dtype=np.int64)
    # Equal hashes are one group for free, and collapsing them first keeps a
    # hash stored thousands of times from making one huge bucket in every table.
    unique, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    a, b = _close_pairs(unique, distance)
    root = _components(unique.size, a, b)
    group_first = np.full(unique.size, values.size, dtype=np.int64)
    np.minimum.at(group_first, root, first)
    return group_first[root][inverse.ravel()]


def _close_pairs(
    values: NDArray[np.uint64], distance: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Every pair ``i < j`` of distinct ``values`` within ``distance`` bits, each exactly once.

    Costs about one sort per table plus one comparison per pair of values
    sharing a table's key.
    """
    if distance == 0:
        # Distinct values are never within 0 bits of each other.
        return _NO_INDEX, _NO_INDEX
    blocks, share = _plan(values.size, distance)
    found_a = [_NO_INDEX]
    found_b = [_NO_INDEX]
    for table in itertools.combinations(range(len(blocks)), share):
        key, key_bits = _key(values, [blocks[t] for t in table])
        a, b, diff = _same_key_pairs(values, key, key_bits, distance)
        # A pair agreeing on more than `share` blocks turns up in several
        # tables; keep it only in the first, so each pair is reported once.
        mine = _first_shared(diff, blocks, share) == _mask(table)
        found_a.append(a[mine])
        found_b.append(b[mine])
    a = np.concatenate(found_a)
    b = np.concatenate(found_b)
    return np.minimum(a, b), np.maximum(a, b)


def _same_key_pairs(
    values: NDArray[np.uint64], key: NDArray[np.uint64], key_bits: int, distance: int
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.uint64]]:
    """Pairs of ``values`` with equal ``key`` within ``distance`` bits, and their XOR."""
    order = _argsort(key, key_bits)
    sorted_key = key[order]
    sorted_values = values[order]
    # How many later positions share each sorted position's key.
    new_run = np.empty(key.size, dtype=bool)
    new_run[:1] = True
    np.not_equal(sorted_key[1:], sorted_key[:-1], out=new_run[1:])
    run_end = np.append(np.flatnonzero(new_run)[1:], key.size)
    later = run_end[np.cumsum(new_run) - 1] - np.arange(key.size) - 1
    starts = np.flatnonzero(later)
    later = later[starts]
    # Every pair within a run is (position, position + offset) for some
    # offset up to the position's `later`. Ordering positions by `later`,
    # largest first, makes those still comparing at each offset a prefix:
    # the loop only slices, never filters.
    most = int(later.max(initial=0))
    by_later = _argsort((most - later).astype(np.uint64), most.bit_length())
    starts = starts[by_later]
    first = sorted_values[starts]
    active = np.cumsum(np.bincount(later)[::-1])[::-1]
    found_i = [_NO_INDEX]
    found_j = [_NO_INDEX]
    found_diff = [np.empty(0, dtype=np.uint64)]
    for offset in range(1, most + 1):
        count = active[offset]
        diff = first[:count] ^ sorted_values[starts[:count] + offset]
        close = np.flatnonzero(np.bitwise_count(diff) <= distance)
        found_i.append(starts[close])
        found_j.append(starts[close] + offset)
        found_diff.append(diff[close])
    return (
        order[np.concatenate(found_i)],
        order[np.concatenate(found_j)],
        np.concatenate(found_diff),
    )


def _plan(n: int, distance: int) -> Plan:
    """Choose the block count with the lowest estimated cost, assuming uniform bits.

    With ``m`` blocks a close pair shares ``m - distance`` of them; more blocks
    mean longer keys (fewer candidates) but more tables (more sorts). Zero
    shared blocks is the all-pairs fallback: one table whose key is empty.
    """
    pairs = n * (n - 1) / 2
    best: Plan = ([], 0)
    best_cost = _TABLE_NS + pairs * _PAIR_NS + max(n - 1, 0) * _STEP_NS
    for m in range(distance + 1, BITS + 1):
        share = m - distance
        narrow, wide = BITS // m, BITS % m  # `wide` blocks are one bit wider
        cost = 0.0
        # Tables that include j wide blocks all cost the same.
        for j in range(min(wide, share) + 1):
            tables = math.comb(wide, j) * math.comb(m - wide, share - j)
            key_bits = share * narrow + j
            sort = n * (_HASH_NS + _RADIX_PASS_NS * ((key_bits - 1) // 16))
            candidates = pairs * 2.0**-key_bits
            cost += tables * (_TABLE_NS + sort + candidates * _PAIR_NS)
        if cost < best_cost:
            best, best_cost = (_split(m), share), cost
    return best


def _split(m: int) -> Blocks:
    """``m`` contiguous blocks covering all 64 bits, widths differing by at most one."""
    widths = [BITS // m + (i < BITS % m) for i in range(m)]
    shifts = itertools.accumulate(widths[:-1], initial=0)
    return list(zip(shifts, widths, strict=True))


def _key(values: NDArray[np.uint64], blocks: Blocks) -> tuple[NDArray[np.uint64], int]:
    """The chosen blocks' bits packed side by side, and how many bits that is."""
    key = np.zeros(values.size, dtype=np.uint64)
    bits = 0
    for shift, width in blocks:
        part = (values >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        key |= part << np.uint64(bits)
        bits += width
    return key, bits


def _argsort(key: NDArray[np.uint64], bits: int) -> NDArray[np.int64]:
    """LSD radix sort in 16-bit digits: numpy radix-sorts 16-bit keys several times
    faster than it sorts wider ones."""
    digit = np.uint64(0xFFFF)
    order = np.argsort((key & digit).astype(np.uint16), kind="stable")
    for shift in range(16, bits, 16):
        high = ((key[order] >> np.uint64(shift)) & digit).astype(np.uint16)
        order = order[np.argsort(high, kind="stable")]
    return order.astype(np.int64, copy=False)


def _first_shared(diff: NDArray[np.uint64], blocks: Blocks, share: int) -> NDArray[np.uint64]:
    """Bit mask of the first ``share`` blocks on which each pair agrees."""
    agree = np.zeros(diff.size, dtype=np.uint64)
    for index, (shift, width) in enumerate(blocks):
        equal = ((diff >> np.uint64(shift)) & np.uint64((1 << width) - 1)) == 0
        agree |= equal.astype(np.uint64) << np.uint64(index)
    rest = agree.copy()
    for _ in range(share):
        rest &= rest - 1  # drops the lowest set bit
    return agree ^ rest


def _mask(table: tuple[int, ...]) -> int:
    return sum(1 << index for index in table)


def _components(n: int, a: NDArray[np.int64], b: NDArray[np.int64]) -> NDArray[np.int64]:
    """Connected components of the graph on ``range(n)`` with edges ``a[i]-b[i]``.

    Each node maps to the smallest node of its component. Vectorised
    union-find: hook every root that has an edge to a smaller root onto the
    smallest such root, flatten the trees completely, repeat with the edges
    still joining two trees. Parents only ever decrease, so no cycles form.
    """
    parent = np.arange(n, dtype=np.int64)
    while a.size:
        root_a, root_b = parent[a], parent[b]
        apart = root_a != root_b
        a, b = a[apart], b[apart]
        root_a, root_b = root_a[apart], root_b[apart]
        np.minimum.at(parent, np.maximum(root_a, root_b), np.minimum(root_a, root_b))
        while not np.array_equal(grand := parent[parent], parent):
            parent = grand
    return parent
