"""How long the reliability tests run: a few trials in the normal suite, many with `pytest --soak` (or
CHUNKSYNC_SOAK=1). tests/conftest.py sets the variable before test modules are imported."""
from __future__ import annotations

import os

SOAK = os.environ.get("CHUNKSYNC_SOAK") == "1"


def trials(normal: int, soak: int) -> int:
    return soak if SOAK else normal
