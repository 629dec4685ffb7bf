"""One rank's run: its planned sequences from the index to a complete shard file.

Also the rank's outcome record (the status file the workflow declares) and the soft-failure
rule: an attempt before the last re-raises so the scheduler retries; the last attempt records
the failure, with a fresh token that makes the next run of the workflow retry the rank.
"""

import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from esmshard import EsmShardError, atomic_output
from esmshard.architectures import MAX_RESIDUES
from esmshard.index import SequenceIndex
from esmshard.plan import read_plan

log = logging.getLogger(__name__)

FAULT_ENV = "ESMSHARD_FAIL_RANKS"  # comma-separated ranks that fail on purpose (for tests)


@dataclass
class RankSettings:
    model: str
    layer: int = -1
    pooling: str = "mean"
    precision: str = "auto"  # float32 on the CPU; on a GPU bfloat16 (packed) or float16 (reference)
    dtype: str = "float32"
    tokens_per_batch: int | None = None  # None: from free GPU memory (packed) or 4096 (reference)
    engine: str = "packed"
    compile: bool = True  # torch.compile the packed engine's layers (GPU only)
    progress_seconds: float = 30.0


def make_engine(network, alphabet, device: str, settings: RankSettings):
    from esmshard.engine import PackedEngine, ReferenceEngine

    precision = settings.precision
    if precision == "auto":
        precision = "float32" if device == "cpu" else ("bfloat16" if settings.engine == "packed" else "float16")
    if settings.engine == "packed":
        compile = settings.compile and device == "cuda"
        return PackedEngine(network, alphabet, device, precision, settings.layer, compile), precision
    return ReferenceEngine(network, alphabet, device, precision, settings.layer), precision


def plan_batches(engine, capped_lengths, settings: RankSettings):
    from esmshard.batching import packed_batches, padded_batches
    from esmshard.engine import PackedEngine

    if isinstance(engine, PackedEngine):
        budget = settings.tokens_per_batch or engine.default_tokens_per_batch()
        return packed_batches(capped_lengths, budget), budget
    budget = settings.tokens_per_batch or 4096
    return padded_batches(capped_lengths, budget), budget


def run_rank(index_dir, plan_path, rank: int, shard_path, settings: RankSettings) -> dict:
    """Embed rank ``rank``'s sequences into ``shard_path``; returns throughput figures."""
    import torch  # after the GPU lease has set CUDA_VISIBLE_DEVICES

    from esmshard.model import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.monotonic()
    network, alphabet = load_model(settings.model)
    engine, precision = make_engine(network, alphabet, device, settings)
    log.info(
        "model %s (%d layers, dim %d) on %s, %s engine in %s, layer %d; loaded in %.1f s",
        settings.model, network.num_layers, network.embed_dim,
        torch.cuda.get_device_name() if device == "cuda" else "cpu", settings.engine, precision,
        engine.layer, time.monotonic() - started,
    )
    del network  # the packed engine holds its own copy of the weights
    _inject_fault(rank)
    return embed_to_shard(index_dir, plan_path, rank, shard_path, engine, settings, precision)


def embed_to_shard(index_dir, plan_path, rank: int, shard_path, engine, settings: RankSettings, precision: str) -> dict:
    """The rank's planned sequences through ``engine`` into a complete shard file."""
    from esmshard.shard import ShardWriter

    index = SequenceIndex(index_dir)
    planned_rank, world_size, fingerprint = read_plan(plan_path)
    if fingerprint != index.fingerprint:
        raise EsmShardError(f"{plan_path} was planned for another index; rerun the index rule")
    if not 0 <= rank < world_size:
        raise EsmShardError(f"rank {rank} is outside the plan's world size {world_size}")
    positions = np.flatnonzero(planned_rank == rank)
    lengths = index.lengths[positions]
    capped = np.minimum(lengths, MAX_RESIDUES)
    batches, budget = plan_batches(engine, capped, settings)
    log.info(
        "rank %d/%d: %d sequences, %d residues, %d batches of at most %d tokens",
        rank, world_size, len(positions), int(capped.sum()), len(batches), budget,
    )
    attrs = {
        "model": str(settings.model),
        "layer": engine.layer,
        "pooling": settings.pooling,
        "precision": precision,
        "engine": settings.engine,
        "fingerprint": index.fingerprint,
        "rank": rank,
        "world_size": world_size,
        "max_residues": MAX_RESIDUES,
    }
    progress = Progress(len(positions), int(capped.sum()), settings.progress_seconds, rank)
    with atomic_output(shard_path) as tmp:
        writer = ShardWriter(tmp, index.ids(positions), lengths, engine.dim, settings.dtype, attrs)
        read = lambda batch: [index.residues(p) for p in positions[batch]]  # noqa: E731
        for batch, vectors in engine.embed_batches(batches, read):
            writer.write(batch, vectors, lengths[batch] > MAX_RESIDUES)
            progress.update(len(batch), int(capped[batch].sum()))
        writer.close()
    return progress.finish()


class Progress:
    """Logs sequences done/total, residues/s and ETA every ``interval`` seconds and at the end."""

    def __init__(self, total_sequences: int, total_residues: int, interval: float, rank: int):
        self.total_sequences, self.total_residues = total_sequences, total_residues
        self.interval, self.rank = interval, rank
        self.sequences = self.residues = 0
        self.started = self.last = time.monotonic()

    def update(self, sequences: int, residues: int) -> None:
        self.sequences += sequences
        self.residues += residues
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._log(now)

    def _log(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.residues / elapsed
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
        return {
            "sequences": self.sequences,
            "residues": self.residues,
            "seconds": round(seconds, 3),
            "residues_per_second": round(self.residues / max(seconds, 1e-9), 1),
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


def record_failure(status_path, token_path, rank: int, error: BaseException, attempt: int) -> None:
    """Last attempt failed: record it, and change the token so the next run retries this rank."""
    with atomic_output(token_path) as tmp:
        Path(tmp).write_text(secrets.token_hex(8) + "\n")
    write_status(status_path, rank=rank, ok=False, attempt=attempt, error=f"{type(error).__name__}: {error}")
