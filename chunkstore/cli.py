"""`chunksync chunk` (how a layer blob chunks, and what a store already holds of it) and
`chunksync store stats|verify|gc` (the local store), registered through the chunksync.commands entry point."""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from . import oci
from .index import ImageIndex, LayerIndex, index_layer
from .layers import GZIP, NONE, ZSTD, LayerFormatError
from .retention import GC_WAIT, prune
from .store import ChunkWriter, LocalStore, StoreBusy, StoreError, default_store_path

_MEDIA_TYPE_OF = {GZIP: oci.OCI_LAYER_GZIP, ZSTD: oci.OCI_LAYER_ZSTD, NONE: oci.OCI_LAYER_TAR}


def register(subparsers: argparse._SubParsersAction) -> None:
    chunk = subparsers.add_parser(
        "chunk", help="index one layer blob: compression, sizes, digests, chunks, and what a store already has",
        description="Read a layer blob (tar, tar+gzip, tar+zstd) once, split it tar-aware into chunks and report "
                    "what its chunk index holds. With --store, also how much of it that store already has.")
    chunk.add_argument("file", type=Path, metavar="FILE", help="a layer blob, e.g. from an OCI layout's blobs/")
    chunk.add_argument("--media-type", metavar="TYPE",
                       help="the layer's media type; the blob's first bytes must agree (default: decided by them)")
    chunk.add_argument("--store", type=Path, metavar="DIR",
                       help="compare with this store (with --add and no --store: the default store)")
    chunk.add_argument("--add", action="store_true", help="put the layer's chunks into the store")
    chunk.add_argument("--json", action="store_true", help="print one JSON object instead")
    chunk.set_defaults(func=run_chunk)

    store = subparsers.add_parser("store", help="the local chunk store: stats, verify, gc",
                                  description="Inspect and maintain the local chunk store.")
    actions = store.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    for name, func, text in (("stats", run_stats, "chunks, images and sizes"),
                             ("verify", run_verify, "read every chunk back; remove and list the corrupt ones"),
                             ("gc", run_gc, "keep the newest images of each repository and delete every chunk "
                                            "their indexes do not name (also chunks added by `chunk --add`); "
                                            "safe while pulls run: gc waits for them to finish, pulls started "
                                            "meanwhile wait for gc")):
        action = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        action.add_argument("--store", type=Path, metavar="DIR",
                            help=f"the store (default $CHUNKSYNC_STORE or {default_store_path()})")
        action.add_argument("--json", action="store_true", help="print one JSON object instead")
        action.set_defaults(func=func)
        if name == "gc":
            action.add_argument("--keep", type=_count, required=True, metavar="N",
                                help="images to keep per repository (the N most recently added)")
            action.add_argument("--wait", type=_seconds, default=GC_WAIT, metavar="SECONDS",
                                help="how long to wait for pulls using the store to finish before giving up, "
                                     f"deleting nothing (default {GC_WAIT:g})")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"want a whole number 0 or more, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"want a number of seconds 0 or more, got {text!r}")
    return value


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _say(command: str, message: str) -> None:
    print(f"chunksync {command}: {message}", file=sys.stderr)


def _fail(command: str, message: str, code: int = 1) -> int:
    _say(command, message)
    return code


def _open_store(path: Path | None, create: bool) -> LocalStore:
    path = path or default_store_path()
    if not create and not (path / "store.db").exists():
        raise StoreError(f"no store at {path}: pull an image or run `chunksync chunk FILE --add --store {path}` "
                         "first, or name another with --store")
    return LocalStore(path)


# --- chunk ------------------------------------------------------------------------------------------------

def run_chunk(args: argparse.Namespace) -> int:
    try:
        blob = open(args.file, "rb")
    except OSError as exc:
        return _fail("chunk", f"cannot read {args.file}: {exc.strerror}", 2)
    try:
        store = _open_store(args.store, create=args.add) if args.store or args.add else None
        # No image names the chunks --add stores: a gc meanwhile would delete them as they go in.
        lock = store.lock(on_wait=lambda: _say("chunk", f"waiting for `store gc` on {store.path} to finish")) \
            if args.add and store is not None else nullcontext()
        with blob, lock:
            report = _chunk(blob, args.media_type, store, args.add)
    except LayerFormatError as exc:
        return _fail("chunk", f"{args.file}: {exc}. Is it a layer blob? Check --media-type")
    except StoreError as exc:
        return _fail("chunk", str(exc))
    report = {"file": str(args.file), **report}
    if args.json:
        print(json.dumps(report))
    else:
        _print_chunk(report)
    return 0


def _chunk(blob: Any, media_type: str | None, store: LocalStore | None, add: bool) -> dict[str, Any]:
    writer = ChunkWriter(store) if add and store is not None else None
    start = time.perf_counter()
    layer = index_layer(blob, media_type or "", on_chunk=writer)
    added = writer.flush() if writer else 0
    seconds = time.perf_counter() - start
    layer.media_type = media_type or _MEDIA_TYPE_OF[layer.compression]
    report = _layer_report(layer, seconds)
    if store is not None:
        unique = {cid: n for cid, n in layer.all_chunks()}
        if add:  # what was there before is what put_many found already present
            had, had_bytes = len(unique) - added, None
        else:
            present = store.has_many(unique)
            had, had_bytes = len(present), sum(unique[cid] for cid in present)
        report["store"] = {"path": str(store.path), "unique_chunks": len(unique), "chunks_present": had,
                           "bytes_present": had_bytes, "chunks_added": added}
    return report


def _layer_report(layer: LayerIndex, seconds: float) -> dict[str, Any]:
    contents = len(layer.chunks)
    return {
        "media_type": layer.media_type, "compression": layer.compression,
        "size": layer.size, "uncompressed_size": layer.uncompressed_size,
        "digest": layer.digest, "diff_id": layer.diff_id,
        "files": sum(1 for _, content in layer.run_pairs() if content),
        "content_chunks": contents, "header_chunks": len(layer.header_chunks),
        "avg_content_chunk": layer.chunks.total() // contents if contents else 0,
        "index_bytes": len(ImageIndex(layer.digest, [layer]).encode()),
        "seconds": round(seconds, 3),
        "mb_per_s": round(layer.uncompressed_size / 1e6 / seconds, 1) if seconds else None,
    }


def _print_chunk(r: dict[str, Any]) -> None:
    ratio = f", {r['size'] / r['uncompressed_size']:.0%} of uncompressed" if r["uncompressed_size"] else ""
    print(f"{r['file']}: {r['compression']}, {_mb(r['size'])} compressed, "
          f"{_mb(r['uncompressed_size'])} uncompressed{ratio}")
    print(f"  media type  {r['media_type']}")
    print(f"  digest      {r['digest']}")
    print(f"  diff_id     {r['diff_id']}")
    print(f"  files       {r['files']:,} (runs with content)")
    print(f"  chunks      {r['content_chunks']:,} content (avg {r['avg_content_chunk'] / 1e3:,.1f} kB) "
          f"+ {r['header_chunks']:,} header")
    share = f" ({r['index_bytes'] / r['uncompressed_size']:.2%} of uncompressed)" if r["uncompressed_size"] else ""
    print(f"  index       {r['index_bytes'] / 1e3:,.1f} kB{share}")
    speed = f", {r['mb_per_s']:,.1f} MB/s" if r["mb_per_s"] else ""
    print(f"  time        {r['seconds']:.2f} s{speed}")
    store = r.get("store")
    if store:
        unique = store["unique_chunks"]
        had = store["chunks_present"]
        share = f"{had / unique:.0%}" if unique else "-"
        line = f"  store       {store['path']}: already had {had:,} of {unique:,} distinct chunks ({share}"
        line += f", {_mb(store['bytes_present'])})" if store["bytes_present"] is not None else ")"
        if store["chunks_added"] or had < unique:
            line += f"; added {store['chunks_added']:,}" if store["chunks_added"] else "; add them with --add"
        print(line)


# --- store stats | verify | gc ------------------------------------------------------------------------------

def run_stats(args: argparse.Namespace) -> int:
    try:
        store = _open_store(args.store, create=False)
        stats = store.stats()
        complete = len(store.images(complete_only=True))
    except StoreError as exc:
        return _fail("store stats", str(exc))
    ratio = stats.stored_bytes / stats.uncompressed_bytes if stats.uncompressed_bytes else None
    if args.json:
        print(json.dumps({"path": str(store.path), "chunks": stats.chunks, "images": stats.images,
                          "complete_images": complete, "stored_bytes": stats.stored_bytes,
                          "uncompressed_bytes": stats.uncompressed_bytes, "ratio": ratio}))
        return 0
    print(f"store {store.path}")
    print(f"  chunks  {stats.chunks:,}: {_mb(stats.uncompressed_bytes)} uncompressed, {_mb(stats.stored_bytes)} "
          f"stored" + (f" ({ratio:.0%})" if ratio is not None else ""))
    print(f"  images  {stats.images:,} ({complete:,} complete)")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    try:
        store = _open_store(args.store, create=False)
        checked = store.count()
        bad = store.verify(repair=True)
    except StoreError as exc:
        return _fail("store verify", str(exc))
    if args.json:
        print(json.dumps({"path": str(store.path), "chunks": checked, "bad": [cid.hex() for cid in bad]}))
    elif not bad:
        print(f"store {store.path}: all {checked:,} chunks read back and match their ids")
    else:
        print(f"store {store.path}: {len(bad):,} of {checked:,} chunks were corrupt and have been removed; "
              "the next pull fetches them again:")
        for cid in bad:
            print(f"  {cid.hex()}")
    return 1 if bad else 0


def run_gc(args: argparse.Namespace) -> int:
    try:
        store = _open_store(args.store, create=False)
        waiting = (f"a pull, a chunksync server or another writer is using the store at {store.path}; "
                   f"waiting up to {args.wait:g} s")
        result = prune(store, args.keep, args.wait, on_wait=lambda: _say("store gc", waiting))
    except StoreBusy as exc:
        return _fail("store gc", f"{exc}; gc waited {args.wait:g} s and deleted nothing. Run it again when the pull "
                                 "(or answer) has finished, or wait longer with --wait SECONDS")
    except StoreError as exc:
        return _fail("store gc", str(exc))
    if args.json:
        print(json.dumps({"path": str(store.path), "keep": args.keep, "images_kept": result.images_kept,
                          "images_dropped": [f"{r.repository}@{r.manifest_digest}" for r in result.images_dropped],
                          "chunks_deleted": result.chunks_deleted, "stored_bytes_freed": result.stored_bytes_freed,
                          "uncompressed_bytes_freed": result.uncompressed_bytes_freed}))
        return 0
    print(f"store {store.path}: kept {result.images_kept:,} images ({args.keep} per repository), "
          f"dropped {len(result.images_dropped):,}")
    for record in result.images_dropped:
        print(f"  dropped {record.repository}@{record.manifest_digest}")
    print(f"  deleted {result.chunks_deleted:,} chunks, freed {_mb(result.stored_bytes_freed)} "
          f"({_mb(result.uncompressed_bytes_freed)} uncompressed)")
    return 0
