"""zstd decompression that never produces more than the caller expects (no decompression bombs)."""
from __future__ import annotations

import io

import zstandard


class DecompressionError(ValueError):
    pass


def decompress_exact(dctx: zstandard.ZstdDecompressor, data: bytes, size: int) -> bytes:
    """The `size` bytes that `data` decompresses to; DecompressionError if it holds more, fewer, or garbage.

    A zstd frame may declare any content size and python-zstandard trusts it over `max_output_size`,
    so output is read through a stream reader bounded by `size + 1`.
    """
    try:
        with dctx.stream_reader(io.BytesIO(data), read_across_frames=True) as reader:
            out = reader.read(size + 1)
            while len(out) <= size:
                more = reader.read(size + 1 - len(out))
                if not more:
                    break
                out += more
    except zstandard.ZstdError as exc:
        raise DecompressionError(f"bad zstd data: {exc}") from None
    if len(out) != size:
        held = f"more than {size}" if len(out) > size else str(len(out))
        raise DecompressionError(f"zstd data holds {held} bytes, {size} expected")
    return out
