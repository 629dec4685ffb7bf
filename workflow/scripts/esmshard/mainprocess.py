"""What the workflow does in Snakemake's main process (standard library only: the Snakefile calls it).

- One run at a time per results directory: a results folder reached by two workflows (through a
  symbolic link, the same module prefix, or the Python API and a command line at once) would
  merge one run's ranks into the other's results. The run that uses it holds an exclusive lock
  on its ``.lock`` file; another stops with one line naming the holder.
- At its end, Snakemake's idle rescheduling timers are cancelled, so that the process exits.
"""

import contextlib
import fcntl
import os
import socket
import threading
from datetime import datetime
from pathlib import Path

from esmshard import EsmShardError

LOCK_FILE = ".lock"
# Names the lock that a parent process holds for the snakemake commands it starts (the Python API).
HELD_ENV = "ESMSHARD_RESULTS_LOCK_HELD"

_HELD = {}  # path -> open file: a lock lasts while its file is open


def hold_results(results_dir) -> None:
    """Hold ``results_dir``'s lock until this process exits (a no-op when it already does, or when a
    parent holds it for this process), or raise EsmShardError naming the run that holds it."""
    path = lock_path(results_dir)
    if str(path) not in _HELD and os.environ.get(HELD_ENV) != str(path):
        _HELD[str(path)] = _take(path)


@contextlib.contextmanager
def results_lock(results_dir):
    """Hold ``results_dir``'s lock while in the block (raising as hold_results); yields the
    environment for the commands started meanwhile, which counts the lock as theirs."""
    path = lock_path(results_dir)
    with _take(path):
        yield {**os.environ, HELD_ENV: str(path)}


def lock_path(results_dir) -> Path:
    return Path(results_dir).resolve() / LOCK_FILE


def _take(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise EsmShardError(
            f"{path.parent} is in use by another esmshard run ({holder}): wait for it to end, or give this run "
            f"its own directory"
        ) from None
    handle.seek(0)
    handle.truncate()
    started = f"{datetime.now():%Y-%m-%d %H:%M:%S}"
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {started}, working directory {os.getcwd()}\n")
    handle.flush()
    return handle


def cancel_snakemake_timers() -> None:
    """Cancel the timers Snakemake's job scheduler leaves behind once the run is over, and no other.

    After every scheduling pass it starts a non-daemon threading.Timer of --max-jobs-per-timespan's
    timespan (1 s, the least the option can say) to schedule again; the interpreter waits for the
    last one before exiting, so every run ended ~1 s after its last job. Timers of other code (a
    module's, a user's in their own workflow) are not this workflow's to cancel.
    """
    for thread in threading.enumerate():
        if isinstance(thread, threading.Timer) and _is_snakemakes(thread.function):
            thread.cancel()


def _is_snakemakes(function) -> bool:
    return (getattr(function, "__module__", None) or "").startswith("snakemake.")
