"""PNG plots of one run (matplotlib, Agg): bytes per method per pair, server CPU vs bytes, the chunk-size sweep."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from bench.summary import METHODS, per_pair  # noqa: E402


def _finish(fig, ax, path: Path, xlabel: str | None, ylabel: str, title: str, ncol: int = 1) -> None:
    """Log y axis (the methods span four orders of magnitude), labels, legend, saved and closed."""
    ax.set_yscale("log")
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=ncol)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def bytes_per_method(results: dict, path: Path) -> None:
    pp = per_pair(results)
    pairs = list(pp)
    width = 0.8 / len(METHODS)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(pairs) + 3), 4.5))
    for i, method in enumerate(METHODS):
        values = [(pp[p].get(method, {}).get("bytes") or 0) / 1e6 for p in pairs]
        xs = [j + (i - len(METHODS) / 2 + 0.5) * width for j in range(len(pairs))]
        ax.bar(xs, [max(v, 1e-4) for v in values], width, label=method,
               edgecolor="black" if method == "chunksync" else None)
    ax.set_xticks(range(len(pairs)), pairs, rotation=15)
    _finish(fig, ax, path, None, "MB to a device on v1 (log)", "Bytes to update v1 → v2, per method", ncol=4)


def cpu_vs_bytes(results: dict, path: Path) -> None:
    """Server CPU (chunksync: its first answer, deltas computed, and a cached one; patch tools: making the one
    patch) against the bytes to a device."""
    pp = per_pair(results)
    fig, ax = plt.subplots(figsize=(7, 5))
    markers = dict(zip(METHODS, "os^vD<>ph"))
    series = [("chunksync, first answer", "chunksync", "cold_answer_cpu_s", "*"),
              ("chunksync, cached answer", "chunksync", "answer_cpu_s", "o")]
    series += [(m, m, "make_cpu_s", markers[m]) for m in METHODS if m not in ("full", "chunksync")]
    for label, method, key, marker in series:
        xs, ys = [], []
        for pair, m in pp.items():
            r = m.get(method)
            if not r or r["bytes"] is None or r.get(key) is None:
                continue
            xs.append(max(r[key], 0.005))
            ys.append(max(r["bytes"], 1) / 1e6)
        ax.scatter(xs, ys, marker=marker, label=label, s=60 if method == "chunksync" else 35)
    ax.set_xscale("log")
    _finish(fig, ax, path, "server CPU s (chunksync: first / cached answer; tools: making the patch; floor 5 ms)",
            "MB to the device (log)", "Server CPU vs bytes, one point per pair")


def sweep(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for pair in dict.fromkeys(r["pair"] for r in results["sweep"]):
        rows = [r for r in results["sweep"] if r["pair"] == pair]
        ax.plot([r["avg_kib"] for r in rows], [r["total_bytes"] / 1e6 for r in rows], marker="o", label=pair)
        ax.plot([r["avg_kib"] for r in rows], [r["index_bytes"] / 1e6 for r in rows], linestyle=":", color="grey")
    ax.set_xscale("log", base=2)
    _finish(fig, ax, path, "average chunk size KiB (min = avg/4, max = avg×4)",
            "MB: payload + index (dotted: index alone)", "Chunk-size sweep (in-process)")


def write_all(results: dict, out: Path) -> list[Path]:
    paths = [out / "bytes.png", out / "cpu_vs_bytes.png", out / "sweep.png"]
    bytes_per_method(results, paths[0])
    cpu_vs_bytes(results, paths[1])
    sweep(results, paths[2])
    return paths
