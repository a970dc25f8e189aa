"""The have-set Bloom filter over chunk ids, exactly as specified in docs/PROTOCOL.md ("Bloom filter").

Chunk ids are already uniform hashes, so bit positions come from the id bytes themselves (double
hashing over two 64-bit words): any implementation rebuilds the same filter without a hash library.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import msgpack
import numpy as np

from .index import ID_SIZE

MAX_HASHES = 16
MAX_FILTER_BYTES = 64 << 20


class BloomFormatError(ValueError):
    pass


def filter_size(n: int, fp_rate: float) -> tuple[int, int]:
    """(m bits, k hashes) for `n` ids at false-positive rate `fp_rate`; m is a multiple of 64, at least 64."""
    if not 0 < fp_rate < 1:
        raise ValueError(f"false-positive rate must be between 0 and 1, got {fp_rate}")
    n = max(n, 1)
    m = math.ceil(-n * math.log(fp_rate) / (math.log(2) ** 2))
    m = max(64, -(-m // 64) * 64)
    k = min(MAX_HASHES, max(1, round(m / n * math.log(2))))
    return m, k


def _ids_array(ids: bytes | bytearray | Iterable[bytes]) -> np.ndarray:
    if not isinstance(ids, (bytes, bytearray)):
        ids = b"".join(ids)
    if len(ids) % ID_SIZE:
        raise ValueError(f"chunk ids must be {ID_SIZE} bytes each")
    return np.frombuffer(ids, dtype="<u8").reshape(-1, ID_SIZE // 8)


def _positions(words: np.ndarray, m: int, k: int) -> np.ndarray:
    h1 = words[:, 0]
    h2 = words[:, 1] | np.uint64(1)
    i = np.arange(k, dtype=np.uint64)
    # uint64 arithmetic wraps modulo 2**64, as the spec says.
    with np.errstate(over="ignore"):
        return (h1[:, None] + i[None, :] * h2[:, None]) % np.uint64(m)


@dataclass
class BloomFilter:
    m: int        # bits
    k: int        # hashes per id
    bits: bytes   # m/8 bytes, bit j is (bits[j >> 3] >> (j & 7)) & 1

    @classmethod
    def build(cls, ids: bytes | bytearray | Iterable[bytes], fp_rate: float = 0.01,
              count: int | None = None) -> "BloomFilter":
        """A filter holding `ids` (concatenated 32-byte ids, or an iterable of them)."""
        words = _ids_array(ids)
        m, k = filter_size(count if count is not None else len(words), fp_rate)
        bitmap = np.zeros(m, dtype=bool)
        for start in range(0, len(words), 1 << 18):  # bounded temporaries for huge stores
            bitmap[_positions(words[start:start + (1 << 18)], m, k).ravel()] = True
        return cls(m, k, np.packbits(bitmap, bitorder="little").tobytes())

    def contains_many(self, ids: bytes | bytearray | Iterable[bytes]) -> np.ndarray:
        """A boolean array: for each id, whether the filter (probably) holds it."""
        words = _ids_array(ids)
        if len(words) == 0:
            return np.zeros(0, dtype=bool)
        bitmap = np.frombuffer(self.bits, dtype=np.uint8)
        pos = _positions(words, self.m, self.k)
        hit = (bitmap[(pos >> np.uint64(3)).astype(np.int64)] >> (pos & np.uint64(7)).astype(np.uint8)) & 1
        return hit.all(axis=1)

    def __contains__(self, cid: bytes) -> bool:
        return bool(self.contains_many(cid)[0])

    def to_obj(self) -> dict:
        return {"m": self.m, "k": self.k, "bits": self.bits}

    def encode(self) -> bytes:
        return msgpack.packb(self.to_obj(), use_bin_type=True)

    @classmethod
    def from_obj(cls, obj) -> "BloomFilter":
        if not isinstance(obj, dict):
            raise BloomFormatError("bloom filter must be a map with m, k, bits")
        m, k, bits = obj.get("m"), obj.get("k"), obj.get("bits")
        if not isinstance(m, int) or isinstance(m, bool) or m < 64 or m % 64:
            raise BloomFormatError(f"bloom filter m must be a positive multiple of 64, got {str(m)[:30]}")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_HASHES:
            raise BloomFormatError(f"bloom filter k must be 1..{MAX_HASHES}, got {str(k)[:30]}")
        if not isinstance(bits, bytes) or len(bits) != m // 8:
            raise BloomFormatError(f"bloom filter bits must be {m // 8} bytes")
        if len(bits) > MAX_FILTER_BYTES:
            raise BloomFormatError(f"bloom filter of {len(bits)} bytes exceeds {MAX_FILTER_BYTES}")
        return cls(m, k, bits)

    @classmethod
    def decode(cls, data: bytes) -> "BloomFilter":
        try:
            obj = msgpack.unpackb(data, raw=False)
        except Exception as exc:
            raise BloomFormatError(f"bloom filter is not valid msgpack: {exc}") from None
        return cls.from_obj(obj)
