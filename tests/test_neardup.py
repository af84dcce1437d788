"""Near-duplicate grouping: exact agreement with an all-pairs reference, and real photos."""

from __future__ import annotations

import io
import random
from array import array
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image

from crawler import neardup, samples
from crawler.imaging import hamming, process
from crawler.models import ImageJob, ImageResult, ThumbSpec
from crawler.neardup import group, group_ints, grouped, groups, parse_hashes
from crawler.probe import DEFAULT_FORMATS


def hexes(values: Sequence[int]) -> list[str]:
    return [f"{v:016x}" for v in values]


def flip(value: int, *bits: int) -> int:
    for bit in bits:
        value ^= 1 << bit
    return value


def planted(seed: int, n: int = 300) -> list[int]:
    """Half random hashes, half copies of earlier ones with 0..8 bits flipped.

    Copies of copies make chains, and 0 flips makes exact duplicates.
    """
    rng = random.Random(seed)
    values = [rng.getrandbits(64) for _ in range(n // 2)]
    while len(values) < n:
        values.append(flip(rng.choice(values), *rng.sample(range(64), rng.randint(0, 8))))
    rng.shuffle(values)
    return values


def close_pairs_by_brute_force(values: Sequence[int], distance: int) -> set[tuple[int, int]]:
    return {
        (i, j)
        for i in range(len(values))
        for j in range(i + 1, len(values))
        if (values[i] ^ values[j]).bit_count() <= distance
    }


def labels_by_brute_force(values: Sequence[int], distance: int) -> list[int]:
    parent = list(range(len(values)))

    def root(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for i, j in close_pairs_by_brute_force(values, distance):
        a, b = root(i), root(j)
        parent[max(a, b)] = min(a, b)
    # Always hooking onto the smaller root leaves each group's first member as its root.
    return [root(i) for i in range(len(values))]


@pytest.mark.parametrize("distance", [0, 3, 6, 8])
@pytest.mark.parametrize("seed", range(5))
def test_groups_match_brute_force(seed: int, distance: int) -> None:
    values = planted(seed)
    labels = group(hexes(values), distance)
    assert labels == labels_by_brute_force(values, distance)
    # The planted copies must actually make groups, or this test proves little.
    assert len(set(labels)) < len(values)


@pytest.mark.parametrize("distance", [1, 3, 6, 8, 10])
@pytest.mark.parametrize("extra_blocks", [None, 1, 2, 3])
def test_pairs_exact_for_any_block_count(
    monkeypatch: pytest.MonkeyPatch, distance: int, extra_blocks: int | None
) -> None:
    """Whatever plan the cost model picks, every close pair is found exactly once."""
    if extra_blocks is None:
        plan: neardup.Plan = ([], 0)  # the all-pairs fallback
    else:
        blocks = distance + extra_blocks
        plan = (neardup._split(blocks), blocks - distance)
    monkeypatch.setattr(neardup, "_plan", lambda n, d: plan)
    values = sorted(set(planted(seed=distance, n=400)))
    a, b = neardup._close_pairs(np.array(values, dtype=np.uint64), distance)
    found = list(zip(a.tolist(), b.tolist(), strict=True))
    assert len(found) == len(set(found))
    assert set(found) == close_pairs_by_brute_force(values, distance)


def test_pairs_exact_when_keys_collide_a_lot() -> None:
    """Hashes that share most bits make long runs of equal keys in every table."""
    rng = random.Random(7)
    common = rng.getrandbits(64) & ~0xFFF
    values = sorted({common | rng.getrandbits(12) for _ in range(600)})
    a, b = neardup._close_pairs(np.array(values, dtype=np.uint64), 6)
    found = list(zip(a.tolist(), b.tolist(), strict=True))
    assert len(found) == len(set(found))
    assert set(found) == close_pairs_by_brute_force(values, 6)


@pytest.mark.parametrize("distance", [12, 20, 63, 64, 100])
def test_large_distances_still_exact(distance: int) -> None:
    values = planted(seed=distance, n=120)
    assert group(hexes(values), distance) == labels_by_brute_force(values, distance)


def test_grouping_is_transitive() -> None:
    a = 0x0123456789ABCDEF
    b = flip(a, 0, 1, 2, 3, 4)
    c = flip(b, 10, 11, 12, 13, 14)
    far = flip(a, *range(30, 50))
    assert (a ^ c).bit_count() == 10
    assert group(hexes([a, far, b, c])) == [0, 1, 0, 0]
    assert group(hexes([a, far, c])) == [0, 1, 2]


def test_long_chain_is_one_group() -> None:
    """Each hash one bit from the previous: the ends end up 63 bits apart."""
    chain = [0]
    for bit in range(63):
        chain.append(flip(chain[-1], bit))
    order = random.Random(5).sample(range(64), 64)
    shuffled = [chain[i] for i in order]
    assert group(hexes(shuffled), 1) == [0] * 64
    assert group(hexes(shuffled), 0) == list(range(64))


def test_components_of_a_long_path() -> None:
    n = 5_000
    rng = np.random.default_rng(0)
    nodes = rng.permutation(n).astype(np.int64)
    edges = rng.permutation(n - 1)
    a, b = nodes[edges], nodes[edges + 1]
    assert neardup._components(n + 2, a, b).tolist() == [0] * n + [n, n + 1]


@pytest.mark.parametrize("distance", [0, 1, 5, 6, 7, 10])
def test_boundary_is_inclusive(distance: int) -> None:
    base = 0xFEDCBA9876543210
    at = flip(base, *(6 * i for i in range(distance)))
    beyond = flip(base, *range(distance + 1))
    assert (base ^ at).bit_count() == distance
    assert (base ^ beyond).bit_count() == distance + 1
    assert group(hexes([base, at]), distance) == [0, 0]
    assert group(hexes([base, beyond]), distance) == [0, 1]


def test_identical_hashes_group_even_at_distance_zero() -> None:
    hashes = ["00000000000000ff", "ffffffffffffffff", "00000000000000FF", "00000000000000ff"]
    assert group(hashes, 0) == [0, 1, 0, 0]
    assert group(hashes) == [0, 1, 0, 0]


def test_empty_and_single() -> None:
    assert group([]) == []
    assert groups([]) == []
    assert group(["8f373714acfcf4d0"]) == [0]
    assert groups(["8f373714acfcf4d0"]) == []
    assert group_ints(np.empty(0, dtype=np.uint64), 6).tolist() == []


def test_labels_are_first_member_indices() -> None:
    a, b = 0x1111111111111111, 0x9999999999999999
    values = [b, a, flip(a, 3), flip(b, 60), a, 0x5555555555555555]
    assert group(hexes(values)) == [0, 1, 1, 0, 1, 5]
    # The same set in another order: labels follow the input, not the values.
    assert group(hexes(values[::-1])) == [0, 1, 2, 1, 1, 2]


def test_groups_largest_first_then_by_first_index() -> None:
    a, b, c = 0x1111111111111111, 0x9999999999999999, 0x5555555555555555
    lone = 0x0F0F0F0F0F0F0F0F
    values = [lone, b, a, c, flip(b, 1), flip(a, 1), flip(c, 1), flip(a, 2)]
    assert groups(hexes(values)) == [[2, 5, 7], [1, 4], [3, 6]]


def test_group_ints_agrees_with_group() -> None:
    values = planted(seed=11)
    labels = group_ints(np.array(values, dtype=np.uint64), 6)
    assert labels.dtype == np.int64
    assert labels.tolist() == group(hexes(values))


def test_grouped_maps_each_member_of_a_group_to_its_first() -> None:
    values = planted(seed=12)
    labels = group(hexes(values))
    sizes = Counter(labels)
    expected = {i: label for i, label in enumerate(labels) if sizes[label] > 1}
    assert expected  # the planted groups are there
    assert grouped(array("Q", values)) == expected


def test_parse_hashes_reads_big_endian_hex() -> None:
    values = [0, 1, 0x8000000000000000, 0xFFFFFFFFFFFFFFFF, *planted(seed=3, n=50)]
    assert parse_hashes(hexes(values)).tolist() == values
    assert parse_hashes(["ABCDEF0123456789"]).tolist() == [0xABCDEF0123456789]


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "123",
        "0123456789abcdef0",
        "0123456789abcdeg",
        "0x23456789abcdef",
        " 123456789abcdef",
        "0123_56789abcdef",
        "0123456789abcdeé",
    ],
)
def test_invalid_hex_raises_value_error(bad: str) -> None:
    with pytest.raises(ValueError, match="hash 1 "):
        group(["0123456789abcdef", bad])


def test_negative_distance_raises_value_error() -> None:
    with pytest.raises(ValueError, match="distance"):
        group(["0123456789abcdef"], -1)


def photo_phash(data: bytes) -> str:
    job = ImageJob(data=data, thumbs=ThumbSpec(), max_pixels=100_000_000, formats=DEFAULT_FORMATS)
    result = process(job)
    assert isinstance(result, ImageResult), result
    return result.phash


def jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_real_photos_copies_group_and_others_do_not() -> None:
    original = samples.photo_jpeg(640, 480, seed=1)
    image = Image.open(io.BytesIO(original))
    reencoded = jpeg(image, quality=60)
    halved = jpeg(image.resize((320, 240), Image.Resampling.LANCZOS), quality=90)
    bodies = [original, reencoded, halved, *(samples.photo_jpeg(640, 480, s) for s in (2, 3))]
    hashes = [photo_phash(body) for body in bodies]
    # Measured when written: both copies hash identically to the original
    # (0 bits), the other photos are 24-38 bits away from it and each other.
    copies = [hamming(hashes[0], h) for h in hashes[1:3]]
    assert max(copies) <= 6, f"copies are {copies} bits from the original"
    assert group(hashes) == [0, 0, 0, 3, 4]
    assert groups(hashes) == [[0, 1, 2]]
