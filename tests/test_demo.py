"""`chunksync demo` runs end to end on this machine (real registry, umoci, skopeo, server) and cleans up."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_demo_runs_and_cleans_up() -> None:
    proc = subprocess.run([sys.executable, "-m", "client.cli", "demo"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert re.search(r"pull v1 \(empty store\): downloaded .* full pull", out)
    saved = float(re.search(r"pull v2 \(store has v1\): .*\(([\d.]+)% saved\)", out).group(1))
    assert saved > 90
    assert "is the registry's (same image ID)" in out
    work = Path(re.search(r"work dir (\S+)\)", out).group(1))
    assert not work.exists()
