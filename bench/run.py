"""`python -m bench`: measures chunksync end to end against full pulls and the baseline delta tools on the corpus
pairs, and writes bench/results/RESULTS.md, results.json and PNG plots."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import baselines, corpus, plots, pulls, report, sweep
from bench.tap import Tap
from client.sandbox import SandboxError, require_tools, start_registry

RESULTS = Path(__file__).parent / "results"
QUICK_PAIR = "node"  # the smallest corpus pair: a smoke run in about a minute
# bsdiff is what the server's CPU and memory are judged against (targets 2a, 2b), so it is measured in every run,
# side by side with chunksync: on this shared VM the same code's CPU moved 2x within an hour, and a cached bsdiff
# row from another hour made a ratio of two moments. The other tools' rows stay cached (bytes do not drift).
FRESH_BASELINES = ("bsdiff",)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gb": mem_kb * 1024 / 1e9,
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version()}


def pair_dirs(args: argparse.Namespace, cache: Path) -> list[Path]:
    if args.pairs_from:
        root = Path(args.pairs_from)
        dirs = sorted(p for p in root.iterdir() if (p / "new" / "layers").is_dir())
        if args.only:
            dirs = [p for p in dirs if p.name in args.only]
        for p in dirs:
            if not (p / "recipe.json").is_file() or not corpus.pair_layers(p, "old"):
                raise ValueError(f"{p} needs old/layers/0.tar, new/layers/0.tar and a recipe.json with a \"built\" "
                                 "date (the image config's created time), as bench.corpus writes them")
        if not dirs:
            raise ValueError(f"no pairs in {root}: expected {root}/<pair>/old/layers/0.tar and new/layers/0.tar")
        return dirs
    names = args.only or ([QUICK_PAIR] if args.quick else list(corpus.PAIRS))
    unknown = [n for n in names if n not in corpus.PAIRS]
    if unknown:
        raise ValueError(f"unknown pair(s) {', '.join(unknown)}; the corpus has {', '.join(corpus.PAIRS)}")
    return [corpus.ensure_pair(cache, n) for n in names]


def run(args: argparse.Namespace) -> dict:
    cache = corpus.cache_dir(args.cache)
    dirs = pair_dirs(args, cache)
    require_tools("docker-registry", "skopeo", "gzip", "bsdiff", "xdelta3", "zstd", "rsync", "casync")
    started = time.monotonic()
    results: dict = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     "command": shlex.join(["python", "-m", "bench", *(sys.argv[1:] if args.argv is None else args.argv)]),
                     "machine": machine(), "chunksync": {}, "baselines": [], "sweep": []}
    work = Path(tempfile.mkdtemp(prefix="run-", dir=cache))
    registry, host = start_registry(work / "registry")
    registry_tap = Tap((host.split(":")[0], int(host.split(":")[1])))
    try:
        for pair_dir in dirs:
            name = pair_dir.name
            log(f"{name}: baselines ({', '.join(FRESH_BASELINES)} measured now, the others cached when measured "
                "before)")
            results["baselines"] += baselines.measure_pair(pair_dir, cache, slow=args.slow,
                                                           fresh=() if args.cached_bsdiff else FRESH_BASELINES)
            log(f"{name}: chunksync end to end (registry {host}, server, pulls)")
            results["chunksync"][name] = pulls.measure_pair(pair_dir, cache, host, registry_tap, work / name,
                                                            repeat=args.repeat)
            u, c = results["chunksync"][name]["update"], results["chunksync"][name]["update_cold"]
            log(f"{name}: v2 after v1 {u['wire_bytes'] / 1e6:.3f} MB on the wire, server {c['server_cpu_s']:.2f} "
                f"CPU s first (deltas {c['delta_compute_s']:.2f} s), {u['server_cpu_s']:.2f} cached, path {u['path']}")
            log(f"{name}: chunk-size sweep (in-process)")
            results["sweep"] += sweep.sweep_pair(pair_dir)
    finally:
        registry_tap.close()
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = time.monotonic() - started
    return results


def write(results: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plots.write_all(results, out)
    md = out / "RESULTS.md"
    md.write_text(report.markdown(results))
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--only", action="append", metavar="PAIR", help="only this pair (repeatable)")
    ap.add_argument("--quick", action="store_true", help=f"smoke run: the {QUICK_PAIR} pair only")
    ap.add_argument("--slow", action="store_true", help="also run bsdiff on layers over its size cap (slow, GBs)")
    ap.add_argument("--pairs-from", metavar="DIR",
                    help="pairs from DIR/<pair>/{old,new}/layers/N.tar + recipe.json instead of the corpus")
    ap.add_argument("--cached-bsdiff", action="store_true",
                    help="take bsdiff's rows from the cache too (faster; its CPU is then from another moment)")
    ap.add_argument("--repeat", type=int, default=3, help="update pulls per pair, median reported (default 3)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"where RESULTS.md goes (default {RESULTS})")
    ap.add_argument("--cache", help="cache dir (default $CHUNKSYNC_BENCH_CACHE or ~/.cache/chunksync-bench)")
    ap.add_argument("--json", action="store_true", help="print the raw results as JSON")
    args = ap.parse_args(argv)
    args.argv = argv
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    try:
        results = run(args)
    except (ValueError, SandboxError) as exc:
        print(f"python -m bench: error: {exc}", file=sys.stderr)
        return 2
    md = write(results, args.out)
    print(json.dumps(results, indent=1) if args.json else "\n".join(report.headline(results)))
    log(f"wrote {md} and plots in {results['seconds'] / 60:.1f} min")
    return 0
