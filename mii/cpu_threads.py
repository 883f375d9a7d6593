"""OpenMP's wait policy for the engine's CPU threads.

OpenMP threads that spin while they wait take the cycles of the threads that feed them
(tokenizing, scheduling, a worker's publisher, Redis): on a small CPU host SmolLM2 ran 3-4x
slower in `mii.pipeline` than in a served worker, which sets OMP_WAIT_POLICY=PASSIVE. The
OpenMP runtime reads the variable once, when torch loads it, so it must be in the
environment before `import torch`: `mii.pipeline` sets it when torch is not loaded yet (a
value of the user's own wins) and says so when it is too late.
"""

from __future__ import annotations

import logging
import os
import sys

WAIT_POLICY = "OMP_WAIT_POLICY"
log = logging.getLogger(__name__)


def prefer_passive_omp_wait() -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE unless the user chose a policy or torch (and with it
    OpenMP) is loaded already; True when it is PASSIVE for this process's OpenMP."""
    if WAIT_POLICY in os.environ:
        return os.environ[WAIT_POLICY].upper() == "PASSIVE"
    torch = sys.modules.get("torch")
    if torch is None:
        os.environ[WAIT_POLICY] = "PASSIVE"
        return True
    if torch.cuda.is_available():
        return False  # the GPU does the work: no warning
    log.warning(
        "torch was imported before mii.pipeline, so OpenMP's threads spin while they wait "
        "(slow on a small CPU host): set %s=PASSIVE in the environment, or call "
        "mii.pipeline before importing torch",
        WAIT_POLICY,
    )
    return False
