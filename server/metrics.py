"""Counters of what the server did, rendered in the Prometheus text format for GET /metrics."""
from __future__ import annotations

import threading
from collections import defaultdict

_HELP = {
    "chunksync_requests_total": ("counter", "HTTP requests by endpoint and status"),
    "chunksync_request_bytes_total": ("counter", "request body bytes received"),
    "chunksync_response_bytes_total": ("counter", "response body bytes sent"),
    "chunksync_chunks_sent_total": ("counter", "chunks sent to devices"),
    "chunksync_chunk_bytes_sent_total": ("counter", "uncompressed bytes of the chunks sent"),
    "chunksync_chunks_skipped_total": ("counter", "chunks not sent: the device has them (have_images or Bloom hit)"),
    "chunksync_images_indexed_total": ("counter", "images chunked and indexed by this process"),
    "chunksync_index_seconds": ("summary", "time spent indexing an image"),
    "chunksync_indexed_bytes_total": ("counter", "uncompressed layer bytes chunked while indexing"),
    "chunksync_indexes_found_total": ("counter", "indexes found instead of computed, by where"),
    "chunksync_layers_rechunked_total": ("counter", "layers chunked again to refill the store for a found index"),
    "chunksync_events_total": ("counter", "registry notification events by outcome: indexed, ignored (not an image push), artifact (not an image), failed"),
    "chunksync_index_failures_total": ("counter", "indexing attempts that failed"),
    "chunksync_request_memory_waits_total": ("counter", "sync and repair requests that waited for request memory"),
    "chunksync_delta_pairs_total": ("counter", "(old image, new image) deltas asked for, by outcome: computed or cached"),
    "chunksync_delta_compute_seconds": ("summary", "time spent computing the deltas of an image pair"),
    "chunksync_delta_items_sent_total": ("counter", "DELTA items sent to devices"),
    "chunksync_delta_bytes_sent_total": ("counter", "encoded bytes of the DELTA items sent"),
    "chunksync_index_delta_bytes_total": ("counter", "bytes of index deltas sent in place of whole indexes"),
    "chunksync_segment_frames_total": ("counter", "whole-segment CHUNKS frames sent, by outcome: computed or cached"),
}


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in labels)
    return "{" + inner + "}"


class Metrics:
    """Thread-safe counters; `observe` keeps a summary's _sum and _count."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0) + amount

    def observe(self, name: str, value: float) -> None:
        self.inc(name + "_sum", value)
        self.inc(name + "_count", 1)

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values.get(name, {}).get(tuple(sorted(labels.items())), 0)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            snapshot = {name: dict(series) for name, series in self._values.items()}
        for name, (kind, text) in _HELP.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            names = [name + "_sum", name + "_count"] if kind == "summary" else [name]
            for series_name in names:
                series = snapshot.get(series_name) or ({(): 0} if kind != "counter" or not _is_labelled(name) else {})
                for labels, value in sorted(series.items()):
                    lines.append(f"{series_name}{_labels(labels)} {_number(value)}")
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _is_labelled(name: str) -> bool:
    return name in {"chunksync_requests_total", "chunksync_indexes_found_total", "chunksync_events_total",
                    "chunksync_delta_pairs_total", "chunksync_segment_frames_total"}


def parse_metrics(text: str) -> dict[str, float]:
    """`{'name{labels}': value}` from Prometheus text: for tests and scripts that read /metrics."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values
