"""Faults on purpose, for the tests that prove crash safety with the real workflow.

Each acts only when its environment variable is set; a user's run never sets them.
"""

import os
import signal
import time

CRASH_ENV = "ESMSHARD_CRASH_AT"  # the rank kills itself (SIGKILL) at this named point
FAIL_ENV = "ESMSHARD_FAIL_RANKS"  # comma-separated ranks that raise on purpose
SLOW_ENV = "ESMSHARD_BATCH_SECONDS"  # every batch takes this many seconds more (a slow GPU)


def crash_point(name: str) -> None:
    """Die here, as a SIGKILL would, when the environment names this point."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def fail_if_asked(rank: int) -> None:
    """Raise for the ranks the environment names."""
    failing = {int(r) for r in os.environ.get(FAIL_ENV, "").split(",") if r.strip()}
    if rank in failing:
        raise RuntimeError(f"fault injected for rank {rank} ({FAIL_ENV})")


def slow_batch() -> None:
    """Take the seconds the environment names, as a slow batch would."""
    seconds = float(os.environ.get(SLOW_ENV) or 0)
    if seconds:
        time.sleep(seconds)
