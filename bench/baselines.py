"""Measures the baseline delta tools (full gzip pull, bsdiff, xdelta3, zstd --patch-from, rsync batch, casync) on
every layer of every corpus pair. `python -m bench.baselines [--slow] [--only PAIR] [--cache DIR]` prints markdown."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import corpus, images

# Layer N of `new` is diffed against layer N of `old` (an empty tar, 10240 zero bytes as GNU tar writes it, when
# `old` has fewer layers: bsdiff cannot mmap an empty file); a layer whose diff_id is unchanged costs 0 bytes for
# every tool, as registries dedup whole layers. Each measurement is one dict (a row, fields below) cached in
# `<cache>/baselines/<key>.json`, keyed by tool, its parameters and the input files' sizes and
# mtimes, so a re-run (or the full bench) only measures what changed. Tools run one at a time so CPU numbers and
# peak RSS (GNU time) are not disturbed by each other.

TOOLS = ("full", "bsdiff", "xdelta3", "zstd-19", "zstd-3", "rsync", "casync")
BSDIFF_CAP_MB = 128  # bsdiff: ~9x its input in RAM, ~1 min per 120 MB here; covers the debian layers
VERSION = 1  # bump when a tool's command line changes, so cached rows are remeasured

# A row: tool, pair, layer, bytes (None if skipped), make_cpu_s, make_wall_s, make_rss_mb, apply_cpu_s,
# apply_wall_s, apply_rss_mb, verified (apply result == new, byte for byte), old_bytes, new_bytes, cmd, note.


def log(msg: str) -> None:
    print(f"[baselines {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Timed:
    """Sums wall, CPU (user+sys) and the max peak RSS of commands run under GNU time."""

    def __init__(self) -> None:
        self.wall = self.cpu = self.rss_mb = 0.0

    def run(self, cmd: list[str], **kw) -> None:
        with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
            r = subprocess.run(["/usr/bin/time", "-f", "%e %U %S %M", "-o", tf.name, *cmd],
                               stdout=kw.pop("stdout", subprocess.DEVNULL), stderr=subprocess.PIPE, **kw)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.decode()[-2000:]}")
            e, u, s, m = tf.read().split()[-4:]
        self.wall += float(e)
        self.cpu += float(u) + float(s)
        self.rss_mb = max(self.rss_mb, int(m) / 1024)

    def out(self, prefix: str) -> dict:
        return {f"{prefix}_cpu_s": round(self.cpu, 3), f"{prefix}_wall_s": round(self.wall, 3),
                f"{prefix}_rss_mb": round(self.rss_mb, 1)}


def same(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def _pow2_at_least(n: int, lo: int) -> int:
    v = lo
    while v < n:
        v *= 2
    return v


# ---------------------------------------------------------------- one tool each: (old, new, work dir) -> row part

def m_full(old: Path, new: Path, w: Path, cache: Path) -> dict:
    # The blob images.py builds and pushes (gzip -6 -n), so this is also the pushed image's layer size.
    blob = images.layer_blob(new, cache)
    out = w / "out.tar"
    ap = Timed()
    with open(out, "wb") as f:
        ap.run(["gzip", "-d", "-c", blob["path"]], stdout=f)
    return {"bytes": blob["size"], "make_cpu_s": blob["gzip_cpu_s"], "make_wall_s": blob["gzip_wall_s"],
            "make_rss_mb": None, **ap.out("apply"), "verified": same(out, new), "cmd": "gzip -6 -n",
            "note": "= pushed layer blob (bench.images)"}


def m_bsdiff(old: Path, new: Path, w: Path, cache: Path) -> dict:
    patch, out = w / "patch", w / "out"
    mk, ap = Timed(), Timed()
    mk.run(["bsdiff", str(old), str(new), str(patch)])
    ap.run(["bspatch", str(old), str(out), str(patch)])
    return {"bytes": patch.stat().st_size, **mk.out("make"), **ap.out("apply"), "verified": same(out, new),
            "cmd": "bsdiff old new patch; bspatch old out patch"}


def m_xdelta3(old: Path, new: Path, w: Path, cache: Path) -> dict:
    patch, out = w / "patch", w / "out"
    # Source window covering all of old: the 64 MiB default would miss matches in larger layers.
    b = str(_pow2_at_least(old.stat().st_size, 64 << 20))
    mk, ap = Timed(), Timed()
    mk.run(["xdelta3", "-9", "-e", "-f", "-B", b, "-s", str(old), str(new), str(patch)])
    ap.run(["xdelta3", "-d", "-f", "-B", b, "-s", str(old), str(patch), str(out)])
    return {"bytes": patch.stat().st_size, **mk.out("make"), **ap.out("apply"), "verified": same(out, new),
            "cmd": f"xdelta3 -9 -e -B {b} -s old new patch"}


def _zstd(level: int):
    def m(old: Path, new: Path, w: Path, cache: Path) -> dict:
        patch, out = w / "patch", w / "out"
        # --long=31 on both sides: the window must cover old+new; decompression refuses windows > 128 MiB
        # without it. --single-thread: zstd's docs say --patch-from compresses better that way.
        mk, ap = Timed(), Timed()
        mk.run(["zstd", "-q", "-f", f"-{level}", "--single-thread", "--long=31", f"--patch-from={old}",
                str(new), "-o", str(patch)])
        ap.run(["zstd", "-q", "-f", "-d", "--long=31", f"--patch-from={old}", str(patch), "-o", str(out)])
        return {"bytes": patch.stat().st_size, **mk.out("make"), **ap.out("apply"), "verified": same(out, new),
                "cmd": f"zstd -{level} --single-thread --long=31 --patch-from=old new"}
    return m


def m_rsync(old: Path, new: Path, w: Path, cache: Path) -> dict:
    # Local rsync defaults to --whole-file and to skipping by size+mtime; force the delta algorithm.
    (w / "dst").mkdir()
    (w / "dev").mkdir()
    shutil.copyfile(old, w / "dst" / "layer.tar")
    shutil.copyfile(old, w / "dev" / "layer.tar")
    batch = w / "batch"
    mk, ap = Timed(), Timed()
    mk.run(["rsync", "-I", "--no-whole-file", f"--only-write-batch={batch}", str(new), str(w / "dst" / "layer.tar")])
    mk.run(["zstd", "-q", "-f", "-19", str(batch), "-o", str(batch) + ".zst"])
    raw = batch.stat().st_size
    batch.unlink()
    ap.run(["zstd", "-q", "-f", "-d", str(batch) + ".zst", "-o", str(batch)])
    ap.run(["rsync", f"--read-batch={batch}", str(w / "dev" / "layer.tar")])
    return {"bytes": (w / "batch.zst").stat().st_size, **mk.out("make"), **ap.out("apply"),
            "verified": same(w / "dev" / "layer.tar", new),
            "cmd": "rsync -I --no-whole-file --only-write-batch=B new old_copy; zstd -19 B",
            "note": f"raw batch {raw} bytes"}


def m_casync(old: Path, new: Path, w: Path, cache: Path) -> dict:
    s_old, s_new, s_miss = w / "s_old", w / "s_new", w / "s_miss"
    idx_old, idx_new = w / "old.caibx", w / "new.caibx"
    # The old store is the server's precomputed state for the device's version: not counted in make.
    subprocess.run(["casync", "make", f"--store={s_old}", str(idx_old), str(old)], check=True,
                   stdout=subprocess.DEVNULL)
    mk, ap = Timed(), Timed()
    mk.run(["casync", "make", f"--store={s_new}", str(idx_new), str(new)])
    have = {p.name for p in s_old.rglob("*.cacnk")}
    missing = 0
    s_miss.mkdir()
    for p in s_new.rglob("*.cacnk"):
        if p.name not in have:
            missing += p.stat().st_size
            (s_miss / p.parent.name).mkdir(exist_ok=True)
            os.link(p, s_miss / p.parent.name / p.name)
    # The device: its old layer as seed, only the missing chunks in the store.
    ap.run(["casync", "extract", f"--store={s_miss}", f"--seed={old}", str(idx_new), str(w / "out.tar")])
    return {"bytes": missing + idx_new.stat().st_size, **mk.out("make"), **ap.out("apply"),
            "verified": same(w / "out.tar", new),
            "cmd": "casync make --store=S new.caibx new.tar (default chunking, avg 64 KiB, zstd chunks)",
            "note": f"missing chunks {missing} bytes + caibx {idx_new.stat().st_size} bytes"}


MEASURE = {"full": m_full, "bsdiff": m_bsdiff, "xdelta3": m_xdelta3, "zstd-19": _zstd(19), "zstd-3": _zstd(3),
           "rsync": m_rsync, "casync": m_casync}


# ---------------------------------------------------------------- driving

def _stamp(p: Path) -> list:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _key(tool: str, old: Path, new: Path) -> str:
    return hashlib.sha256(json.dumps([VERSION, tool, _stamp(old), _stamp(new)]).encode()).hexdigest()[:32]


def measure(tool: str, pair: str, layer: int, old: Path, new: Path, cache: Path, *, slow: bool = False,
            bsdiff_cap_mb: float = BSDIFF_CAP_MB, fresh: bool = False) -> dict:
    """One row: cached when the inputs did not change, unless `fresh` (measured again, the cache rewritten); a
    skipped row (bsdiff over the cap) is never cached."""
    base = {"tool": tool, "pair": pair, "layer": layer, "old_bytes": old.stat().st_size,
            "new_bytes": new.stat().st_size}
    key_path = cache / "baselines" / f"{_key(tool, old, new)}.json"
    if key_path.exists() and not fresh:
        return {**json.loads(key_path.read_text()), "pair": pair, "layer": layer}
    big = max(base["old_bytes"], base["new_bytes"]) / 1e6
    if tool == "bsdiff" and not slow and big > bsdiff_cap_mb:
        return {**base, "bytes": None, "verified": None,
                "note": f"skipped (over cap {bsdiff_cap_mb:g} MB, use --slow)"}
    work = Path(tempfile.mkdtemp(prefix=f"{tool}-", dir=cache / "baselines"))
    log(f"{pair} layer {layer}: {tool} (old {base['old_bytes'] / 1e6:.1f} MB, new {base['new_bytes'] / 1e6:.1f} MB)")
    t0 = time.monotonic()
    try:
        row = {**base, **MEASURE[tool](old, new, work, cache)}
    except Exception as e:  # one broken tool must not cost the other measurements; failures are not cached
        log(f"  -> FAILED: {e}")
        return {**base, "bytes": None, "verified": False, "note": f"failed: {str(e)[:200]}"}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"  -> {row['bytes'] / 1e6:.3f} MB, verified={row['verified']}, {time.monotonic() - t0:.1f}s")
    corpus.write_json(key_path, row)
    return row


def measure_pair(pair_dir: Path, cache: Path, *, tools=TOOLS, slow: bool = False,
                 bsdiff_cap_mb: float = BSDIFF_CAP_MB, fresh: tuple[str, ...] = ()) -> list[dict]:
    """Rows for every layer of the pair's new version and every tool; the tools in `fresh` measured now."""
    pair_dir = Path(pair_dir)
    olds, news = corpus.pair_layers(pair_dir, "old"), corpus.pair_layers(pair_dir, "new")
    (cache / "baselines").mkdir(parents=True, exist_ok=True)
    empty = cache / "baselines" / "empty.tar"
    if not empty.exists():
        tmp = empty.with_name(f".empty.tar.tmp-{os.getpid()}")
        tmp.write_bytes(bytes(10240))
        os.rename(tmp, empty)
    rows = []
    for i, new in enumerate(news):
        old = olds[i] if i < len(olds) else empty
        if old != empty and old.stat().st_size == new.stat().st_size and same(old, new):
            rows += [{"tool": t, "pair": pair_dir.name, "layer": i, "old_bytes": old.stat().st_size,
                      "new_bytes": new.stat().st_size, "bytes": 0, "verified": True,
                      "note": "layer unchanged (same diff_id): not downloaded"} for t in tools]
            continue
        rows += [measure(t, pair_dir.name, i, old, new, cache, slow=slow, bsdiff_cap_mb=bsdiff_cap_mb,
                         fresh=t in fresh) for t in tools]
    return rows


def run_all(cache: Path, only: list[str] | None = None, **kw) -> list[dict]:
    names = only or list(corpus.PAIRS)
    rows = []
    for n in names:
        rows += measure_pair(corpus.ensure_pair(cache, n), cache, **kw)
    corpus.write_manifest(cache)
    return rows


def _mb(b) -> str:
    return "—" if b is None else f"{b / 1e6:.3f}"


def _num(v, fmt="{:.2f}") -> str:
    return "—" if v is None else fmt.format(v)


def markdown(rows: list[dict]) -> str:
    """A compact table (MB per tool per layer) and a detailed one (costs, RSS, verification)."""
    lines = []
    layers = sorted({(r["pair"], r["layer"]) for r in rows}, key=lambda k: (list(corpus.PAIRS).index(k[0])
                                                                         if k[0] in corpus.PAIRS else 99, k[1]))
    by = {(r["pair"], r["layer"], r["tool"]): r for r in rows}
    tools = [t for t in TOOLS if any(r["tool"] == t for r in rows)]
    lines.append("| pair | layer | old MB | new MB | " + " | ".join(f"{t} MB" for t in tools) + " |")
    lines.append("|---|---:|---:|---:|" + "---:|" * len(tools))
    for p, l in layers:
        any_row = next(r for r in rows if r["pair"] == p and r["layer"] == l)
        cells = [_mb(by[(p, l, t)]["bytes"]) if (p, l, t) in by else "" for t in tools]
        lines.append(f"| {p} | {l} | {_mb(any_row['old_bytes'])} | {_mb(any_row['new_bytes'])} | "
                     + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| pair | layer | tool | MB | % of full | make CPU s | make wall s | make RSS MB | apply CPU s "
                 "| apply RSS MB | verified | note |")
    lines.append("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for p, l in layers:
        full = by.get((p, l, "full"), {}).get("bytes")
        for t in tools:
            r = by.get((p, l, t))
            if r is None:
                continue
            pct = "—" if not full or r["bytes"] is None else f"{100 * r['bytes'] / full:.1f}"
            lines.append(f"| {p} | {l} | {t} | {_mb(r['bytes'])} | {pct} | {_num(r.get('make_cpu_s'))} | "
                         f"{_num(r.get('make_wall_s'))} | {_num(r.get('make_rss_mb'), '{:.0f}')} | "
                         f"{_num(r.get('apply_cpu_s'))} | {_num(r.get('apply_rss_mb'), '{:.0f}')} | "
                         f"{'—' if r.get('verified') is None else ('yes' if r['verified'] else 'NO')} | "
                         f"{r.get('note', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.baselines", description=__doc__)
    ap.add_argument("--only", action="append", metavar="PAIR", help="only this pair (repeatable)")
    ap.add_argument("--slow", action="store_true", help="run bsdiff on layers over the size cap too")
    ap.add_argument("--bsdiff-cap-mb", type=float, default=BSDIFF_CAP_MB, help="bsdiff size cap (default %(default)s)")
    ap.add_argument("--tool", action="append", choices=TOOLS, help="only this tool (repeatable)")
    ap.add_argument("--cache", help="cache dir (default $CHUNKSYNC_BENCH_CACHE or ~/.cache/chunksync-bench)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of markdown")
    a = ap.parse_args(argv)
    cache = corpus.cache_dir(a.cache)
    t0 = time.monotonic()
    rows = run_all(cache, a.only, tools=tuple(a.tool or TOOLS), slow=a.slow, bsdiff_cap_mb=a.bsdiff_cap_mb)
    log(f"done in {time.monotonic() - t0:.0f}s")
    md = markdown(rows)
    if not a.only and not a.tool:
        (cache / "baselines.md").write_text(md + "\n")  # the last full table, for reports
    print(json.dumps(rows, indent=1) if a.json else md)
    bad = [r for r in rows if r.get("verified") is False]
    if bad:
        log(f"NOT VERIFIED: {[(r['pair'], r['layer'], r['tool']) for r in bad]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
