"""`python -m bench` end to end on a tiny pair made here from real files: real registry, server, pulls, baseline
tools; no network and no corpus needed."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = Path("/usr/lib/python3.11/email")


def _tar(tree: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "--format=gnu", "--numeric-owner", "--sort=name", "-C", tree, "-cf", out, "."],
                   check=True)


def make_pair(root: Path) -> Path:
    """old: the email package; new: the same with two files changed and one added (a patch release)."""
    pair = root / "pairs" / "tiny"
    old, new = root / "trees" / "old", root / "trees" / "new"
    shutil.copytree(SOURCE, old / "usr/lib/email", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(old, new)
    for name in ("utils.py", "message.py"):
        path = new / "usr/lib/email" / name
        path.write_bytes(path.read_bytes().replace(b"def ", b"def  ", 3) + b"\n# patched\n")
    (new / "usr/lib/email/added.py").write_text("ADDED = True\n" * 500)
    _tar(old, pair / "old/layers/0.tar")
    _tar(new, pair / "new/layers/0.tar")
    (pair / "recipe.json").write_text(json.dumps({"built": "2024-06-01T12:00:00Z"}))
    return pair


def run_bench(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_bench_writes_results_for_a_tiny_pair(tmp_path: Path) -> None:
    make_pair(tmp_path)
    out = tmp_path / "results"
    proc = run_bench("--pairs-from", tmp_path / "pairs", "--cache", tmp_path / "cache", "--out", out,
                     "--repeat", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| tiny |" in proc.stdout  # the headline table

    results = json.loads((out / "results.json").read_text())
    cs = results["chunksync"]["tiny"]
    update, first = cs["update"], cs["first_pull"]
    assert update["path"] == first["path"] == "diff"
    assert 0 < update["wire_bytes"] < cs["changed_layer_bytes"]  # the point of it all: less than a full pull
    assert update["wire_bytes"] < first["wire_bytes"]
    assert update["server_requests"] == 1 and update["registry_requests"] >= 1
    assert update["wire_sent"] > 0 and update["client_peak_rss_mb"] > 0 and update["server_peak_rss_mb"] > 0
    # The pull's own count and the proxy's agree to within the HTTP framing it cannot see.
    assert abs(update["client_bytes_received"] - update["wire_received"]) < 1000
    assert cs["index"]["new"]["chunks"] > 0 and cs["index"]["new"]["cpu_s"] >= 0
    # The first device on v1 makes the server compute the pair's deltas, once; the later answers are cached.
    cold = cs["update_cold"]
    assert cold["path"] == "diff" and cold["delta_pairs_computed"] == 1 and cold["delta_compute_s"] > 0
    assert cold["delta_items"] > 0 and cold["wire_bytes"] == update["wire_bytes"]
    assert cs["local_pull"]["path"] == "local" and cs["local_pull"]["client_apply_cpu_s"] == 0
    # The zstd yardstick decompresses exactly what the update delivered.
    ref = cs["apply_reference"]
    assert ref["chunks"] == update["chunks_received"] and ref["decompress_cpu_s"] > 0
    assert ref["verify_cpu_s"] > 0 and ref["store_cpu_s"] > 0  # the floor: check and store the same chunks
    assert update["client_apply_cpu_s"] > 0

    tools = {r["tool"] for r in results["baselines"] if r["bytes"]}
    assert {"full", "bsdiff", "xdelta3"} <= tools
    assert all(r["verified"] for r in results["baselines"])
    assert [r["avg_kib"] for r in results["sweep"]] == [16, 32, 64, 128]
    assert all(r["total_bytes"] > r["index_bytes"] > 0 for r in results["sweep"])

    md = (out / "RESULTS.md").read_text()
    for heading in ("## Targets", "## Bytes for a device on v1 to get v2", "## Fleet economics",
                    "## Chunk-size sweep"):
        assert heading in md
    assert md.index("## Targets") < md.index("## Bytes for a device")
    targets = md[md.index("## Targets"):md.index("## Bytes for a device")]
    for row in ("| 1. bytes on the wire", "| 2a. server CPU", "| 2b. server peak memory", "| 3. client CPU to apply",
                "| 4. first pull"):
        assert row in targets
    # Each target's table has the pair's row with a verdict, whichever it is.
    assert targets.count("| tiny |") == 5
    assert all(("| met |" in line or "| **NOT MET** |" in line) for line in targets.splitlines()
               if line.startswith("| tiny |"))
    assert "| tiny | v2 after v1, first device (deltas computed) |" in md
    assert "| tiny | v2 after v1 |" in md
    for png in ("bytes.png", "cpu_vs_bytes.png", "sweep.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_a_pairs_dir_without_pairs(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    proc = run_bench("--pairs-from", tmp_path / "empty", "--cache", tmp_path / "cache", "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert "no pairs in" in proc.stderr and "old/layers/0.tar" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_bench_refuses_an_unknown_pair(tmp_path: Path) -> None:
    proc = run_bench("--only", "nosuchpair", "--cache", tmp_path / "cache", "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert "unknown pair(s) nosuchpair" in proc.stderr and "node" in proc.stderr
