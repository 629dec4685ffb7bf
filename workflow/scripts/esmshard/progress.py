"""A rank's progress lines: sequences done/total, residues/s and ETA at a steady interval."""

import logging
import os
import time

log = logging.getLogger(__name__)


class Progress:
    """Logs progress every ``interval`` seconds and at the end; ``finish`` returns the figures."""

    def __init__(self, total_sequences: int, total_residues: int, interval: float, rank: int):
        self.total_sequences, self.total_residues = total_sequences, total_residues
        self.interval, self.rank = interval, rank
        self.sequences = self.residues = self.reused_residues = self.reused_sequences = 0
        self.started = self.last = time.monotonic()

    def start_clock(self) -> None:
        """The rate counts from now: loading the model is not embedding."""
        self.started = self.last = time.monotonic()

    def update(self, sequences: int, residues: int, computed: bool = True) -> None:
        """Count finished work; ``computed=False`` for work found done (not in the rate)."""
        if computed and self.sequences == self.reused_sequences:  # start-up cost, as a user waits for it
            log.info("rank %d: first batch done, %.1f s after the rank's process started", self.rank, process_age())
        if not computed:
            self.reused_sequences += sequences
        self.sequences += sequences
        self.residues += residues
        if not computed:
            self.reused_residues += residues
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._log(now)

    def _log(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = (self.residues - self.reused_residues) / elapsed
        eta = (self.total_residues - self.residues) / rate if rate else float("nan")
        log.info(
            "rank %d: %d/%d sequences (%.1f%%), %d/%d residues, %.0f residues/s, elapsed %s, ETA %s",
            self.rank,
            self.sequences,
            self.total_sequences,
            100 * self.sequences / max(self.total_sequences, 1),
            self.residues,
            self.total_residues,
            rate,
            _clock(elapsed),
            _clock(eta),
        )

    def finish(self) -> dict:
        now = time.monotonic()
        self._log(now)
        seconds = now - self.started
        computed = self.residues - self.reused_residues
        return {
            "sequences": self.sequences,
            "residues": self.residues,
            "residues_computed": computed,
            "seconds": round(seconds, 3),
            "residues_per_second": round(computed / max(seconds, 1e-9), 1),
        }


def process_age() -> float:
    """Seconds since this process started (Linux; NaN elsewhere)."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def _clock(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
