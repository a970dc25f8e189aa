"""bench/load.py kept working: three devices (empty store, holding v1, holding v2) pulling at once from one real
server next to a real registry, every image verified, the server's peak RSS reported. The 50-device run is the
benchmark (`python -m bench.load`), not a test."""
from __future__ import annotations

from pathlib import Path

from bench.load import run, write


def test_three_devices_at_once(tmp_path: Path) -> None:
    result = run(3, tmp_path / "work", size=1_500_000)
    assert result["failures"] == [] and result["verified"] == 3
    assert {g["holds"] for g in result["by_mix"]} == {"nothing", "v1", "v2"}
    assert 0 < result["server_peak_rss_mb"] < 500
    # Updates download a small part of what a first pull does.
    first = next(g for g in result["by_mix"] if g["holds"] == "nothing")
    update = next(g for g in result["by_mix"] if g["holds"] == "v2")
    assert update["mb_received_each"] < first["mb_received_each"] / 5
    report = write(result, tmp_path / "results").read_text()
    assert "3 of 3" in report and "peak RSS" in report
