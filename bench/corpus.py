"""Builds the bench corpus: pairs of real image versions (old, new) as uncompressed layer tars,
cached outside the repo with a recipe of how each was made."""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

# `python -m bench.corpus [--only NAME] [--cache DIR] [--list]`; see `pairs.json` in the cache for what was built.
#
# Cache layout (default ~/.cache/chunksync-bench, env CHUNKSYNC_BENCH_CACHE):
#     trees/<name>/            root file trees the tars are made from (debian-old, debian-new, python-old, ...)
#     trees/<name>.json        how each tree was made (commands, versions, date)
#     tars/<layer-key>.tar     each distinct layer tar once (+ .json: command, bytes, diff_id); pairs hard-link them
#     pairs/<pair>/old/layers/N.tar, pairs/<pair>/new/layers/N.tar   layer N of each version, bottom layer first
#     pairs/<pair>/recipe.json how the pair was made (commands, package versions, dates, sizes, sha256 = diff_ids)
#     pairs.json               manifest: every built pair with a short description and its layer files
#     gz/, oci/<pair>/         gzip -6 -n layer blobs and OCI layouts (bench.images)
#     baselines/<key>.json     one measured row of a baseline delta tool (bench.baselines)
# Every step builds into a temp name next to its target and renames it into place, so a re-run skips what exists
# and an interrupted run leaves no half-built result behind.
#
# Layer tars are GNU tar, `--format=gnu --numeric-owner`, member names without a leading "./", made from a file list
# that this module writes: depth-first, parents before children, siblings in byte order (exactly the order GNU tar
# `--sort=name` produces), fed with `--no-recursion --null -T`. The contents of dev/, proc/ and sys/ are left out,
# as in real base images. Only the `-reorder` pair changes that order.

MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"

# Python app dependency set, all wheels pinned and installed with --no-deps so the tree is reproducible.
# old = late 2023 releases, new = spring 2024: the patch/minor bumps a maintained app would take.
PY_OLD = {
    "flask": "3.0.0", "werkzeug": "3.0.1", "jinja2": "3.1.2", "markupsafe": "2.1.3", "itsdangerous": "2.1.2",
    "click": "8.1.7", "blinker": "1.7.0", "requests": "2.31.0", "urllib3": "2.1.0", "idna": "3.6",
    "charset-normalizer": "3.3.2", "certifi": "2023.11.17", "sqlalchemy": "2.0.23", "greenlet": "3.0.1",
    "alembic": "1.13.0", "mako": "1.3.0", "pydantic": "2.5.2", "pydantic-core": "2.14.5",
    "typing-extensions": "4.8.0", "annotated-types": "0.6.0", "pyyaml": "6.0.1", "python-dateutil": "2.8.2",
    "six": "1.16.0", "gunicorn": "21.2.0", "packaging": "23.2", "cryptography": "41.0.7", "cffi": "1.16.0",
    "pycparser": "2.21",
}
PY_NEW = dict(PY_OLD, **{
    "flask": "3.0.3", "werkzeug": "3.0.2", "jinja2": "3.1.3", "markupsafe": "2.1.5", "urllib3": "2.2.1",
    "certifi": "2024.2.2", "sqlalchemy": "2.0.29", "greenlet": "3.0.3", "alembic": "1.13.1", "mako": "1.3.2",
    "pydantic": "2.6.4", "pydantic-core": "2.16.3", "typing-extensions": "4.10.0", "python-dateutil": "2.9.0.post0",
    "packaging": "24.0", "cryptography": "42.0.5", "pycparser": "2.22",
})

# A small Node app with exact top-level versions. Transitive deps resolve to the newest in-range release at build
# time (the lock is recorded in recipe.json). npm's --before cannot pin them here: the registry this machine reaches
# reports re-ingestion dates, not publish dates, in its `time` metadata.
NODE_OLD = {"deps": {
    "express": "4.18.2", "body-parser": "1.20.2", "axios": "1.6.2", "lodash": "4.17.21", "dayjs": "1.11.10",
    "uuid": "9.0.1", "jsonwebtoken": "9.0.2", "dotenv": "16.3.1", "winston": "3.11.0", "commander": "11.1.0",
    "chalk": "4.1.2", "yaml": "2.3.4", "pg": "8.11.3", "joi": "17.11.0",
}}
NODE_NEW = {"deps": dict(NODE_OLD["deps"], **{
    "express": "4.19.2", "axios": "1.6.8", "dotenv": "16.4.5", "winston": "3.13.0",
    "commander": "12.0.0", "yaml": "2.4.1", "pg": "8.11.5", "joi": "17.12.3",
})}

EXCLUDE_CONTENTS = {"dev", "proc", "sys"}  # kept as empty dirs, like real base images
REORDER_SEED = 20240601
MTIME_REBUILD = "2024-06-01T12:00:00Z"  # the "rebuild" date every member of debian-mtime's new layer gets


def log(msg: str) -> None:
    print(f"[corpus {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cache_dir(arg: str | None = None) -> Path:
    d = Path(arg or os.environ.get("CHUNKSYNC_BENCH_CACHE") or Path.home() / ".cache" / "chunksync-bench")
    d.mkdir(parents=True, exist_ok=True)
    return d


def utcnow() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def run(cmd: list[str], log_cmds: list | None = None, quiet: bool = False, **kw) -> subprocess.CompletedProcess:
    """Runs cmd, failing loudly; `quiet` hides its output unless it fails (pip and npm are chatty here)."""
    if log_cmds is not None:
        log_cmds.append(" ".join(cmd))
    if not quiet:
        return subprocess.run(cmd, check=True, **kw)
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-4000:] + r.stderr[-4000:])
        raise subprocess.CalledProcessError(r.returncode, cmd)
    return r


def atomic_build(target: Path, build: Callable[[Path], None]) -> bool:
    """Builds `target` (file or dir) via a temp path next to it, then renames; False when it already existed."""
    if target.exists():
        return False
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()
    t0 = time.monotonic()
    try:
        build(tmp)
        os.rename(tmp, target)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise
    log(f"built {target} in {time.monotonic() - t0:.1f}s")
    return True


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.rename(tmp, path)


def tree_size(root: Path) -> tuple[int, int]:
    """(bytes of regular files, number of entries) without following symlinks."""
    total = n = 0
    for dirpath, dirs, files in os.walk(root):
        n += len(dirs) + len(files)
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            if not os.path.islink(os.path.join(dirpath, f)):
                total += st.st_size
    return total, n


# ---------------------------------------------------------------- trees

def _chroot_env() -> dict:
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C",
            "HOME": "/root"}


def _dpkg_versions(root: Path) -> dict[str, str]:
    out = subprocess.run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f", "${Package} ${Version}\n"],
                         check=True, capture_output=True, text=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if line)


def _clean_apt(root: Path, cmds: list) -> None:
    # What real images do at the end of an apt layer: no package lists, no .deb cache.
    cmds.append("rm -rf var/lib/apt/lists/* var/cache/apt/*.bin var/cache/apt/archives/*.deb")
    for pat in ("var/lib/apt/lists/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb",
                "var/cache/apt/archives/partial/*"):
        for p in root.glob(pat):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def build_debian_old(tmp: Path) -> dict:
    cmds: list[str] = []
    log(f"debootstrap --variant=minbase {SUITE} (a few minutes)")
    run(["debootstrap", "--variant=minbase", SUITE, str(tmp), MIRROR], cmds, stdout=subprocess.DEVNULL)
    _clean_apt(tmp, cmds)
    return {"commands": cmds, "packages": _dpkg_versions(tmp)}


def build_debian_new(old: Path, tmp: Path) -> dict:
    cmds: list[str] = []
    log(f"copying {old.name} and running apt-get upgrade in a chroot (bookworm-updates + bookworm-security)")
    run(["cp", "-a", str(old), str(tmp)], cmds)
    (tmp / "etc/apt/sources.list").write_text(
        f"deb {MIRROR} {SUITE} main\n"
        f"deb {MIRROR} {SUITE}-updates main\n"
        f"deb http://deb.debian.org/debian-security {SUITE}-security main\n")
    cmds.append("write etc/apt/sources.list: bookworm, bookworm-updates, bookworm-security (main)")
    # The chroot needs DNS and /proc; both are undone afterwards so only the upgrade's own changes remain.
    resolv = tmp / "etc/resolv.conf"
    saved = resolv.read_bytes() if resolv.exists() and not resolv.is_symlink() else None
    shutil.copyfile("/etc/resolv.conf", resolv)
    run(["mount", "-t", "proc", "proc", str(tmp / "proc")], cmds)
    try:
        env = _chroot_env()
        run(["chroot", str(tmp), "apt-get", "update", "-qq"], cmds, env=env)
        run(["chroot", str(tmp), "apt-get", "upgrade", "-y", "-qq", "-o", "Dpkg::Options::=--force-confold"],
            cmds, env=env, quiet=True)
        run(["chroot", str(tmp), "apt-get", "clean"], cmds, env=env)
    finally:
        subprocess.run(["umount", str(tmp / "proc")], check=False)
    if saved is None:
        resolv.unlink()
    else:
        resolv.write_bytes(saved)
    _clean_apt(tmp, cmds)
    old_v, new_v = _dpkg_versions(old), _dpkg_versions(tmp)
    upgraded = {p: [old_v.get(p), v] for p, v in new_v.items() if old_v.get(p) != v}
    log(f"apt-get upgrade changed {len(upgraded)} packages")
    return {"commands": cmds, "packages": new_v, "upgraded": upgraded}


def build_python(pins: dict[str, str], tmp: Path) -> dict:
    cmds: list[str] = []
    tmp.mkdir()
    spec = [f"{k}=={v}" for k, v in sorted(pins.items())]
    log(f"pip install --target ({len(spec)} pinned wheels)")
    run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--no-compile",
         "--only-binary=:all:", "--target", str(tmp / "site-packages"), *spec], cmds, quiet=True)
    return {"commands": cmds, "packages": dict(sorted(pins.items())),
            "python": ".".join(map(str, sys.version_info[:3]))}


def build_node(spec: dict, tmp: Path) -> dict:
    cmds: list[str] = []
    tmp.mkdir()
    pkg = {"name": "bench-app", "version": "1.0.0", "private": True, "dependencies": spec["deps"]}
    (tmp / "package.json").write_text(json.dumps(pkg, indent=2) + "\n")
    log(f"npm install ({len(spec['deps'])} exact deps)")
    run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cmds, cwd=tmp, quiet=True)
    lock = json.loads((tmp / "package-lock.json").read_text())
    resolved = {k.removeprefix("node_modules/"): v.get("version") for k, v in lock.get("packages", {}).items() if k}
    return {"commands": cmds, "packages": dict(sorted(resolved.items())), "package_json": pkg,
            "node": subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip(),
            "npm": subprocess.run(["npm", "--version"], capture_output=True, text=True).stdout.strip()}


def ensure_tree(cache: Path, name: str, build: Callable[[Path], dict]) -> Path:
    target = cache / "trees" / name
    target.parent.mkdir(exist_ok=True)
    info: dict = {}

    def _b(tmp: Path) -> None:
        info.update(build(tmp))

    if atomic_build(target, _b):
        size, n = tree_size(target)
        write_json(cache / "trees" / f"{name}.json",
                   {"tree": name, "built": utcnow(), "file_bytes": size, "entries": n, **info})
    return target


# ---------------------------------------------------------------- tars

def member_list(root: Path, shuffle_seed: int | None = None) -> list[str]:
    """Member names in GNU tar --sort=name order (parents first, siblings by bytes); with a seed, siblings are
    shuffled instead, as a different filesystem's readdir order would give them."""
    rng = random.Random(shuffle_seed) if shuffle_seed is not None else None
    out: list[str] = []

    def walk(rel: str) -> None:
        names = sorted(os.listdir(os.path.join(root, rel) if rel else root), key=os.fsencode)
        if rng is not None:
            rng.shuffle(names)
        for name in names:
            p = f"{rel}/{name}" if rel else name
            out.append(p)
            full = os.path.join(root, p)
            if os.path.isdir(full) and not os.path.islink(full) and not (not rel and name in EXCLUDE_CONTENTS):
                walk(p)

    walk("")
    return out


def make_tar(root: Path, out: Path, *, shuffle_seed: int | None = None, mtime: str | None = None,
             prefix: str | None = None, cmds: list | None = None) -> None:
    """Tars the tree at `root` into `out` (atomically). `prefix` places it under a directory (e.g. opt/app),
    `mtime` overrides every member's mtime (GNU tar --mtime, as a non-reproducible rebuild would differ)."""
    staging = None
    tar_root = root
    if prefix:
        # A hard-linked copy under the prefix (cp -al keeps every inode, mode, owner and mtime) instead of
        # --transform, because the prefix's parent directories must be members too.
        prefix = prefix.strip("/")
        staging = out.with_name(f".{out.name}.stage-{os.getpid()}")
        if staging.exists():
            shutil.rmtree(staging)
        (staging / prefix).parent.mkdir(parents=True)
        run(["cp", "-al", str(root), str(staging / prefix)], cmds)
        st = root.stat()
        for parent in (staging / prefix).relative_to(staging).parents:
            if str(parent) != ".":
                os.utime(staging / parent, (st.st_mtime, st.st_mtime))
        tar_root = staging
    names = member_list(tar_root, shuffle_seed)
    listing = out.with_name(f".{out.name}.list-{os.getpid()}")
    listing.write_bytes(b"".join(os.fsencode(n) + b"\0" for n in names))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    cmd = ["tar", "--create", "--file", str(tmp), "--directory", str(tar_root), "--format=gnu", "--numeric-owner",
           "--no-recursion", "--null", "--files-from", str(listing)]
    if mtime:
        cmd.append(f"--mtime={mtime}")
    try:
        run(cmd, cmds)
        os.rename(tmp, out)
    finally:
        listing.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------- pairs

class Layer:
    """One layer tar: a tree plus how it is tarred. Equal layers are made once (tars/) and hard-linked into pairs."""

    def __init__(self, tree: str, *, prefix: str | None = None, mtime: str | None = None,
                 shuffle_seed: int | None = None):
        self.tree, self.prefix, self.mtime, self.shuffle_seed = tree, prefix, mtime, shuffle_seed

    def key(self) -> str:
        k = self.tree
        if self.prefix:
            k += "@" + self.prefix.strip("/").replace("/", "_")
        if self.mtime:
            k += "+mtime" + self.mtime.replace(":", "").replace("-", "")
        if self.shuffle_seed is not None:
            k += f"+shuffle{self.shuffle_seed}"
        return k

    def options(self) -> dict:
        return {k: v for k, v in (("prefix", self.prefix), ("mtime", self.mtime),
                                  ("shuffle_seed", self.shuffle_seed)) if v is not None}


APP = "opt/app"
PAIRS: dict[str, dict] = {
    "debian": {
        "description": "Debian bookworm minbase (debootstrap) -> same after apt-get upgrade with "
                       "bookworm-updates + bookworm-security: a real base-image security update",
        "old": [Layer("debian-old")], "new": [Layer("debian-new")]},
    "python": {
        "description": "pip --target /opt/app/site-packages of a Flask/SQLAlchemy/pydantic/cryptography app, "
                       "late-2023 pins -> spring-2024 pins (minor/patch bumps)",
        "old": [Layer("python-old", prefix=APP)], "new": [Layer("python-new", prefix=APP)]},
    "node": {
        "description": "npm install of an express app's deps into /opt/app (exact top-level versions, "
                       "transitive deps newest in range), early-2024 pins -> spring-2024 pins",
        "old": [Layer("node-old", prefix=APP)], "new": [Layer("node-new", prefix=APP)]},
    "debian-mtime": {
        "description": "debian old layer -> same files re-tarred with every mtime changed "
                       f"(tar --mtime={MTIME_REBUILD}): a non-reproducible rebuild",
        "old": [Layer("debian-old")], "new": [Layer("debian-old", mtime=MTIME_REBUILD)]},
    "debian-reorder": {
        "description": "debian old layer -> same members in a different order (siblings shuffled with "
                       f"seed {REORDER_SEED}, parents still first): a rebuild on another filesystem",
        "old": [Layer("debian-old")], "new": [Layer("debian-old", shuffle_seed=REORDER_SEED)]},
    "debian-extra-layer": {
        "description": "debian old layer alone -> same base layer + a second layer with the python app "
                       "(old pins) under /opt/app",
        "old": [Layer("debian-old")], "new": [Layer("debian-old"), Layer("python-old", prefix=APP)]},
}

CONVENTION = ("each pair dir holds old/layers/N.tar and new/layers/N.tar, N = 0 for the bottom layer; "
              "uncompressed GNU tar (--format=gnu --numeric-owner, --sort=name order, no './' prefix)")


def tree_builders(cache: Path) -> dict[str, Callable[[Path], dict]]:
    return {
        "debian-old": build_debian_old,
        "debian-new": lambda tmp: build_debian_new(ensure_tree(cache, "debian-old", build_debian_old), tmp),
        "python-old": lambda tmp: build_python(PY_OLD, tmp),
        "python-new": lambda tmp: build_python(PY_NEW, tmp),
        "node-old": lambda tmp: build_node(NODE_OLD, tmp),
        "node-new": lambda tmp: build_node(NODE_NEW, tmp),
    }


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def ensure_layer(cache: Path, layer: Layer) -> tuple[Path, dict]:
    tree = ensure_tree(cache, layer.tree, tree_builders(cache)[layer.tree])
    out = cache / "tars" / f"{layer.key()}.tar"
    meta_path = out.with_suffix(".json")
    out.parent.mkdir(exist_ok=True)
    if not out.exists() or not meta_path.exists():
        cmds: list[str] = []
        log(f"tar {layer.key()}")
        t0 = time.monotonic()
        out.unlink(missing_ok=True)
        make_tar(tree, out, shuffle_seed=layer.shuffle_seed, mtime=layer.mtime, prefix=layer.prefix, cmds=cmds)
        # The member list is written by this module; record the tar command with a placeholder for it.
        cmds = [c.replace(str(out.parent), "tars") for c in cmds]
        meta = {"tar": out.name, "tree": layer.tree, "options": layer.options(), "commands": cmds,
                "bytes": out.stat().st_size, "diff_id": sha256_file(out), "built": utcnow()}
        write_json(meta_path, meta)
        log(f"  {out.name}: {meta['bytes'] / 1e6:.1f} MB in {time.monotonic() - t0:.1f}s")
    return out, json.loads(meta_path.read_text())


def ensure_pair(cache: Path, name: str) -> Path:
    spec = PAIRS[name]
    target = cache / "pairs" / name
    target.parent.mkdir(exist_ok=True)
    if target.exists():
        log(f"pair {name}: cached")
        return target
    built = {side: [ensure_layer(cache, layer) for layer in spec[side]] for side in ("old", "new")}

    def _b(tmp: Path) -> None:
        recipe = {"pair": name, "description": spec["description"], "built": utcnow(), "convention": CONVENTION,
                  "layers": {}, "trees": {}}
        for side, layers in built.items():
            (tmp / side / "layers").mkdir(parents=True)
            recipe["layers"][side] = []
            for i, (tar, meta) in enumerate(layers):
                os.link(tar, tmp / side / "layers" / f"{i}.tar")  # same layer in several pairs: one copy on disk
                recipe["layers"][side].append({"file": f"{side}/layers/{i}.tar", **meta})
                recipe["trees"][meta["tree"]] = json.loads((cache / "trees" / f"{meta['tree']}.json").read_text())
        write_json(tmp / "recipe.json", recipe)

    atomic_build(target, _b)
    return target


def write_manifest(cache: Path) -> Path:
    pairs = []
    for name in PAIRS:
        rp = cache / "pairs" / name / "recipe.json"
        if not rp.exists():
            continue
        r = json.loads(rp.read_text())
        pairs.append({"name": name, "description": r["description"], "dir": f"pairs/{name}",
                      **{side: [{"file": l["file"], "bytes": l["bytes"], "diff_id": l["diff_id"]}
                                for l in r["layers"][side]] for side in ("old", "new")}})
    out = cache / "pairs.json"
    write_json(out, {"convention": CONVENTION, "updated": utcnow(), "pairs": pairs})
    return out


def pair_layers(pair_dir: Path, side: str) -> list[Path]:
    """The layer tars of one side ('old' or 'new') of a pair, bottom first."""
    d = Path(pair_dir) / side / "layers"
    return sorted(d.glob("*.tar"), key=lambda p: int(p.stem))


def build(cache: Path, only: list[str] | None = None) -> Path:
    names = only or list(PAIRS)
    for n in names:
        if n not in PAIRS:
            raise SystemExit(f"unknown pair {n!r}; known: {', '.join(PAIRS)}")
    for n in names:
        ensure_pair(cache, n)
    return write_manifest(cache)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.corpus", description=__doc__)
    ap.add_argument("--only", action="append", metavar="NAME",
                    help=f"build only this pair (repeatable): {', '.join(PAIRS)}")
    ap.add_argument("--cache", help="cache dir (default $CHUNKSYNC_BENCH_CACHE or ~/.cache/chunksync-bench)")
    ap.add_argument("--list", action="store_true", help="print the pairs and exit")
    a = ap.parse_args(argv)
    if a.list:
        for n, s in PAIRS.items():
            print(f"{n:20} {s['description']}")
        return 0
    if os.geteuid() != 0 and (not a.only or any(n.startswith("debian") for n in a.only)):
        log("warning: the debian pairs need root (debootstrap, chroot)")
    cache = cache_dir(a.cache)
    manifest = build(cache, a.only)
    for p in json.loads(manifest.read_text())["pairs"]:
        old = sum(l["bytes"] for l in p["old"]) / 1e6
        new = sum(l["bytes"] for l in p["new"]) / 1e6
        print(f"{p['name']:20} old {old:7.1f} MB ({len(p['old'])} layer)  new {new:7.1f} MB ({len(p['new'])} layer)")
    print(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
