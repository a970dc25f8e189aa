"""The have-set Bloom filter: no false negatives, the false-positive rate it was sized for, the spec's worked example."""
from __future__ import annotations

import math
import random
import time

import msgpack
import pytest

from chunkstore.bloom import BloomFilter, BloomFormatError, _ids_array, _positions, filter_size


def ids(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(32 * n)


def test_worked_example_of_protocol_md() -> None:
    cid = bytes(range(32))  # m = 64, k = 2 as in the example
    assert _positions(_ids_array(cid), 64, 2).tolist() == [[0, 9]]
    bits = bytearray(8)
    for j in (0, 9):
        bits[j >> 3] |= 1 << (j & 7)
    assert bytes(bits) == bytes.fromhex("0102000000000000")
    bloom = BloomFilter(64, 2, bytes(bits))
    assert cid in bloom
    assert BloomFilter(64, 2, bytes.fromhex("0100000000000000")).contains_many(cid).tolist() == [False]


def test_sizing_formula() -> None:
    m, k = filter_size(1000, 0.01)
    assert m == math.ceil(math.ceil(-1000 * math.log(0.01) / math.log(2) ** 2) / 64) * 64 and k == 7
    assert filter_size(0, 0.01) == filter_size(1, 0.01)
    assert filter_size(1, 0.5)[0] == 64
    assert filter_size(10, 1e-30)[1] == 16  # k is clamped
    with pytest.raises(ValueError, match="between 0 and 1"):
        filter_size(10, 1.0)


@pytest.mark.parametrize("fp_rate", [0.01, 0.001])
def test_no_false_negatives_and_the_target_false_positive_rate(fp_rate: float) -> None:
    members = ids(100_000, seed=1)
    bloom = BloomFilter.build(members, fp_rate=fp_rate)
    assert bloom.contains_many(members).all()
    others = ids(400_000, seed=2)
    measured = bloom.contains_many(others).mean()
    print(f"\nBloom: 100,000 ids, target {fp_rate:.3%}, measured {measured:.3%} false positives, "
          f"{len(bloom.bits) / 1e3:.0f} kB, k={bloom.k}")
    assert 0.6 * fp_rate < measured < 1.4 * fp_rate


def test_a_million_ids() -> None:
    members = ids(1_000_000, seed=3)
    start = time.perf_counter()
    bloom = BloomFilter.build(members, fp_rate=0.01)
    built = time.perf_counter() - start
    print(f"\nBloom: 1,000,000 ids built in {built:.2f} s, {len(bloom.bits) / 1e6:.2f} MB")
    assert bloom.contains_many(members[: 32 * 10_000]).all()


def test_iterable_of_ids_and_encoding_round_trip() -> None:
    members = [random.Random(4).randbytes(32) for _ in range(100)]
    bloom = BloomFilter.build(iter(members))
    again = BloomFilter.decode(bloom.encode())
    assert again == bloom and all(cid in again for cid in members)
    assert BloomFilter.build(b"").contains_many(b"").tolist() == []


@pytest.mark.parametrize("obj,why", [
    ([64, 2, b""], "must be a map"),
    ({"m": 63, "k": 2, "bits": bytes(8)}, "multiple of 64"),
    ({"m": 0, "k": 2, "bits": b""}, "multiple of 64"),
    ({"m": True, "k": 2, "bits": bytes(8)}, "multiple of 64"),
    ({"m": 64, "k": 0, "bits": bytes(8)}, "k must be"),
    ({"m": 64, "k": 17, "bits": bytes(8)}, "k must be"),
    ({"m": 64, "k": 2, "bits": bytes(7)}, "must be 8 bytes"),
    ({"m": 64, "k": 2, "bits": "00000000"}, "must be 8 bytes"),
    ({"m": 2**63, "k": 2, "bits": bytes(8)}, "bytes"),
])
def test_bad_filters_are_refused(obj: object, why: str) -> None:
    with pytest.raises(BloomFormatError, match=why):
        BloomFilter.from_obj(obj)
    with pytest.raises(BloomFormatError):
        BloomFilter.decode(msgpack.packb(obj))


def test_bad_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        BloomFilter.build(b"x" * 33)
