"""The server's configuration: which registry it serves, with which credentials, where its store lives, its limits."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from chunkstore import wire
from chunkstore.bloom import MAX_FILTER_BYTES


def default_store_dir() -> Path:
    """`$XDG_CACHE_HOME/chunksync/server`, else `~/.cache/chunksync/server`: the store is a cache, wiping it loses nothing."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "chunksync" / "server"


@dataclass(frozen=True)
class ServerConfig:
    registry_url: str                       # e.g. http://127.0.0.1:5000
    store_dir: Path = default_store_dir()
    registry_user: str | None = None        # the server's own credentials: read blobs, push indexes
    registry_password: str | None = None
    push_indexes: bool = True               # push each new index to the registry as a referrer of its image
    events_token: str | None = None         # if set, POST /v1/events needs `Authorization: Bearer <token>`
    max_body_bytes: int = wire.MAX_REQUEST_BYTES
    max_bloom_bytes: int = MAX_FILTER_BYTES
    max_event_bytes: int = 1 << 20          # a notification envelope; distribution batches a few events
    request_memory_bytes: int = 256 << 20   # sync and repair requests being read and planned at once (bodies.py)
    request_memory_wait: float = 30.0       # seconds a request waits for its share of that before a 503
    auth_ttl: float = 30.0                  # seconds a device's access to a repository stays checked
    chunks_frame_bytes: int = wire.CHUNKS_FRAME_TARGET
    zstd_level: int = 3                     # CHUNKS frames made for one device
    frame_cache_bytes: int = 2 << 30        # whole-segment frames kept for later devices (segments.py); 0: none
    segment_level: int = 9                  # their zstd level: paid once, sent to every device after
    index_workers: int = 2                  # background indexing threads (push notifications)
    deltas: bool = True                     # send changed files as deltas against a held image (protocol v2)
    # The protocol versions this server speaks: all it knows, unless the operator withholds some (--protocol-versions).
    protocol_versions: tuple[int, ...] = wire.SUPPORTED_VERSIONS

    def __post_init__(self) -> None:
        if not self.registry_url.startswith(("http://", "https://")):
            raise ValueError(f"registry URL must start with http:// or https://, got {self.registry_url!r}")
        if self.chunks_frame_bytes > wire.MAX_CHUNKS_FRAME_BYTES:
            raise ValueError(f"chunks_frame_bytes is over the protocol's {wire.MAX_CHUNKS_FRAME_BYTES}")
        unknown = set(self.protocol_versions) - set(wire.SUPPORTED_VERSIONS)
        if not self.protocol_versions or unknown:
            raise ValueError(f"protocol versions must be some of {wire.spell_versions(wire.SUPPORTED_VERSIONS)}, "
                             f"got {wire.spell_versions(self.protocol_versions) or 'none'}")
