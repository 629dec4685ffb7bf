"""One rank's run: its planned sequences from the index to a complete shard file.

Finished work is kept in chunk files (``chunks.py``) as the rank goes, so a rank killed at any
moment resumes where its last chunk ended; SIGTERM and SIGINT flush the finished batches into a
chunk and stop the rank with a non-zero exit (``Stopped``), and a rank over its time limit does
the same (``TimedOut``). Also the rank's outcome record (the status file the workflow declares) and the soft-failure
rule: an attempt before the last re-raises so the scheduler retries; the last attempt records
the failure, with a fresh token that makes the next run of the workflow retry the rank.
"""

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from esmshard import EsmShardError, atomic_output, crash_point
from esmshard.architectures import MAX_RESIDUES
from esmshard.index import SequenceIndex
from esmshard.plan import read_plan

log = logging.getLogger(__name__)

FAULT_ENV = "ESMSHARD_FAIL_RANKS"  # comma-separated ranks that fail on purpose (for tests)


# Pending per-residue results go to a chunk at this size, so host memory stays bounded.
CHUNK_BYTES = 1 << 30


@dataclass
class RankSettings:
    model: str
    layers: tuple[int, ...] = (-1,)
    pooling: tuple[str, ...] = ("mean",)
    long_sequences: str = "truncate"  # or "window"
    window_overlap: int = 512
    precision: str = "auto"  # float32 on the CPU; on a GPU bfloat16 (packed) or float16 (reference)
    dtype: str = "float32"
    tokens_per_batch: int | None = None  # None: from free GPU memory (packed) or 4096 (reference)
    engine: str = "packed"
    compile: bool | str = "tuned"  # torch.compile the packed engine's layers (GPU only); "tuned": autotuned too
    progress_seconds: float = 30.0
    chunk_sequences: int = 10000  # finished work goes to disk every this many sequences ...
    chunk_seconds: float = 300.0  # ... or this many seconds, whichever comes first


def make_engine(network, alphabet, device: str, settings: RankSettings):
    from esmshard.engine import PackedEngine, ReferenceEngine
    from esmshard.outputs import OutputSpec

    spec = OutputSpec.resolve(settings.layers, settings.pooling, network.num_layers, settings.long_sequences,
                              settings.window_overlap)
    precision = settings.precision
    if precision == "auto":
        precision = "float32" if device == "cpu" else ("bfloat16" if settings.engine == "packed" else "float16")
    if settings.engine == "packed":
        compile = settings.compile if device == "cuda" else False
        return PackedEngine(network, alphabet, device, precision, spec, compile), precision
    return ReferenceEngine(network, alphabet, device, precision, spec), precision


def plan_batches(engine, lengths, settings: RankSettings):
    """Batches of rank-local positions for sequences of these input lengths, and the budget."""
    from esmshard.batching import packed_batches, padded_batches
    from esmshard.engine import PackedEngine

    spec = engine.spec
    if isinstance(engine, PackedEngine):
        budget = settings.tokens_per_batch or engine.default_tokens_per_batch()
        return packed_batches(spec.tokens(lengths), budget), budget
    budget = settings.tokens_per_batch or 4096
    widths = np.minimum(lengths, MAX_RESIDUES) + 2  # a windowed sequence's windows are all full
    return padded_batches(widths, budget, spec.window_counts(lengths)), budget


def run_rank(index_dir, plan_path, rank: int, shard_path, work_dir, settings: RankSettings) -> dict:
    """Embed rank ``rank``'s sequences into ``shard_path``; returns throughput figures."""
    import torch  # after the GPU lease has set CUDA_VISIBLE_DEVICES

    from esmshard.model import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.monotonic()
    network, alphabet = load_model(settings.model)
    engine, precision = make_engine(network, alphabet, device, settings)
    log.info(
        "model %s (%d layers, dim %d) on %s, %s engine in %s, outputs %s; loaded in %.1f s",
        settings.model, network.num_layers, network.embed_dim,
        torch.cuda.get_device_name() if device == "cuda" else "cpu", settings.engine, precision,
        ", ".join(engine.spec.names), time.monotonic() - started,
    )
    del network  # the packed engine holds its own copy of the weights
    _inject_fault(rank)
    return embed_to_shard(index_dir, plan_path, rank, shard_path, work_dir, engine, settings, precision)


def embed_to_shard(index_dir, plan_path, rank: int, shard_path, work_dir, engine, settings, precision) -> dict:
    """The rank's planned sequences through ``engine`` into a complete shard file, resuming
    from the chunks of an earlier attempt with the same identity."""
    from esmshard.chunks import ChunkStore, PendingRows, work_key
    from esmshard.shard import ShardWriter, dataset_shapes, shard_problem

    index = SequenceIndex(index_dir)
    planned_rank, world_size, fingerprint = read_plan(plan_path)
    if fingerprint != index.fingerprint:
        raise EsmShardError(f"{plan_path} was planned for another index; rerun the index rule")
    if not 0 <= rank < world_size:
        raise EsmShardError(f"rank {rank} is outside the plan's world size {world_size}")
    positions = np.flatnonzero(planned_rank == rank)
    ids = index.ids(positions)
    lengths = index.lengths[positions]
    spec = engine.spec
    embedded = spec.embedded_lengths(lengths)
    identity = {  # everything that changes the numbers of this rank's shard
        "fingerprint": index.fingerprint,
        "model": model_identity(settings.model),
        **spec.attrs(),
        "dtype": settings.dtype,
        "precision": precision,
        "engine": settings.engine,
        "max_residues": MAX_RESIDUES,
        "rank": rank,
        "world_size": world_size,
    }
    progress = Progress(len(positions), int(embedded.sum()), settings.progress_seconds, rank)
    chunk_dir = Path(work_dir) / work_key(identity) / f"rank_{rank}"
    # the model as named may differ (another path to the same file); its identity may not
    expected = {key: value for key, value in shard_attrs(identity, settings.model).items() if key != "model"}
    problem = shard_problem(shard_path, ids, expected, dataset_shapes(spec, lengths, engine.dim))
    if problem and Path(shard_path).exists():
        log.warning("rank %d: the existing %s %s; computing it again", rank, shard_path, problem)
    if not problem:
        log.info("rank %d: %s is already complete for these settings; keeping it", rank, shard_path)
        shutil.rmtree(chunk_dir, ignore_errors=True)  # left over if a kill came right after the rename
        progress.update(len(ids), int(embedded.sum()), computed=False)
        return progress.finish()

    store = ChunkStore(chunk_dir, ids, embedded, spec.names, engine.dim, settings.dtype, identity)
    batches, budget = plan_batches(engine, lengths, settings)
    # Batches keep their composition across restarts (same budget), so a rerun computes the
    # very same batches as an uninterrupted run would; only fully finished ones are skipped.
    todo = [batch[~store.covered[batch]] for batch in batches]
    todo = [batch for batch in todo if len(batch)]
    log.info(
        "rank %d/%d: %d sequences, %d residues, %d batches of at most %d tokens; "
        "%d sequences already in %d chunks in %s",
        rank, world_size, len(positions), int(embedded.sum()), len(todo), budget,
        int(store.covered.sum()), len(store.paths), store.directory,
    )
    progress.update(int(store.covered.sum()), int(embedded[store.covered].sum()), computed=False)
    pending = PendingRows()
    last_chunk = time.monotonic()
    read = lambda batch: [index.residues(p) for p in positions[batch]]  # noqa: E731
    try:
        for batch, outputs in engine.embed_batches(todo, read):
            pending.add(batch, outputs)
            progress.update(len(batch), int(embedded[batch].sum()))
            if (pending.count >= settings.chunk_sequences or pending.nbytes >= CHUNK_BYTES
                    or time.monotonic() - last_chunk >= settings.chunk_seconds):
                with signals_deferred():
                    store.write(*pending.take())
                last_chunk = time.monotonic()
    except BaseException:
        if pending.count:  # keep every finished batch, whatever stops the rank
            with signals_deferred():
                store.write(*pending.take())
        log.info("rank %d: kept %d of %d sequences in chunks", rank, int(store.covered.sum()), len(positions))
        raise
    if pending.count:
        with signals_deferred():
            store.write(*pending.take())

    log.info("rank %d: assembling %s from %d chunks", rank, shard_path, len(store.paths))
    with signals_deferred(), atomic_output(shard_path) as tmp:
        writer = ShardWriter(tmp, ids, lengths, spec, engine.dim, settings.dtype, shard_attrs(identity, settings.model))
        for chunk_positions, outputs in store.read():
            writer.write(chunk_positions, outputs)
        writer.close()
        crash_point("shard-written")
    crash_point("shard-renamed")
    store.remove()  # the shard now holds everything the chunks held
    return progress.finish()


def model_identity(model: str) -> str:
    """The model as it affects the numbers: a released name, or a file with its size and time."""
    path = Path(model).expanduser()
    if path.is_file():
        stat = path.stat()
        return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return model


def shard_attrs(identity: dict, model: str) -> dict:
    """The shard's attributes: its identity, with the model as the user named it."""
    return {**identity, "model": str(model), "model_identity": identity["model"]}


class Stopped(Exception):
    """SIGTERM or SIGINT: finished work is on disk and the rank exits non-zero to be retried."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class TimedOut(Exception):
    """The rank ran past its time limit: finished work is on disk, the rank counts as failed."""


_deferred = {"depth": 0, "pending": None}


def _on_signal(signum, frame):
    error = TimedOut("rank ran past its time limit") if signum == signal.SIGALRM else Stopped(signum)
    if _deferred["depth"]:
        _deferred["pending"] = _deferred["pending"] or error  # raised when the write is done
    else:
        raise error


@contextlib.contextmanager
def signals_deferred():
    """A chunk or shard write finishes before a stop signal is acted on."""
    _deferred["depth"] += 1
    try:
        yield
    finally:
        _deferred["depth"] -= 1
    if not _deferred["depth"] and _deferred["pending"] is not None:
        error, _deferred["pending"] = _deferred["pending"], None
        raise error


def handle_stop_signals(timeout_seconds: float | None = None) -> None:
    """SIGTERM/SIGINT raise Stopped, and (with a timeout) SIGALRM raises TimedOut, in the main thread."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
        signal.signal(signum, _on_signal)
    if timeout_seconds:
        signal.setitimer(signal.ITIMER_REAL, timeout_seconds)


def disarm_timeout() -> None:
    """The work is done: no alarm may end the process now (at exit Python restores SIGALRM's
    default action, which would kill it)."""
    signal.setitimer(signal.ITIMER_REAL, 0)


def parse_duration(value) -> float | None:
    """Seconds from a number or a string such as '90s', '45m', '12h', '2d', '1:30:00'."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    if ":" in text:
        seconds = 0.0
        for part in text.split(":"):
            seconds = seconds * 60 + float(part)
        return seconds
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


class Progress:
    """Logs sequences done/total, residues/s and ETA every ``interval`` seconds and at the end."""

    def __init__(self, total_sequences: int, total_residues: int, interval: float, rank: int):
        self.total_sequences, self.total_residues = total_sequences, total_residues
        self.interval, self.rank = interval, rank
        self.sequences = self.residues = self.reused_residues = 0
        self.started = self.last = time.monotonic()

    def update(self, sequences: int, residues: int, computed: bool = True) -> None:
        """Count finished work; ``computed=False`` for work found done (not in the rate)."""
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
            self.rank, self.sequences, self.total_sequences,
            100 * self.sequences / max(self.total_sequences, 1), self.residues, self.total_residues,
            rate, _clock(elapsed), _clock(eta),
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


def _clock(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _inject_fault(rank: int) -> None:
    failing = {int(r) for r in os.environ.get(FAULT_ENV, "").split(",") if r.strip()}
    if rank in failing:
        raise RuntimeError(f"fault injected for rank {rank} ({FAULT_ENV})")


def write_status(path, **status) -> None:
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(status, indent=2) + "\n")


def read_status(path) -> dict:
    return json.loads(Path(path).read_text())


def read_token(path) -> str:
    """The rank's retry token ('' before any failure); the workflow uses it as a job parameter."""
    try:
        return Path(path).read_text().strip()
    except FileNotFoundError:
        return ""


def new_token(path) -> None:
    """Change the rank's token: the next run of the workflow reruns the rank."""
    with atomic_output(path) as tmp:
        Path(tmp).write_text(secrets.token_hex(8) + "\n")


def record_failure(status_path, token_path, rank: int, error: BaseException, attempt: int) -> None:
    """Last attempt failed: record it, and change the token so the next run retries this rank."""
    new_token(token_path)
    write_status(status_path, rank=rank, ok=False, attempt=attempt, error=f"{type(error).__name__}: {error}")
