"""Progress: each rank's lines in its log and its snapshot file; one overall line for a person.

A rank's ``Progress`` logs sequences and residues done of its total, residues/s and an ETA every
``interval`` seconds (at the end of the batch that crosses it), right after its first computed
batch, and at the end; each time it also replaces its snapshot, ``results/progress/rank_<r>.json``.
The ETA divides the predicted cost still to do (``plan.sequence_costs``: attention's work grows
with the square of a sequence's length, and batches go longest first) by the cost done per
second, counted from the end of the first computed batch once a later one is done: the first
batch carries the start-up (GPU kernels loading, memory growing) that the rest does not, and an
ETA from it overstated the remainder three times.

``Watcher`` reads the snapshots that ranks wrote since a run started and hands an ``Overall``
(sums over ranks; the ETA of the slowest running rank, since ranks run side by side) to a
function: Snakemake's main process prints it as one plain line (SLURM logs stay readable), the
Python API passes it to its ``progress`` callback. Standard library only: the Snakefile uses it.
"""

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from esmshard.files import atomic_output

log = logging.getLogger(__name__)

SNAPSHOT = "rank_{rank}.json"


class Progress:
    """Logs a rank's progress and writes its snapshot (to ``snapshot_path``, when given);
    ``finish`` returns the figures."""

    def __init__(
        self,
        total_sequences: int,
        total_residues: int,
        interval: float,
        rank: int,
        snapshot_path=None,
        clock=time.monotonic,
        total_cost: float | None = None,
    ):
        """``total_cost``: the predicted cost of all the rank's work (default: its residues)."""
        self.total_sequences, self.total_residues = total_sequences, total_residues
        self.total_cost = total_residues if total_cost is None else total_cost
        self.interval, self.rank, self.snapshot_path, self.clock = interval, rank, snapshot_path, clock
        self.sequences = self.residues = self.reused_residues = self.reused_sequences = 0
        self.cost = self.reused_cost = 0.0
        self.started = self.last = clock()
        self.first_batch = None  # (time, residues, cost computed) at the end of the first computed batch

    def start_clock(self) -> None:
        """The rate counts from now: loading the model is not embedding."""
        self.started = self.last = self.clock()

    @property
    def computed_residues(self) -> int:
        return self.residues - self.reused_residues

    def update(self, sequences: int, residues: int, computed: bool = True, cost: float | None = None) -> None:
        """Count finished work (``cost``: its predicted cost, default its residues);
        ``computed=False`` for work found done (not in the rate)."""
        cost = residues if cost is None else cost
        self.sequences += sequences
        self.residues += residues
        self.cost += cost
        if not computed:
            self.reused_sequences += sequences
            self.reused_residues += residues
            self.reused_cost += cost
        now = self.clock()
        if computed and self.first_batch is None:  # start-up cost, as a user waits for it
            self.first_batch = (now, self.computed_residues, self.cost - self.reused_cost)
            log.info("rank %d: first batch done, %.1f s after the rank's process started", self.rank, process_age())
            self._report(now)
        elif now - self.last >= self.interval:
            self._report(now)

    def rate(self, now: float) -> float:
        """Residues computed per second (see _per_second)."""
        return self._per_second(now, self.computed_residues, 1)

    def eta(self, now: float) -> float:
        """Seconds until the rank's work is all done, at the measured cost per second (NaN: none yet)."""
        if self.residues >= self.total_residues:
            return 0.0
        rate = self._per_second(now, self.cost - self.reused_cost, 2)
        return max(self.total_cost - self.cost, 0.0) / rate if rate else float("nan")

    def _per_second(self, now: float, computed: float, field: int) -> float:
        """``computed`` (residues or cost) per second: since the first batch's end once a later batch
        is done, else since the clock started."""
        if self.first_batch is not None and computed > self.first_batch[field]:
            return (computed - self.first_batch[field]) / max(now - self.first_batch[0], 1e-9)
        return computed / max(now - self.started, 1e-9)

    def _report(self, now: float, state: str = "running") -> None:
        self.last = now
        rate, eta = self.rate(now), self.eta(now)
        log.info(
            "rank %d: %d/%d sequences (%.1f%%), %d/%d residues, %.0f residues/s, elapsed %s, ETA %s",
            self.rank,
            self.sequences,
            self.total_sequences,
            100 * self.sequences / max(self.total_sequences, 1),
            self.residues,
            self.total_residues,
            rate,
            clock_text(now - self.started),
            clock_text(eta),
        )
        if self.snapshot_path is not None:
            snapshot = RankSnapshot(
                self.rank,
                state,
                self.sequences,
                self.total_sequences,
                self.residues,
                self.total_residues,
                round(rate, 1),
                None if eta != eta else round(eta, 1),
                time.time(),
                f"pid {os.getpid()} on {socket.gethostname()}",
            )
            _write_json(self.snapshot_path, asdict(snapshot))

    def stopped(self) -> None:
        """The rank stops before its end: its snapshot says so (no longer running)."""
        self._report(self.clock(), "stopped")

    def finish(self) -> dict:
        now = self.clock()
        self._report(now, "done")
        seconds = now - self.started
        return {
            "sequences": self.sequences,
            "residues": self.residues,
            "residues_computed": self.computed_residues,
            "seconds": round(seconds, 3),
            "residues_per_second": round(self.computed_residues / max(seconds, 1e-9), 1),
        }


@dataclass
class RankSnapshot:
    rank: int
    state: str  # running, stopped or done
    sequences: int
    total_sequences: int
    residues: int
    total_residues: int
    residues_per_second: float
    eta_seconds: float | None  # None: not known yet
    updated: float  # wall-clock time (seconds since the epoch)
    process: str


@dataclass
class Overall:
    """Every rank that reported in this run, together."""

    running: int
    done: int
    sequences: int
    total_sequences: int
    residues: int
    total_residues: int
    residues_per_second: float  # of the running ranks together (once none runs: of those done)
    eta_seconds: float | None  # of the slowest running rank (0 once none runs; None: not known yet)

    def line(self) -> str:
        eta = "?" if self.eta_seconds is None else clock_text(self.eta_seconds)
        return (
            f"progress: {self.sequences:,}/{self.total_sequences:,} sequences "
            f"({100 * self.sequences / max(self.total_sequences, 1):.1f}%), "
            f"{self.residues:,}/{self.total_residues:,} residues, {self.residues_per_second:,.0f} residues/s, "
            f"ETA {eta} (ranks: {self.running} running, {self.done} done)"
        )


def overall(progress_dir, since: float, now: float | None = None) -> Overall | None:
    """The snapshots in ``progress_dir`` written at or after ``since`` (wall-clock seconds), summed
    as of ``now`` (default: the time); None when there are none. A snapshot that cannot be read
    (being replaced elsewhere) is left out."""
    snapshots = []
    for path in sorted(Path(progress_dir).glob(SNAPSHOT.format(rank="*"))):
        try:
            snapshot = RankSnapshot(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if snapshot.updated >= since:
            snapshots.append(snapshot)
    if not snapshots:
        return None
    running = [s for s in snapshots if s.state == "running"]
    done = [s for s in snapshots if s.state == "done"]
    now = time.time() if now is None else now  # a snapshot's ETA counts from when it was written
    etas = [None if s.eta_seconds is None else max(s.eta_seconds - (now - s.updated), 0.0) for s in running]
    return Overall(
        len(running),
        len(done),
        sum(s.sequences for s in snapshots),
        sum(s.total_sequences for s in snapshots),
        sum(s.residues for s in snapshots),
        sum(s.total_residues for s in snapshots),
        sum(s.residues_per_second for s in running or done),
        None if None in etas else max(etas, default=0.0),
    )


class Watcher:
    """Calls ``emit(Overall)`` from a background thread when the ranks' snapshots change: at once
    for a rank's first snapshot or a rank's end, else at most every ``interval`` seconds."""

    POLL_SECONDS = 1.0

    def __init__(self, progress_dir, interval: float, emit, since: float | None = None):
        self.progress_dir, self.interval, self.emit = Path(progress_dir), interval, emit
        self.since = time.time() if since is None else since
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="esmshard-progress", daemon=True)

    def start(self) -> "Watcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching, after handing over the last change (a rank's end, say)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self._poll(final=True)

    def _watch(self) -> None:
        while not self._stop.wait(min(self.POLL_SECONDS, self.interval)):
            self._poll()

    _shown, _last = None, float("-inf")

    def _poll(self, final: bool = False) -> None:
        now, shown = overall(self.progress_dir, self.since), self._shown
        if now is None or now == shown:
            return
        news = shown is None or (now.running + now.done, now.done) != (shown.running + shown.done, shown.done)
        if final or news or time.monotonic() - self._last >= self.interval:
            try:
                self.emit(now)
            except Exception as error:  # a user's callback must not go unnoticed, nor stop the run
                log.warning("progress callback failed: %s", error)
            self._shown, self._last = now, time.monotonic()


def process_age() -> float:
    """Seconds since this process started (Linux; NaN elsewhere)."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def clock_text(seconds: float) -> str:
    """H:MM:SS, or ? for NaN."""
    if seconds != seconds:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _write_json(path, value) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(value) + "\n")
