"""What a pull tells people: a progress bar on a terminal (bytes, rate, ETA) and the closing summary."""
from __future__ import annotations

import sys
import time
from typing import TextIO


def mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def size(n: float) -> str:
    """Bytes for people: kB below a megabyte, where MB would round to 0.00."""
    return f"{n / 1e3:.1f} kB" if n < 1e6 else mb(n)


class ProgressBar:
    """A one-line bar on stderr, redrawn at most 10 times a second; silent unless stderr is a terminal."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = ""
        self.total = 0
        self.done = 0
        self._start = time.monotonic()
        self._drawn = 0.0

    def start(self, label: str, total: int) -> None:
        """A new phase: `total` is an estimate of the bytes to come (0 if unknown)."""
        self.label, self.total, self.done = label, total, 0
        self._start = time.monotonic()
        self._draw(force=True)

    def advance(self, n: int) -> None:
        self.done += n
        self._draw()

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._drawn < 0.1):
            return
        self._drawn = now
        elapsed = max(now - self._start, 1e-6)
        rate = self.done / elapsed
        line = f"{self.label} {mb(self.done)}"
        if self.total:
            fraction = min(self.done / self.total, 1.0)
            filled = int(fraction * 24)
            line = f"{self.label} [{'#' * filled}{'.' * (24 - filled)}] {fraction:4.0%} {mb(self.done)}/{mb(self.total)}"
            if rate > 0 and self.done < self.total:
                line += f" ETA {(self.total - self.done) / rate:.0f} s"
        line += f" {rate / 1e6:.1f} MB/s"
        self.stream.write("\r" + line[:120].ljust(120))
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 120 + "\r")
            self.stream.flush()


def summary_line(report: dict) -> str:
    """The human summary of a pull report (client.pull.PullReport.to_json)."""
    full = report["full_pull_bytes"]
    saved = f", {report['saved_percent']:.1f}% saved" if full else ""
    where = f" into {report['output']}" if report.get("output") else ""
    return (f"pulled {report['image']}{where} via {report['path']} in {report['seconds']:.1f} s: "
            f"downloaded {size(report['bytes_received'])} vs {mb(full)} for a full pull{saved} "
            f"(sent {size(report['bytes_sent'])}); {report['chunks_received']} chunks received, "
            f"{report['repair_chunks']} in repair, {report['registry_layers']} layer(s) from the registry")
