"""Giving freed memory back to the system between answers: glibc keeps what zstd contexts and frame buffers of an
answer freed (tens of MB after a first pull at level 9) unless asked with malloc_trim. A no-op elsewhere."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def give_back() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
