"""`chunksync pull`: one sync round trip for the chunks the store lacks, a repair round for Bloom false positives,
every layer verified against its diff_id, output written atomically; a plain registry pull when the server fails."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import zstandard

from chunkstore.index import ID_SIZE, ImageIndex, IndexFormatError, LayerIndex, chunk_id, decode_index
from chunkstore.oci import DigestMismatch, ImageRef, is_loopback_host
from chunkstore.reassemble import ReassemblyError, reassemble_to_file, write_layer
from chunkstore.store import CorruptChunk, LocalStore
from chunkstore.delta import DeltaError
from chunkstore.indexdelta import is_placeholder
from chunkstore.wire import (
    FRAME_CHUNKS,
    FRAME_DELTA,
    FRAME_END,
    FRAME_ERROR,
    FRAME_HEADER,
    MAX_REPAIR_IDS,
    PLACEHOLDER_VERSION,
    SUPPORTED_VERSIONS,
    ChunksRequest,
    Frame,
    ProtocolError,
    SyncRequest,
    decode_chunks,
    decode_delta,
    spell_versions,
)
from client.registry import (Forbidden, Manifest, NotFound, PlatformNotFound, RegistryClient, RegistryError,
                             Unauthorized, UntrustedCertificate)

from .auth import Credentials
from .deltas import DeltaApplier, protocol_version
from .fallback import fetch_image, pull_layer
from .haveset import build_have_set
from .layout import LayerBlob, Layout, LayoutTarget, build_manifest
from .progress import ProgressBar
from .server_api import ServerApi, ServerError
from .traffic import CountingTransport, Traffic
from .verify import Image, VerificationError, verify_image, verify_index

# Failures of the server or of what it sent: each one sends the pull to the registry instead.
SERVER_FAILURES = (ServerError, ProtocolError, VerificationError, IndexFormatError)
# A layer that cannot be rebuilt from the store as its index says.
LAYER_FAILURES = (ReassemblyError, CorruptChunk, KeyError)
# zstd level of the chunks a pull stores: level 1 writes 1.3-1.4x faster than 3 for 4-5% more stored bytes (python
# and debian pairs of the bench corpus), and reads as fast.
STORE_LEVEL = 1
# Delta items often share base chunks (one old file is the base of several changed ranges or groups): up to this many
# bytes of checked base chunks are kept instead of read and checked again (python pair: 107 -> 66 MB read).
BASE_CACHE_BYTES = 16 << 20


class PullError(Exception):
    """The pull could not produce a verified image; the message says what to do."""


@dataclass
class PullOptions:
    image: ImageRef
    server: str
    store: Path
    out: LayoutTarget | None = None
    platform: str = "linux/amd64"
    fp_rate: float = 0.01
    plain_http: bool = False
    credentials: Credentials | None = None


@dataclass
class PullReport:
    """What a pull did; `to_json()` is the `--json` object."""
    image: str
    manifest_digest: str = ""
    config_digest: str = ""
    path: str = "diff"                 # diff | repair | fallback | local (the store had the whole image)
    bytes_received: int = 0            # all peers, HTTP lines + headers + bodies (client/traffic.py)
    bytes_sent: int = 0
    full_pull_bytes: int = 0           # sum of the manifest's compressed layer sizes
    seconds: float = 0.0
    chunks_received: int = 0           # verified chunks taken from the server, repair round included
    chunks_rejected: int = 0           # chunks that failed verification on arrival (asked for again)
    repair_chunks: int = 0             # chunks received in the repair round
    chunks_already_held: int = 0       # verified chunks the store already had (sent with a whole segment)
    have_images: int = 0
    bloom_bytes: int = 0
    delta_items: int = 0               # DELTA items applied (changed files and header streams rebuilt from old ones)
    delta_chunks: int = 0              # of chunks_received, those the items delivered
    delta_rejected: int = 0            # items refused or undecodable (their chunks asked for again, plainly)
    index_delta_bytes: int = 0         # the index came as a delta against a held image (0: whole index)
    apply_cpu_s: float = 0.0           # CPU s (this thread) decoding, checking and storing CHUNKS/DELTA frames
    registry_layers: int = 0           # layers pulled plainly from the registry
    layers: int = 0
    output: str | None = None
    fallback_reason: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def saved_percent(self) -> float:
        if not self.full_pull_bytes:
            return 0.0
        return 100.0 * (1 - self.bytes_received / self.full_pull_bytes)

    def to_json(self) -> dict:
        return {**asdict(self), "seconds": round(self.seconds, 3), "apply_cpu_s": round(self.apply_cpu_s, 4),
                "saved_percent": round(self.saved_percent, 2)}


def registry_url(host: str, plain_http: bool) -> str:
    """Loopback registries speak plain HTTP (as docker assumes); elsewhere only with --plain-http."""
    if host == "docker.io":
        host = "registry-1.docker.io"
    return f"{'http' if plain_http or is_loopback_host(host) else 'https'}://{host}"


class _Discard:
    """A sink for layers verified without an output."""

    def write(self, data: bytes) -> int:
        return len(data)


class Pull:
    """One pull: `run()` returns a PullReport or raises PullError; no image is written unless fully verified."""

    def __init__(self, options: PullOptions, progress: ProgressBar | None = None,
                 warn: Callable[[str], None] = lambda message: None) -> None:
        self.options = options
        self.ref = options.image
        self.progress = progress or ProgressBar(enabled=False)
        self._warn = warn
        self.traffic = Traffic()
        self.report = PullReport(image=str(options.image))
        self.store = LocalStore(options.store, level=STORE_LEVEL, read_cache_bytes=BASE_CACHE_BYTES)
        self.dctx = zstandard.ZstdDecompressor()
        creds = options.credentials
        self.registry = RegistryClient(
            registry_url(self.ref.registry, options.plain_http), transport=CountingTransport(self.traffic),
            username=creds.username if creds else None, password=creds.password if creds else None)
        self.api = ServerApi(options.server, self.traffic, creds.basic() if creds else None)
        self.registry_reachable = True
        self.deltas = DeltaApplier(self.store, [])
        self._incomplete: tuple[str, str, bytes, bytes] | None = None  # the record of the image being pulled

    def warn(self, message: str) -> None:
        self.report.warnings.append(message)
        self._warn(message)

    def close(self) -> None:
        self.api.close()
        self.registry.close()
        self.store.close()

    # --- the plan --------------------------------------------------------------------------------------------

    def run(self) -> PullReport:
        start = time.monotonic()
        try:
            expected = self._resolve()
            # Shared, against `store gc`: from the have-set to the last record, this pull relies on chunks gc may
            # delete: its own, stored before a complete record names them, and older images' (delta bases).
            with self.store.lock(on_wait=lambda: self._warn(f"`chunksync store gc` is running on the store at "
                                                            f"{self.store.path}; waiting for it to finish")):
                try:
                    image, index = self._from_store(expected) or self._diff(expected)
                except SERVER_FAILURES as exc:
                    if expected is None:
                        raise PullError(f"the server failed ({exc}) and the registry is unreachable, so there is "
                                        "nothing to fall back to; check both and pull again") from None
                    self.warn(f"server failed: {exc}; pulling plainly from the registry instead")
                    self.report.path, self.report.fallback_reason = "fallback", str(exc)
                    image, index = self._fallback(expected)
                self._write(image, index)
        finally:
            self.progress.finish()
            self.report.seconds = time.monotonic() - start
            self.report.bytes_received, self.report.bytes_sent = self.traffic.received, self.traffic.sent
        return self.report

    def _resolve(self) -> Manifest | None:
        """The image manifest the tag names today, from the registry itself; None if it cannot be reached."""
        repo = self.ref.repository
        try:
            manifest = self.registry.get_manifest(repo, self.ref.reference, self.options.platform)
        except (Unauthorized, Forbidden) as exc:
            raise PullError(f"{exc}. Give registry credentials with --creds USER:PASSWORD, or log in "
                            "(skopeo login) so an auth file has them") from None
        except NotFound:
            raise PullError(f"{self.ref} is not in the registry: check the repository and tag") from None
        except (PlatformNotFound, DigestMismatch, UntrustedCertificate) as exc:
            raise PullError(str(exc)) from None
        except RegistryError as exc:
            if exc.status is not None:
                raise PullError(f"the registry failed: {exc}") from None
            self.registry_reachable = False
            self.warn(f"registry {self.ref.registry} unreachable ({exc}); the server's answer for the tag "
                      "is trusted and there is no fallback")
            return None
        self.report.manifest_digest = manifest.digest
        self.report.full_pull_bytes = sum(int(layer.get("size", 0)) for layer in manifest.layers)
        return manifest

    # --- diff pull -------------------------------------------------------------------------------------------

    def _from_store(self, expected: Manifest | None) -> tuple[Image, ImageIndex] | None:
        """The image itself, when the store already holds it completely: no server needed (path "local")."""
        record = self.store.get_image(self.ref.repository, expected.digest) if expected else None
        if record is None or not record.complete or record.manifest is None or record.config is None:
            return None
        try:
            image = verify_image(self.ref.repository, record.manifest_digest, record.manifest, record.config)
            index = decode_index(record.index_data)
            verify_index(image, index)
        except (VerificationError, IndexFormatError) as exc:
            self.warn(f"the store's record of {self.ref} is damaged ({exc}); asking the server")
            return None
        self.report.path, self.report.config_digest = "local", image.config_digest
        return image, index

    def _diff(self, expected: Manifest | None) -> tuple[Image, ImageIndex]:
        repo = self.ref.repository
        have = build_have_set(self.store, repo, self.options.fp_rate, expected.digest if expected else None)
        self.report.have_images, self.report.bloom_bytes = len(have.images), have.bloom_bytes
        self.deltas = DeltaApplier(self.store, have.images)
        # Ask by digest when the registry told us one: the server then cannot answer for another version.
        reference = expected.digest if expected else self.ref.reference
        request = SyncRequest(repo, reference, self.options.platform, have.images, have.bloom,
                              version=max(self._versions), have_manifest=expected is not None)
        with self._negotiated(self.api.sync, request, "sync request") as frames:
            first = next(frames, None)
            if first is None or first.type != FRAME_HEADER:
                raise self._unexpected(first, "a HEADER frame")
            image, index, index_data = self._accept_header(first.payload, expected)
            lengths = self._lengths(index)
            self.progress.start("pull", sum(lengths[cid] for cid in self._missing(index)))
            try:
                if not self._receive(frames, index):
                    self.warn("the server's answer ended early; asking for what is still missing")
            except (ServerError, ProtocolError) as exc:
                self.warn(f"{exc}; keeping the chunks that arrived and asking for the rest")
        self._repair(index)
        for i, layer in enumerate(index.layers):
            if self._missing_in(layer):
                index.layers[i] = self._layer_from_registry(image, i, index, "its chunks could not be had")
        return image, index

    @functools.cached_property
    def _versions(self) -> tuple[int, ...]:
        """The protocol versions this device speaks: all up to the one it asks for (6 only with GNU gzip)."""
        return tuple(v for v in SUPPORTED_VERSIONS if v <= protocol_version())

    @contextlib.contextmanager
    def _negotiated(self, send: Callable, request: SyncRequest | ChunksRequest, what: str) -> Iterator[Iterator[Frame]]:
        """The frames of `send(request)`; when the server refuses the request's protocol version and says which ones
        it speaks (docs/PROTOCOL.md, "Version negotiation"), the same request once more at the highest both speak."""
        with contextlib.ExitStack() as stack:
            try:
                frames = stack.enter_context(send(request))
            except ServerError as exc:
                version = self._common_version(exc, request.version, what)
                frames = stack.enter_context(send(dataclasses.replace(request, version=version)))
            yield frames

    def _common_version(self, refused: ServerError, asked: int, what: str) -> int:
        if refused.versions is None:
            raise refused
        common = [v for v in refused.versions if v in self._versions]
        if not common:
            if set(refused.versions) & set(SUPPORTED_VERSIONS):
                fix = "install GNU gzip on the device (version 6 needs it)"
            else:
                fix = f"update chunksync on the {'device' if min(refused.versions) > max(self._versions) else 'server'}"
            raise ServerError(f"{refused}; this device speaks protocol versions {spell_versions(self._versions)}, "
                              f"none of them the server's, so no diff pull is possible: {fix}",
                              refused.status, refused.code, refused.versions)
        if max(common) == asked:
            raise refused  # it refused a version it says it speaks: asking again would get the same answer
        self.warn(f"the server does not speak protocol version {asked} (it speaks {spell_versions(refused.versions)}); "
                  f"asking again with the {what} at version {max(common)}, the highest both speak")
        return max(common)

    def _unexpected(self, frame: Frame | None, wanted: str) -> Exception:
        if frame is None:
            return ProtocolError(f"the server's answer was empty, expected {wanted}")
        if frame.type == FRAME_ERROR:
            return ServerError(f"server error {frame.payload.get('code')}: {frame.payload.get('message')}")
        return ProtocolError(f"the server sent frame type {frame.type}, expected {wanted}")

    def _accept_header(self, payload: dict, expected: Manifest | None) -> tuple[Image, ImageIndex, bytes]:
        digest, manifest, config, index_data = (payload.get(k) for k in ("manifest_digest", "manifest", "config",
                                                                         "index"))
        if not (isinstance(digest, str) and isinstance(manifest, bytes) and isinstance(config, bytes)
                and isinstance(index_data, bytes)):
            raise ProtocolError("HEADER frame needs manifest_digest, manifest, config and index")
        if expected is not None and digest != expected.digest:
            raise VerificationError(f"the server answered with {digest}, the registry says {self.ref} is "
                                    f"{expected.digest}")
        if expected is None and self.ref.digest and self.ref.digest not in (digest, payload.get("index_digest")):
            raise VerificationError(f"the server answered with {digest}, not the requested {self.ref.digest}")
        if not manifest and expected is not None:
            manifest = expected.data  # we said have_manifest: the registry's bytes, verified again just below
        image = verify_image(self.ref.repository, digest, manifest, config)
        if "index_delta" in payload:
            index = self._index_from_delta(payload)
            index_data = index.encode()
        else:
            index = decode_index(index_data)
        verify_index(image, index)
        self.report.manifest_digest, self.report.config_digest = digest, image.config_digest
        self.report.full_pull_bytes = image.full_pull_bytes
        if not (record := self.store.get_image(image.repository, digest)) or not record.complete:
            # Recorded before any chunk arrives, so a later store gc keeps an interrupted pull's chunks.
            self.store.put_image(image.repository, digest, index_data, manifest, config, complete=False)
            self._incomplete = (image.repository, digest, manifest, config)
        return image, index, index_data

    def _record_filled(self, index: ImageIndex) -> None:
        """The incomplete record again, with the ids that DELTA items put in place of placeholders (version 7):
        the record names the chunks a later store gc keeps, and it was written with the placeholders."""
        if self._incomplete is not None:
            repository, digest, manifest, config = self._incomplete
            self.store.put_image(repository, digest, index.encode(), manifest, config, complete=False)

    def _index_from_delta(self, payload: dict) -> ImageIndex:
        base = payload.get("index_base")
        if not (isinstance(base, list) and len(base) == 2 and all(isinstance(x, str) for x in base)):
            raise ProtocolError("HEADER frame: index_base must be [repository, manifest digest]")
        delta = payload["index_delta"]
        try:
            index = self.deltas.index((base[0], base[1]), delta)
        except (DeltaError, IndexFormatError) as exc:
            raise ProtocolError(f"the index delta against {base[0]}@{base[1]} is unusable: {exc}") from None
        self.report.index_delta_bytes = len(delta["data"])
        return index

    def _apply_deltas(self, payload: dict, index: ImageIndex, wanted: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
        """The verified chunks of a DELTA frame; refused or undecodable items are asked for again, plainly."""
        base, items = decode_delta(payload)
        good: list[tuple[bytes, bytes]] = []
        for item in items:
            try:
                pairs = self.deltas.apply(base, item, index)
            except DeltaError as exc:
                self.report.delta_rejected += 1
                self.warn(f"a delta item was refused or damaged ({exc}); its chunks will be asked for again")
                continue
            self.report.delta_items += 1
            good += [(cid, data) for cid, data in pairs if cid in wanted or cid in self.deltas.filled]
        return good

    def _receive(self, frames, index: ImageIndex, repair: bool = False) -> bool:
        """Stores every verified chunk of `index` as its frame arrives; True if the answer reached END."""
        wanted = self._lengths(index)
        for frame in self._cpu_between(frames):
            if frame.type == FRAME_END:
                return True
            if frame.type == FRAME_DELTA and not repair:
                filled = len(self.deltas.filled)
                good = self._apply_deltas(frame.payload, index, wanted)
                # Verified against their ids in _apply_deltas. An item may also rebuild chunks the store holds:
                # only those new to it count as received.
                added = self.store.put_many(good, verify=False)
                if len(self.deltas.filled) > filled:
                    self._record_filled(index)
                self.report.chunks_received += added
                self.report.delta_chunks += added
                self.progress.advance(sum(len(data) for _, data in good))
                continue
            if frame.type != FRAME_CHUNKS:
                raise self._unexpected(frame, "CHUNKS or END")
            try:
                pairs = decode_chunks(frame.payload, self.dctx)
            except ProtocolError as exc:
                ids = frame.payload.get("ids")  # a lying frame's ids may be of any type
                self.report.chunks_rejected += len(ids) // ID_SIZE if isinstance(ids, bytes) else 0
                self.warn(f"a CHUNKS frame was damaged ({exc}); its chunks will be asked for again")
                continue
            filled = []
            if repair:  # asked for by placeholder: the chunk's id takes the placeholder's place in the index
                filled = self.deltas.fill(index, [(cid, len(data)) for cid, data in pairs])
                for cid, length in filled:
                    wanted[cid] = length
            good = [(cid, data) for cid, data in pairs if wanted.get(cid) == len(data) and chunk_id(data) == cid]
            if len(good) < len(pairs):
                self.report.chunks_rejected += len(pairs) - len(good)
                self.warn(f"{len(pairs) - len(good)} chunk(s) failed verification and were dropped; "
                          "they will be asked for again")
            # Verified just above (and limited to this image's ids), so the store need not hash them again. A whole
            # segment may bring chunks the Bloom filter rightly claimed: only those new to the store count.
            added = self.store.put_many(good, verify=False)
            if filled:
                self._record_filled(index)
            self.report.chunks_received += added
            self.report.chunks_already_held += len(good) - added
            if repair:
                self.report.repair_chunks += added
            self.progress.advance(sum(len(data) for _, data in good))
        return False

    def _cpu_between(self, frames: Iterator[Frame]) -> Iterator[Frame]:
        """`frames`, adding the CPU spent on each frame (not the wait and parse for the next) to apply_cpu_s."""
        for frame in frames:
            started = time.thread_time()
            yield frame
            self.report.apply_cpu_s += time.thread_time() - started

    def _repair(self, index: ImageIndex) -> None:
        """The second round trip, only when chunks are still missing (Bloom false positives, damage, a cut)."""
        missing = self._missing(index)  # with placeholders no item filled (version 7): the server knows their ids
        if not missing:
            return
        self.report.path = "repair"
        try:
            for start in range(0, len(missing), MAX_REPAIR_IDS):
                ids = b"".join(missing[start:start + MAX_REPAIR_IDS])
                # Version 1 (any server takes it) unless it names placeholders, which only a version-7 server sent.
                named = any(is_placeholder(cid) for cid in missing[start:start + MAX_REPAIR_IDS])
                request = ChunksRequest(self.ref.repository, index.manifest_digest, ids,
                                        PLACEHOLDER_VERSION if named else 1)
                with self._negotiated(self.api.chunks, request, "repair request") as frames:
                    if not self._receive(frames, index, repair=True):
                        self.warn("the server's repair answer ended early")
        except (ServerError, ProtocolError) as exc:
            self.warn(f"repair round failed: {exc}")

    @staticmethod
    def _lengths(index: ImageIndex) -> dict[bytes, int]:
        return {cid: length for layer in index.layers for cid, length in layer.all_chunks()}

    def _missing(self, index: ImageIndex) -> list[bytes]:
        """Ids of the index absent from the store, in index order, each once."""
        ordered = list(self._lengths(index))
        present = self.store.has_many(ordered)
        return [cid for cid in ordered if cid not in present]

    def _missing_in(self, layer: LayerIndex) -> bool:
        ids = layer.chunk_ids()
        return len(self.store.has_many(ids)) < len(ids)

    # --- the registry ----------------------------------------------------------------------------------------

    def _layer_from_registry(self, image: Image, i: int, index: ImageIndex, why: str | None = None) -> LayerIndex:
        """Layer `i` streamed from the registry into the store; `why` is said unless the whole pull is plain."""
        if not self.registry_reachable:
            raise PullError(f"layer {i} of {self.ref}: {why}, and the registry is unreachable; pull again later")
        if why is not None:
            self.warn(f"layer {i}: {why}; pulling it plainly from the registry")
        self.report.path = "fallback"
        self.report.registry_layers += 1
        self.progress.start(f"layer {i}", int(image.layers[i].get("size", 0)))
        self.traffic.on_receive.append(self.progress.advance)
        try:
            return pull_layer(self.registry, image, i, self.store, index.params)
        except (RegistryError, VerificationError) as exc:
            raise PullError(f"layer {i} of {self.ref} from the registry: {exc}") from None
        finally:
            self.traffic.on_receive.remove(self.progress.advance)

    def _fallback(self, expected: Manifest) -> tuple[Image, ImageIndex]:
        """A whole plain pull; the layers are chunked into the store on the way, so the next pull is a diff."""
        try:
            image = fetch_image(self.registry, self.ref.repository, expected)
        except (RegistryError, VerificationError) as exc:
            raise PullError(f"plain pull of {self.ref}: {exc}") from None
        self.report.config_digest = image.config_digest
        index = ImageIndex(image.manifest_digest, [])
        for i in range(len(image.layers)):
            index.layers.append(self._layer_from_registry(image, i, index))
        return image, index

    # --- output ----------------------------------------------------------------------------------------------

    def _write(self, image: Image, index: ImageIndex) -> None:
        """Rebuilds every layer from the store, checking its diff_id, into the layout (or only checks it)."""
        out = self.options.out
        layout = Layout(out.path) if out else None
        for i, layer in enumerate(index.layers):
            try:
                self._emit_layer(layout, layer)
            except LAYER_FAILURES as exc:
                index.layers[i] = self._layer_from_registry(image, i, index, f"rebuilding it failed ({exc})")
                try:
                    self._emit_layer(layout, index.layers[i])
                except LAYER_FAILURES as again:
                    raise PullError(f"layer {i} of {self.ref} fails verification even from the registry: "
                                    f"{again}") from None
        if layout is not None and out is not None:
            layout.put_blob(image.config)
            manifest = build_manifest(image.config, [LayerBlob(l.diff_id, l.uncompressed_size) for l in index.layers])
            tag = out.tag or self.ref.tag or "latest"
            layout.tag_manifest(manifest, tag)
            self.report.output = f"oci:{out.path}:{tag}"
        self.store.put_image(image.repository, image.manifest_digest, index.encode(), image.manifest, image.config,
                             complete=True)
        self.report.layers = len(index.layers)

    def _emit_layer(self, layout: Layout | None, layer: LayerIndex) -> None:
        # LocalStore.get checks each chunk against its id (and drops a damaged one): hashing it again here took
        # 0.06 s a 121 MB layer.
        if layout is None:
            write_layer(layer, self.store.get, _Discard(), verify_chunks=False)  # type: ignore[arg-type]
        elif not layout.has_blob(layer.diff_id, layer.uncompressed_size):
            reassemble_to_file(layer, self.store.get, layout.blob_path(layer.diff_id), verify_chunks=False)
