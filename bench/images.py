"""Turns a bench pair into two real OCI images (tags `old`, `new`) in an OCI layout, and pushes them with skopeo."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import corpus

# `python -m bench.images PAIR [--push HOST[/REPO]] [--cache DIR]`
#
# The layout is written here, not by umoci, for full control: each layer tar is compressed with GNU `gzip -6 -n`
# (no name, no mtime: the same tar always gives the same blob), so the pushed layer size equals the bench's
# "full pull (gzip -6)" number by construction. Compressed blobs are cached once per diff_id in `<cache>/gz/` and
# hard-linked into layouts at `<cache>/oci/<pair>/`. Config `created` dates come from the pair's recipe, so image
# digests are stable across rebuilds of the layout.

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"


def log(msg: str) -> None:
    print(f"[images {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)



def _diff_id(tar: Path) -> str:
    """sha256 of the uncompressed tar (~1 GB/s: cheaper than trusting a side file to still match)."""
    return corpus.sha256_file(tar)


def layer_blob(tar: Path, cache: Path) -> dict:
    """The gzip -6 -n blob of a layer tar (made once per diff_id): {diff_id, digest, size, path, gzip_cpu_s}."""
    diff_id = _diff_id(tar)
    gz_dir = cache / "gz"
    gz_dir.mkdir(parents=True, exist_ok=True)
    meta_path = gz_dir / f"{diff_id.split(':')[1]}.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if Path(meta["path"]).exists():
            return meta
    blob = gz_dir / f"{diff_id.split(':')[1]}.tar.gz"
    tmp = blob.with_name(f".{blob.name}.tmp-{os.getpid()}")
    log(f"gzip -6 -n {tar} ({tar.stat().st_size / 1e6:.1f} MB)")
    t0, c0 = time.monotonic(), os.times()
    with open(tar, "rb") as src, open(tmp, "wb") as dst:
        subprocess.run(["gzip", "-6", "-n", "-c"], stdin=src, stdout=dst, check=True)
    c1 = os.times()
    os.rename(tmp, blob)
    meta = {"diff_id": diff_id, "digest": corpus.sha256_file(blob), "size": blob.stat().st_size, "path": str(blob),
            "tar_bytes": tar.stat().st_size, "gzip_cmd": "gzip -6 -n -c",
            "gzip_cpu_s": round(c1.children_user - c0.children_user + c1.children_system - c0.children_system, 3),
            "gzip_wall_s": round(time.monotonic() - t0, 3)}
    corpus.write_json(meta_path, meta)
    return meta


def _write_blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    p = layout / "blobs" / "sha256" / digest.split(":")[1]
    if not p.exists():
        p.write_bytes(data)
    return digest, len(data)


def _canonical(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def build_oci_image(layers: list[Path], layout: Path, tag: str, cache: Path, *, created: str = "1970-01-01T00:00:00Z",
                    note: str = "") -> dict:
    """Adds image `tag` made of `layers` (uncompressed tars, bottom first) to the OCI layout at `layout`.
    Returns {tag, manifest_digest, manifest_size, config_digest, layers: [layer_blob dicts]}."""
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    blobs = [layer_blob(t, cache) for t in layers]
    for b in blobs:
        dst = layout / "blobs" / "sha256" / b["digest"].split(":")[1]
        if not dst.exists():
            os.link(b["path"], dst)
    config = {
        "created": created, "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/bash"]},
        "rootfs": {"type": "layers", "diff_ids": [b["diff_id"] for b in blobs]},
        "history": [{"created": created, "created_by": f"chunksync bench {note} layer {i}".strip()}
                    for i in range(len(blobs))],
    }
    cfg_digest, cfg_size = _write_blob(layout, _canonical(config))
    manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST,
                "config": {"mediaType": MT_CONFIG, "digest": cfg_digest, "size": cfg_size},
                "layers": [{"mediaType": MT_LAYER_GZIP, "digest": b["digest"], "size": b["size"]} for b in blobs]}
    man_digest, man_size = _write_blob(layout, _canonical(manifest))
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {
        "schemaVersion": 2, "mediaType": MT_INDEX, "manifests": []}
    index["manifests"] = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != tag]
    index["manifests"].append({"mediaType": MT_MANIFEST, "digest": man_digest, "size": man_size,
                               "annotations": {REF_NAME: tag}})
    corpus.write_json(index_path, index)
    return {"tag": tag, "manifest_digest": man_digest, "manifest_size": man_size, "config_digest": cfg_digest,
            "layers": blobs}


def build_pair_images(pair_dir: Path, cache: Path | None = None) -> tuple[Path, dict[str, dict]]:
    """OCI layout at <cache>/oci/<pair> with tags `old` and `new`; returns (layout dir, {tag: image info})."""
    pair_dir = Path(pair_dir)
    cache = cache or pair_dir.parent.parent
    recipe = json.loads((pair_dir / "recipe.json").read_text())
    layout = cache / "oci" / pair_dir.name
    images = {side: build_oci_image(corpus.pair_layers(pair_dir, side), layout, side, cache,
                                    created=recipe["built"], note=f"{pair_dir.name} {side}")
              for side in ("old", "new")}
    return layout, images


def push(layout: Path, tag: str, dest: str) -> None:
    """skopeo copy oci:LAYOUT:TAG docker://DEST:TAG over plain HTTP; --preserve-digests so blobs arrive as built."""
    cmd = ["skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
           f"oci:{layout}:{tag}", f"docker://{dest}:{tag}"]
    log(" ".join(cmd))
    subprocess.run(cmd, check=True)


def build_oci_images(pair_dir: Path, registry_host: str, repo: str | None = None,
                     cache: Path | None = None) -> dict[str, dict]:
    """Builds the pair's two images and pushes them to HOST/REPO:old and :new (REPO defaults to bench/<pair>)."""
    layout, images = build_pair_images(pair_dir, cache)
    dest = f"{registry_host}/{repo or 'bench/' + Path(pair_dir).name}"
    for tag in images:
        push(layout, tag, dest)
        images[tag]["pushed_to"] = f"{dest}:{tag}"
    return images


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.images", description=__doc__)
    ap.add_argument("pair", help="pair name (see pairs.json)")
    ap.add_argument("--push", metavar="HOST[/REPO]", help="push old and new to this registry (plain HTTP)")
    ap.add_argument("--cache", help="cache dir (default $CHUNKSYNC_BENCH_CACHE or ~/.cache/chunksync-bench)")
    a = ap.parse_args(argv)
    cache = corpus.cache_dir(a.cache)
    pair_dir = corpus.ensure_pair(cache, a.pair)
    layout, images = build_pair_images(pair_dir, cache)
    if a.push:
        host, _, repo = a.push.partition("/")
        build_oci_images(pair_dir, host, repo or None, cache)
    for tag, im in images.items():
        sizes = ", ".join(f"{l['size'] / 1e6:.2f} MB" for l in im["layers"])
        print(f"oci:{layout}:{tag}  {im['manifest_digest']}  layers (gzip): {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
