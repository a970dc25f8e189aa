"""Writes RESULTS.md from one run's results: the targets, the headline table, chunksync's costs at both ends, the
baselines' costs, fleet economics, the chunk-size sweep, and the machine it ran on."""

from __future__ import annotations

from bench import fleet
from bench.fmt import mb as _mb
from bench.fmt import num as _f
from bench.fmt import table as _table
from bench.fmt import times as _x
from bench.summary import METHODS, TOOLS, per_pair, ratio
from bench.targets import targets


def headline(results: dict) -> list[str]:
    pp = per_pair(results)
    rows = []
    for pair, m in pp.items():
        full, cs, bs = m["full"]["bytes"], m["chunksync"]["bytes"], m.get("bsdiff", {}).get("bytes")
        rows.append([pair, _mb(full), _mb(cs), _f(100 * ratio(cs, full) if full else None, "{:.1f}"),
                     _x(ratio(cs, bs)), *[_mb(m.get(t, {}).get("bytes")) for t in TOOLS]])
    return _table(["pair", "full pull MB", "chunksync MB", "chunksync % of full", "chunksync ÷ bsdiff",
                   *[f"{t} MB" for t in TOOLS]], rows, "lrrrr" + "r" * len(TOOLS))


def chunksync_costs(results: dict) -> list[str]:
    rows = []
    for pair, cs in results["chunksync"].items():
        for label, key in (("v2 after v1", "update"), ("v2 after v1, first device (deltas computed)", "update_cold"),
                           ("first pull, empty device", "first_pull"),
                           ("first pull, a later empty device", "first_pull_later")):
            if key not in cs:  # results of runs before it was measured
                continue
            r = cs[key]
            full = cs["full_pull_bytes"] if key.startswith("first_pull") else cs["changed_layer_bytes"]
            counted = r["client_bytes_received"] + r["client_bytes_sent"]
            rows.append([pair, label, _mb(r["wire_bytes"]), _f(100 * ratio(r["wire_bytes"], full), "{:.1f}"),
                         f"{r['wire_sent']:,}", f"{counted - r['wire_bytes']:+,}",
                         f"{r['server_requests']} + {r['registry_requests']}", str(r["connections"]),
                         f"{r['chunks_received']:,}", str(r["repair_chunks"]), _f(r["server_cpu_s"]),
                         _f(r["server_peak_rss_mb"], "{:.0f}"), _f(r["client_cpu_s"]),
                         _f(r["client_apply_cpu_s"], "{:.3f}"), _f(r["client_peak_rss_mb"], "{:.0f}"),
                         _f(r["client_wall_s"]), r["path"]])
    return _table(["pair", "pull", "wire MB", "% of full", "sent B", "client count − wire B",
                   "requests server + registry", "TCP conns", "chunks", "repair chunks", "server answer CPU s",
                   "server peak RSS MB", "client CPU s", "client apply CPU s", "client peak RSS MB", "client wall s",
                   "path"], rows, "llrrrrrrrrrrrrrrl")


def index_costs(results: dict) -> list[str]:
    rows = []
    for pair, cs in results["chunksync"].items():
        for tag in ("old", "new"):
            i = cs["index"][tag]
            speed = i["uncompressed_bytes"] / 1e6 / i["cpu_s"] if i["cpu_s"] else None
            rows.append([pair, tag, _mb(i["uncompressed_bytes"], 1), f"{i['chunks']:,}", _f(i["cpu_s"]),
                         _f(i["wall_s"]), _f(speed, "{:.0f}"), _f(i["peak_rss_mb"], "{:.0f}")])
    return _table(["pair", "image", "uncompressed MB", "chunks", "CPU s", "wall s", "MB per CPU s (whole process)",
                   "peak RSS MB"],
                  rows, "llrrrrrr")


def baseline_costs(results: dict) -> list[str]:
    pp = per_pair(results)
    rows = []
    for pair, m in pp.items():
        for method in METHODS:
            if method not in m:
                continue
            r = m[method]
            make = (f"{_f(r['index_cpu_s'])} (index, once per image) + {_f(r['pair_cpu_s'])} (deltas, once per "
                    "pair)" if method == "chunksync" else _f(r["make_cpu_s"]))
            answer = _f(r.get("answer_cpu_s")) if method == "chunksync" else "~0 (static file)"
            rows.append([pair, method, _mb(r["bytes"]), make, _f(r["make_rss_mb"], "{:.0f}"), answer,
                         _f(r["apply_cpu_s"]), "yes" if r["verified"] else "NO", r["note"]])
    return _table(["pair", "method", "MB", "server make CPU s", "make peak RSS MB", "server CPU s per device",
                   "device apply CPU s", "verified", "note"], rows, "llrrrrrll")


def _devices(n: float | None) -> str:
    return "—" if n is None else "never" if n < 1 else "any" if n == float("inf") else f"{n:,.0f}"


def fleet_table(results: dict) -> list[str]:
    pp = per_pair(results)
    rows = []
    for pair, m in pp.items():
        cs = m["chunksync"]
        for method in ("chunksync", "bsdiff", "xdelta3", "zstd-19", "zstd-3", "rsync", "casync", "full"):
            if method not in m:
                continue
            costs = {"index_cpu_s": cs["index_cpu_s"], "pair_cpu_s": cs["pair_cpu_s"],
                     "answer_cpu_s": cs["answer_cpu_s"],
                     "make_cpu_s": m[method]["make_cpu_s"] if method != "full" else 0.0}
            cpu = [fleet.server_cpu(method, k, costs) for k in fleet.KS]
            even = ("" if method in ("chunksync", "full") else
                    " / ".join(_devices(fleet.break_even_devices(k, costs)) for k in fleet.KS))
            size = m[method]["bytes"]
            rows.append([pair, method, *[_f(c, "{:,.1f}") for c in cpu],
                         _f(None if size is None else fleet.DEVICES * size / 1e9, "{:.2f}"), even])
    return _table(["pair", "method", *[f"server CPU s, K={k}" for k in fleet.KS], f"GB to {fleet.DEVICES} devices",
                   "chunksync cheaper below N devices (K=" + "/".join(map(str, fleet.KS)) + ")"], rows, "llrrrrr")


def sweep_table(results: dict) -> list[str]:
    rows = []
    for r in results["sweep"]:
        rows.append([r["pair"], f"{r['avg_kib']}", f"{r['min_kib']:g} / {r['max_kib']:g}",
                     f"{r['new_chunks']:,}", f"{r['missing_chunks']:,}", _mb(r["missing_raw_bytes"]),
                     _mb(r["payload_bytes"]), _mb(r["index_bytes"]), _mb(r["bloom_bytes"]), _mb(r["total_bytes"]),
                     _f(r["cpu_s"])])
    return _table(["pair", "avg KiB", "min / max KiB", "chunks in v2", "missing chunks", "missing MB (raw)",
                   "payload MB (zstd frames)", "index MB", "Bloom MB (1 %)", "payload + index MB", "CPU s"],
                  rows, "lrlrrrrrrrr")


def markdown(results: dict) -> str:
    m = results["machine"]
    out = [
        "# chunksync benchmark results", "",
        f"Run {results['date']} on {m['cpu']} × {m['nproc']} cores, {m['ram_gb']:.1f} GB RAM, {m['os']}; "
        f"`{results['command']}` took {results['seconds'] / 60:.1f} min. Every number below comes from this run "
        "(baseline tool rows other than bsdiff's are cached by bench/baselines.py per input file and tool version; "
        "bsdiff, the yardstick of targets 2a and 2b, is measured in the run unless `--cached-bsdiff`).", "",
        *targets(results),
        "## Bytes for a device on v1 to get v2", "",
        "*full pull*: the gzip layer blobs of v2 whose digest v1 does not have (what `docker pull` fetches). "
        "*chunksync*: every byte of the real `chunksync pull` on the wire, both directions, both peers (server and "
        "registry), HTTP lines and headers included, counted by a TCP proxy in front of each. Baselines: the patch "
        "file per changed layer (bench/baselines.py), no transport overhead. bsdiff ÷ > 1 means chunksync sends "
        "more than bsdiff.", "",
        *headline(results),
        "## chunksync at both ends", "",
        "*wire MB*: TCP payload through the proxies (request + answer, server + registry). *sent B*: what the device "
        "sent (sync request with its have-set, manifest request). *client count − wire*: the pull's own `--json` "
        "bytes_sent + bytes_received minus the wire count (negative: the client counts less; "
        "chunked-encoding markers and status lines it does not see). *requests*: HTTP requests to the server "
        "(1 = one round trip; a repair round adds one) and to the registry (the tag lookup). *server answer CPU "
        "s*: user+sys of the `chunksync serve` process around the pull (/proc/PID/stat; 10 ms ticks), indexing "
        "excluded (done beforehand by `chunksync index`). *v2 after v1*: the cached answer, median of the repeated "
        "pulls; *first device*: the one pull in which the server computed the pair's deltas. *server peak RSS*: "
        "VmHWM, reset before each pull (clear_refs 5). Client: GNU time around `chunksync pull --out oci:…` (whole "
        "process, Python start-up included); *client apply CPU s*: the pull's own `apply_cpu_s` (decoding, "
        "checking and storing the CHUNKS and DELTA frames).", "",
        *chunksync_costs(results),
        "## Indexing, once per image (`chunksync index`, GNU time)", "",
        *index_costs(results),
        "## Costs per method", "",
        "Sums over a pair's changed layers; peak RSS is the largest. chunksync has no per-pair precompute: the new "
        "image is indexed once, whatever versions the devices run.", "",
        *baseline_costs(results),
        f"## Fleet economics: {fleet.DEVICES} devices spread over K old versions", "",
        "Derived, not measured as a fleet. chunksync: index CPU of v2 once + K × the pair's delta computation (first "
        "answer's CPU − cached answer's) + devices × the measured cached answer CPU. "
        "Patch tools: K × the measured make CPU (one patch per old version), serving a ready patch counted as 0. "
        "The measured pair stands in for every old version (older versions need bigger diffs with every method). "
        "The last column: the fleet size below which chunksync spends less server CPU than K precomputed patches.",
        "",
        *fleet_table(results),
        "## Chunk-size sweep (in-process, chunkstore directly, not the server)", "",
        "FastCDC min = avg/4, max = avg×4. For a device holding v1: v2's chunks not among v1's chunk ids, each "
        "once, as zstd-3 CHUNKS frames of ~4 MiB (chunkstore.wire.encode_chunks), plus v2's encoded index (sent in "
        "the HEADER frame). Bloom: the filter over v1's chunk ids at 1 % a device would send if it could not name v1 "
        "(not added to the total). No HTTP, manifest or config bytes. The server uses 64 KiB.", "",
        *sweep_table(results),
        "## Plots", "", "![bytes per method](bytes.png)", "", "![server CPU vs bytes](cpu_vs_bytes.png)", "",
        "![chunk-size sweep](sweep.png)", "",
    ]
    return "\n".join(out)
