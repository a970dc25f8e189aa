"""Per-pair numbers the tables and plots share: bytes and CPU of every method, from one run's raw results."""

from __future__ import annotations

from collections import defaultdict

TOOLS = ("bsdiff", "xdelta3", "zstd-19", "zstd-3", "rsync", "casync")  # baseline tools, full pull apart
METHODS = ("full", "chunksync", *TOOLS)


def _sum(rows: list[dict], key: str) -> float | None:
    values = [r.get(key) for r in rows if r.get("bytes") != 0]  # unchanged layers cost nothing and have no times
    if any(v is None for v in values):
        return None
    return sum(values)


def per_pair(results: dict) -> dict[str, dict[str, dict]]:
    """{pair: {method: {bytes, make_cpu_s, make_rss_mb, apply_cpu_s, apply_rss_mb, verified}}} for a device on v1.

    Baseline rows are summed over the pair's layers (peak RSS: the max). `full` is the registry pull of the layers
    whose digest changed (the pushed gzip blobs); `chunksync` is every byte the pull put on the wire.
    """
    by_pair: dict[str, list[dict]] = defaultdict(list)
    for row in results["baselines"]:
        by_pair[row["pair"]].append(row)
    out: dict[str, dict[str, dict]] = {}
    for pair, cs in results["chunksync"].items():
        methods: dict[str, dict] = {}
        for tool in ("full", *TOOLS):
            rows = [r for r in by_pair.get(pair, []) if r["tool"] == tool]
            if not rows:
                continue
            size = None if any(r["bytes"] is None for r in rows) else sum(r["bytes"] for r in rows)
            rss = [r.get("make_rss_mb") for r in rows if r.get("make_rss_mb") is not None]
            methods[tool] = {"bytes": size, "make_cpu_s": _sum(rows, "make_cpu_s"),
                             "make_rss_mb": max(rss) if rss else None, "apply_cpu_s": _sum(rows, "apply_cpu_s"),
                             "verified": all(r.get("verified") for r in rows),
                             "note": "; ".join(sorted({r["note"] for r in rows if r.get("note", "").startswith(
                                 ("skipped", "failed"))}))}
        update, cold = cs["update"], cs["update_cold"]
        # The pair's deltas are computed once, by the first device's answer: that part is a per-pair cost like a
        # patch tool's make (cold answer minus a cached one), the rest a per-device cost.
        methods["chunksync"] = {"bytes": update["wire_bytes"], "make_cpu_s": 0.0, "make_rss_mb": None,
                                "answer_cpu_s": update["server_cpu_s"], "cold_answer_cpu_s": cold["server_cpu_s"],
                                "pair_cpu_s": max(cold["server_cpu_s"] - update["server_cpu_s"], 0.0),
                                "apply_cpu_s": update["client_cpu_s"], "index_cpu_s": cs["index"]["new"]["cpu_s"],
                                "verified": update["path"] in ("diff", "repair") and cold["path"] in ("diff", "repair"),
                                "note": ""}
        out[pair] = methods
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b
