"""What the workflow does in Snakemake's main process (standard library only: the Snakefile calls it).

- One run at a time per results directory: a results folder reached by two workflows (through a
  symbolic link, the same module prefix, or the Python API and a command line at once) would
  merge one run's ranks into the other's results. The run that uses it holds an exclusive lock
  on its ``.lock`` file; another stops with one line naming the holder.
- When a run fails, each job that failed for good is named with its log and the first error line
  there (``failed_jobs``), as the run's last words and in the Python API's errors: Snakemake's
  own last words say only that some job failed.
- At its end, Snakemake's idle rescheduling timers are cancelled, so that the process exits.
"""

import contextlib
import fcntl
import os
import re
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


_ERROR_BLOCK = re.compile(r"^Error in rule (\w+):\n((?:[ \t]+.*(?:\n|$))*)", re.M)
_CLEARED = re.compile(r"^(?:Trying to restart job |Finished jobid: )(\d+)", re.M)
_LOGS = re.compile(r"^\s+log: (.+?)(?: \(check log file\(s\) for error details\))?$", re.M)
# An error line in a job's log: logs.setup's two formats, and faulthandler's report of a crash.
_ERROR_LINE = re.compile(r"^(?:\S+ \S+ ERROR |esmshard: ERROR: |(?=Fatal Python error: ))(.+)$", re.M)
# The line before a script or shell job's error block: how its process ended.
_ENDED = re.compile(r"^Command '.*' (?:returned non-zero exit status (-?\d+)|died with <Signals\.(\w+): \d+>)\.$", re.M)
_EXCEPTION_LINE = re.compile(r"^(\w+(?:\.\w+)*(?:Error|Exception|Interrupt|Exit)\b.*)$", re.M)


def failed_jobs(snakemake_output: str, directory=".") -> list[str]:
    """One line per job that failed for good in ``snakemake_output`` (what a run printed, or its
    log file): its rule, the first error line of its log (paths relative to ``directory``,
    where snakemake ran) and the log. A job restarted or finished afterwards is left out."""
    failed = {}  # jobid -> (rule, logs), in the order of their last failure
    events = [(m.start(), m) for m in _ERROR_BLOCK.finditer(snakemake_output)]
    events += [(m.start(), m) for m in _CLEARED.finditer(snakemake_output)]
    events += [(m.start(), m) for m in _ENDED.finditer(snakemake_output)]
    ended = None  # how the last job process that failed ended
    for _, match in sorted(events, key=lambda event: event[0]):
        if match.re is _ENDED:
            ended = f"exit status {match[1]}" if match[1] is not None else f"killed by {match[2]}"
            continue
        if match.re is _CLEARED:
            failed.pop(int(match[1]), None)
            continue
        jobid = re.search(r"^\s+jobid: (\d+)$", match[2], re.M)
        logs = _LOGS.search(match[2])
        key = int(jobid[1]) if jobid else -match.start()
        failed.pop(key, None)
        failed[key] = (match[1], logs[1].split(", ") if logs else [], ended)
        ended = None
    return [_described(*job, Path(directory)) for job in failed.values()]


def _described(rule: str, logs: list[str], ended: str | None, directory: Path) -> str:
    for log in logs:
        error = first_error(directory / log)
        if error:
            return f"{rule} failed: {error} ({log})"
    how = f" ({ended})" if ended else ""
    if logs:
        return f"{rule} failed{how}; its log records no error ({', '.join(logs)})"
    return f"{rule} failed{how}; it has no log"


def first_error(log_path) -> str | None:
    """The first error line an esmshard job logged in ``log_path``, else the last exception of a
    traceback there; None when there is neither (or no such file)."""
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return None
    logged = _ERROR_LINE.search(text)
    if logged:
        return logged[1].strip()
    exceptions = _EXCEPTION_LINE.findall(text)
    return exceptions[-1].strip() if exceptions else None
