"""`chunksync serve` (run the server beside a registry) and `chunksync index` (index one image ahead of time)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from chunkstore import wire
from chunkstore.oci import InvalidReference, is_loopback_host, parse_image_ref
from chunkstore.store import LocalStore
from client.registry import Manifest, RegistryClient, RegistryError

from .config import ServerConfig, default_store_dir

if TYPE_CHECKING:
    from .indexer import IndexReport


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run the chunksync server next to an OCI registry",
                                  description="Serve diff pulls of the images in REGISTRY (docs/SERVING.md).")
    serve.add_argument("--registry", required=True, metavar="URL", help="the registry, e.g. http://127.0.0.1:5000")
    serve.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT",
                       help="address to listen on (default 127.0.0.1:8080)")
    _common(serve)
    serve.add_argument("--events-token", default=os.environ.get("CHUNKSYNC_EVENTS_TOKEN"), metavar="TOKEN",
                       help="require `Authorization: Bearer TOKEN` on POST /v1/events (env CHUNKSYNC_EVENTS_TOKEN)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--no-deltas", action="store_true",
                       help="send changed content as whole chunks only, never as deltas against a device's old files")
    serve.add_argument("--frame-cache-mb", type=int, default=2048, metavar="MB",
                       help="disk for CHUNKS frames of whole segments, compressed once and sent to every later "
                            "device that lacks them (default 2048; 0: make every frame for its device)")
    serve.add_argument("--request-memory-mb", type=int, default=256, metavar="MB",
                       help="memory for the sync and repair requests being read and planned at once; past it, a "
                            "request waits (up to 30 s, then 503) (default 256; a request holds about twice its "
                            "body, at most 2 x 72 MiB)")
    serve.add_argument("--protocol-versions", type=_versions, default=wire.SUPPORTED_VERSIONS, metavar="LIST",
                       help="speak only these protocol versions, e.g. 1-5 to send no version-6 answers; a device "
                            "asking for another is told the list and asks again (default: all, "
                            f"{wire.spell_versions(wire.SUPPORTED_VERSIONS)})")
    serve.set_defaults(func=run_serve)

    index = subparsers.add_parser("index", help="index an image now and push its chunk index to the registry",
                                  description="Chunk every layer of an image, store the chunks and push the index "
                                              "next to the image, so the first device pull does not wait for it.")
    index.add_argument("image", metavar="REGISTRY/REPO:TAG", help="e.g. 127.0.0.1:5000/library/app:v2 (or @sha256:…)")
    index.add_argument("--registry", metavar="URL",
                       help="registry base URL (default: http:// for loopback hosts, else https://, plus the host)")
    index.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                       help="for an image index: only this platform (default: every platform it lists)")
    _common(index)
    index.add_argument("--json", action="store_true", help="print one JSON object per image, for machines")
    index.set_defaults(func=run_index)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=Path, default=default_store_dir(), metavar="DIR",
                        help=f"the server's chunk store, a cache (default {default_store_dir()})")
    parser.add_argument("--registry-user", default=os.environ.get("CHUNKSYNC_REGISTRY_USER"), metavar="USER",
                        help="the server's registry user, to read blobs and push indexes (env CHUNKSYNC_REGISTRY_USER)")
    parser.add_argument("--registry-password", default=os.environ.get("CHUNKSYNC_REGISTRY_PASSWORD"),
                        metavar="PASSWORD", help="its password (prefer env CHUNKSYNC_REGISTRY_PASSWORD)")
    parser.add_argument("--no-push", action="store_true",
                        help="keep indexes in the local store only (other replicas will compute their own)")


def _fail(command: str, message: str, code: int = 1) -> int:
    print(f"chunksync {command}: error: {message}", file=sys.stderr)
    return code


def _versions(text: str) -> tuple[int, ...]:
    """`1-5`, `4,6` or `2-4,6`: the protocol versions `--protocol-versions` names, each one this server knows."""
    found: set[int] = set()
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        high = high if dash else low
        if not (low.isdigit() and high.isdigit()) or int(low) > int(high):
            raise argparse.ArgumentTypeError(f"{text!r}: write versions as 1-5, 4,6 or 2-4,6")
        found.update(range(int(low), int(high) + 1))
    if not found <= set(wire.SUPPORTED_VERSIONS):
        raise argparse.ArgumentTypeError(f"{text!r}: this server knows protocol versions "
                                         f"{wire.spell_versions(wire.SUPPORTED_VERSIONS)} only")
    return tuple(sorted(found))


def _split_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen wants HOST:PORT, e.g. 127.0.0.1:8080, got {text!r}")
    return host.strip("[]"), int(port)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn  # here, so `chunksync index` does not pay for it

    from .app import create_app
    from .memory import one_arena

    try:
        host, port = _split_listen(args.listen)
        config = ServerConfig(registry_url=args.registry, store_dir=args.store, registry_user=args.registry_user,
                              registry_password=args.registry_password, push_indexes=not args.no_push,
                              events_token=args.events_token, deltas=not args.no_deltas,
                              protocol_versions=args.protocol_versions,
                              frame_cache_bytes=max(0, args.frame_cache_mb) << 20,
                              request_memory_bytes=max(1, args.request_memory_mb) << 20)
    except ValueError as exc:
        return _fail("serve", str(exc), 2)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per registry request drowns what matters; keep them for --log-level debug.
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.log_level == "debug" else logging.WARNING)
    one_arena()  # before create_app starts the indexing thread
    app = create_app(config)
    print(f"chunksync serve: {args.registry} on http://{args.listen}, store {args.store}", file=sys.stderr)
    # No Server or Date header: ~55 bytes per answer that no device reads.
    uvicorn.run(app, host=host, port=port, log_level=args.log_level, access_log=args.log_level == "debug",
                server_header=False, date_header=False)
    return 0


def run_index(args: argparse.Namespace) -> int:
    # Here, not at the top: every `chunksync` command (a device's pull too) imports this module to register its
    # commands, and these bring starlette (~50 ms CPU).
    from .errors import ApiError, as_api_error
    from .indexer import Indexer
    from .metrics import Metrics

    try:
        ref = parse_image_ref(args.image)
    except InvalidReference as exc:
        return _fail("index", f"{exc}; write it as REGISTRY/REPO:TAG, e.g. 127.0.0.1:5000/app:v1", 2)
    url = args.registry or ("http://" if is_loopback_host(ref.registry) else "https://") + ref.registry
    try:
        registry = RegistryClient(url, username=args.registry_user, password=args.registry_password)
    except ValueError as exc:
        return _fail("index", str(exc), 2)
    with registry:
        indexer = Indexer(LocalStore(args.store), registry, Metrics(), push=not args.no_push)
        try:
            for manifest in _images(registry, ref.repository, ref.reference, args.platform):
                report = indexer.ensure(ref.repository, manifest.digest, manifest)
                print(_describe(ref.repository, manifest, report, args.json))
        except (ApiError, RegistryError, ValueError) as exc:
            return _fail("index", as_api_error(exc).message + "; check the image name, --registry and credentials")
    return 0


def _images(registry: RegistryClient, repository: str, reference: str, platform: str | None) -> list[Manifest]:
    if platform:
        return [registry.get_manifest(repository, reference, platform)]
    top = registry.get_raw_manifest(repository, reference)
    if not top.is_index:
        return [registry.get_manifest(repository, reference)]
    # Every platform an index lists; attestation entries (unknown/unknown) are not images.
    platforms = [e["platform"] for e in top.json.get("manifests") or []
                 if isinstance(e.get("platform"), dict) and e["platform"].get("os") not in (None, "unknown")]
    wanted = sorted({"/".join(str(p[k]) for k in ("os", "architecture", "variant") if p.get(k)) for p in platforms})
    return [registry.get_manifest(repository, top.digest, p) for p in wanted]


def _describe(repository: str, manifest: Manifest, report: IndexReport, as_json: bool) -> str:
    index = report.image.index
    chunks = sum(len(layer.header_chunks) + len(layer.chunks) for layer in index.layers)
    size = sum(layer.uncompressed_size for layer in index.layers)
    if as_json:
        return json.dumps({"repository": repository, "manifest_digest": manifest.digest, "source": report.source,
                           "layers": len(index.layers), "chunks": chunks, "uncompressed_bytes": size,
                           "chunked_bytes": report.chunked_bytes, "seconds": round(report.seconds, 3),
                           "pushed_as": report.pushed_as})
    name = f"{repository}@{manifest.digest[:19]}…"
    if report.source != "computed":
        return f"{name}: already indexed (found in the {report.source}), {len(index.layers)} layers, {chunks} chunks"
    speed = report.chunked_bytes / 1e6 / report.seconds if report.seconds else 0.0
    pushed = f"pushed as {report.pushed_as[:19]}…" if report.pushed_as else "NOT pushed (see the log above)"
    return (f"{name}: indexed {len(index.layers)} layers, {size / 1e6:.1f} MB, {chunks} chunks in "
            f"{report.seconds:.2f} s ({speed:.0f} MB/s chunked); {pushed}")
