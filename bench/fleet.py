"""Fleet economics, derived from one run's measured per-pair costs: the server CPU to move a fleet of devices spread
over K old versions to the new one, for chunksync and for each precomputed-patch tool."""

from __future__ import annotations

KS = (1, 5, 20)
DEVICES = 1000  # devices in the fleet, spread evenly over the K old versions

# The model, per pair (the measured pair stands in for every old version: a device K versions behind would need a
# bigger diff with every method, which this leaves out):
#   chunksync   index the new image once (measured `chunksync index` CPU) + K x the pair's delta computation (the
#               first, cold answer's CPU minus a cached answer's) + DEVICES x the measured cached answer CPU of the
#               server for a device on v1.
#   patch tools K x the measured patch make CPU (one patch per old version), + DEVICES x sending a ready file,
#               counted as 0 CPU (a static file or registry blob: cheap, and left out in the tools' favour).
#   full pull   0: the registry serves the pushed layer blobs as they are.
# Bytes on the wire per device do not depend on K in this model: DEVICES x the per-device bytes of each method.


def server_cpu(method: str, k: int, costs: dict) -> float | None:
    """Server CPU seconds for DEVICES devices on K old versions; `costs` = {index_cpu_s, pair_cpu_s, answer_cpu_s,
    make_cpu_s}."""
    if method == "chunksync":
        return costs["index_cpu_s"] + k * costs["pair_cpu_s"] + DEVICES * costs["answer_cpu_s"]
    if method == "full":
        return 0.0
    make = costs.get("make_cpu_s")
    return None if make is None else k * make


def break_even_devices(k: int, costs: dict) -> float | None:
    """Devices at which chunksync's total server CPU reaches a patch tool's K precomputed patches."""
    make, answer = costs.get("make_cpu_s"), costs["answer_cpu_s"]
    if make is None:
        return None
    budget = k * (make - costs["pair_cpu_s"]) - costs["index_cpu_s"]
    if budget <= 0:
        return 0.0
    return float("inf") if answer <= 0 else budget / answer
