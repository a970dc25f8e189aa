"""Rebuilding a layer's uncompressed stream from its index and chunk sources, verified against its diff_id."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from .atomic import atomic_file
from .index import ChunkList, LayerIndex, chunk_id

GetChunk = Callable[[bytes], bytes]


class ReassemblyError(Exception):
    """The rebuilt layer is not the layer the index describes."""


class ChunkMismatch(ReassemblyError):
    def __init__(self, cid: bytes, why: str):
        super().__init__(f"chunk {cid.hex()}: {why}")
        self.chunk_id = cid


def _checked(cid: bytes, length: int, data: bytes) -> bytes:
    if len(data) != length:
        raise ChunkMismatch(cid, f"{len(data)} bytes, the index says {length}")
    if chunk_id(data) != cid:
        raise ChunkMismatch(cid, "its bytes do not hash to its id")
    return data


def layer_pieces(layer: LayerIndex, get_chunk: GetChunk, verify_chunks: bool = True) -> Iterator[bytes]:
    """The layer's uncompressed bytes in order, as pieces of at most one chunk each."""
    def chunks_of(chunk_list: ChunkList) -> Iterator[bytes]:
        for cid, length in chunk_list:
            data = get_chunk(cid)
            yield _checked(cid, length, data) if verify_chunks else data

    headers = chunks_of(layer.header_chunks)
    contents = chunks_of(layer.chunks)
    pending = b""  # header bytes already fetched but belonging to the next run
    for header_len, content_len in layer.run_pairs():
        while header_len:
            if not pending:
                pending = next(headers)
            piece, pending = pending[:header_len], pending[header_len:]
            header_len -= len(piece)
            yield piece
        while content_len:
            piece = next(contents)
            content_len -= len(piece)
            yield piece


def write_layer(layer: LayerIndex, get_chunk: GetChunk, out: BinaryIO, verify_chunks: bool = True) -> str:
    """Writes the layer to `out`, returns its diff_id; raises ReassemblyError if it differs from the index's.
    `verify_chunks=False` for a `get_chunk` that checks every chunk against its id itself (LocalStore.get)."""
    sha = hashlib.sha256()
    size = 0
    for piece in layer_pieces(layer, get_chunk, verify_chunks):
        sha.update(piece)
        out.write(piece)
        size += len(piece)
    diff_id = "sha256:" + sha.hexdigest()
    if size != layer.uncompressed_size or diff_id != layer.diff_id:
        raise ReassemblyError(f"rebuilt layer is {diff_id} ({size} bytes), expected {layer.diff_id} "
                              f"({layer.uncompressed_size} bytes)")
    return diff_id


def reassemble_to_file(layer: LayerIndex, get_chunk: GetChunk, path: str | os.PathLike,
                       verify_chunks: bool = True) -> Path:
    """Writes the layer to `path` through a temporary file that is renamed only once the diff_id matches;
    on any failure the partial output is removed and the error raised."""
    with atomic_file(path) as out:
        write_layer(layer, get_chunk, out, verify_chunks)
    return Path(path)
