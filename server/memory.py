"""Giving freed memory back to the system between answers: glibc keeps what zstd contexts and frame buffers of an
answer freed (tens of MB after a first pull at level 9) unless asked with malloc_trim. A no-op elsewhere."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_ARENA_MAX = -8  # glibc's mallopt parameter


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc (musl, macOS): nothing to trim
        return None


def one_arena() -> None:
    """All threads allocate from glibc's main arena; call before any worker thread starts. malloc_trim gives back
    the free top of the main arena only: a worker thread's own arena kept its top, which held the zstd contexts of
    its last answer. Measured on the bench's debian-mtime pair (server RSS after serving three first pulls): 87-95 MB
    with per-thread arenas, 62-65 MB with one, the idle server being 55 MB; the delta computation's CPU is the same
    (the answers' Python code holds the GIL, so one arena adds no contention to speak of)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, 1)


def give_back() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
