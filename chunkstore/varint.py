"""LEB128 varints and zigzag, the numbers of header deltas and of the index delta's runs layout."""
from __future__ import annotations

from collections.abc import Sequence

from .delta import DeltaError


def varints(values: Sequence[int]) -> bytes:
    out = bytearray()
    for value in values:
        while value >= 0x80:
            out.append((value & 0x7F) | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)


def read_varints(data: bytes, what: str = "header delta") -> list[int]:
    values, value, shift = [], 0, 0
    for byte in data:
        value |= (byte & 0x7F) << shift
        shift += 7
        if shift > 63:
            raise DeltaError(f"{what}: a number is too long")
        if not byte & 0x80:
            values.append(value)
            value, shift = 0, 0
    if shift:
        raise DeltaError(f"{what}: truncated number")
    return values


def zigzag(n: int) -> int:
    return -2 * n - 1 if n < 0 else 2 * n


def unzigzag(n: int) -> int:
    return -(n + 1) // 2 if n & 1 else n // 2
