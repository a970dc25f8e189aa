"""CPU seconds and peak memory of processes: a running one read from /proc (the server), a child run under GNU time
(a pull, an index run)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """user + system CPU of every thread of `pid` so far, and of the children it has waited for (the server runs GNU
    gzip for gzip items): /proc/PID/stat utime + stime + cutime + cstime."""
    # The command name (field 2) may hold spaces; the fields after its closing ')' are fixed.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / _TICK


def _status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's resident-set high-water mark, in MB (10^6 bytes)."""
    return _status_mb(pid, "VmHWM")


def rss_mb(pid: int) -> float:
    """VmRSS: the process's resident set now, in MB."""
    return _status_mb(pid, "VmRSS")


def reset_peak_rss(pid: int) -> bool:
    """Starts VmHWM again from the current RSS (Linux >= 4.0, `5` to clear_refs); False if the kernel refuses,
    in which case the peak stays the process's lifetime high-water mark."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float       # user + system
    peak_rss_mb: float


def timed(cmd: list[str], env: dict[str, str] | None = None) -> Run:
    """Runs `cmd` under /usr/bin/time: its own CPU and peak RSS, not this process's."""
    # Python caches compiled modules as any install does, whatever this shell says: with PYTHONDONTWRITEBYTECODE
    # (set on the bench VM) every `chunksync` process compiled its sources again, ~0.1 s of a 0.9 s diff pull.
    env = {k: v for k, v in (os.environ if env is None else env).items() if k != "PYTHONDONTWRITEBYTECODE"}
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        proc = subprocess.run(["/usr/bin/time", "-f", "%e %U %S %M", "-o", tf.name, *cmd], capture_output=True,
                              text=True, env=env)
        wall, user, system, rss_kb = tf.read().split()[-4:]
    return Run(proc.returncode, proc.stdout, proc.stderr, float(wall), float(user) + float(system),
               int(rss_kb) * 1024 / 1e6)
