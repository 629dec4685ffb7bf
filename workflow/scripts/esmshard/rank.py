"""One rank's run: its planned sequences to a complete shard, through the store.

The steps, each a function below: read the rank's share of the plan (``RankWork``); keep the
shard if it already holds exactly that share with these settings; otherwise look the share up in
the store (``store.py``) and compute only what the store lacks (a GPU is leased and the model
loaded only then), saving finished work as store segments as it goes, so that a rank killed at
any moment resumes from its last segment; finally assemble the shard from the store.
"""

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from esmshard import EsmShardError, atomic_output
from esmshard.architectures import MAX_RESIDUES
from esmshard.faults import crash_point, fail_if_asked
from esmshard.gpu import visible_gpus
from esmshard.index import SequenceIndex
from esmshard.outputs import OutputSpec, piece_tokens
from esmshard.plan import read_plan
from esmshard.progress import Progress
from esmshard.shard import ShardWriter, dataset_shapes, shard_problem
from esmshard.stopping import signals_deferred
from esmshard.store import Store, settings_identity, store_key

log = logging.getLogger(__name__)

# Pending per-residue results go to a store segment at this size, so host memory stays bounded.
SEGMENT_BYTES = 1 << 30


@dataclass
class RankSettings:
    """The job's settings: the numeric ones (they change the embeddings) and the operational ones."""

    layers: tuple[int, ...] = (-1,)
    pooling: tuple[str, ...] = ("mean",)
    long_sequences: str = "truncate"  # or "window"
    window_overlap: int = 512
    precision: str = "auto"  # compute: float32 on the CPU; on a GPU bfloat16 (packed) or float16 (reference)
    dtype: str = "float32"  # stored
    engine: str = "packed"
    tokens_per_batch: int | None = None  # None: from free GPU memory (packed) or 4096 (reference)
    compile: bool | str = "tuned"  # torch.compile the packed engine's layers (GPU only); "tuned": autotuned too
    progress_seconds: float = 30.0
    segment_sequences: int = 10000  # finished work goes to the store every this many sequences ...
    segment_seconds: float = 300.0  # ... or this many seconds, whichever comes first
    gpu_lock_dir: str = "/tmp/esmshard-gpu-locks"
    threads: int = 2  # torch's CPU threads


@dataclass
class RankWork:
    """The rank's share of the plan: distinct sequences, in input order of their first occurrence."""

    index: SequenceIndex
    rank: int
    world_size: int
    positions: np.ndarray  # [m] index positions
    ids: np.ndarray  # [m] IDs (of the first occurrence)
    lengths: np.ndarray  # [m] residues
    digests: np.ndarray  # [m] store keys
    spec: OutputSpec
    dim: int
    checkpoint: dict  # path, digest, size, mtime_ns of the model file the plan was made with
    identity: dict  # the numeric settings, as the aggregation checks them
    compute_precision: str

    def shard_attrs(self) -> dict:
        """What identifies a complete shard of this work."""
        share = hashlib.sha256()
        for value in (self.ids.astype(str), self.digests):
            share.update(np.ascontiguousarray(value).tobytes())
        return {"settings_key": store_key(self.identity), "compute_precision": self.compute_precision,
                "share": share.hexdigest()[:32], "rank": self.rank, "world_size": self.world_size}


def run_rank(index_dir, plan_path, rank: int, shard_path, store_root, settings: RankSettings) -> dict:
    """Make ``shard_path`` hold rank ``rank``'s embeddings; returns throughput figures and where
    the rank ran."""
    fail_if_asked(rank)
    work = rank_work(index_dir, plan_path, rank, settings)
    embedded = work.spec.embedded_lengths(work.lengths)
    progress = Progress(len(work.ids), int(embedded.sum()), settings.progress_seconds, rank)
    where = {"gpu": None, "compute_precision": work.compute_precision}
    expected = work.shard_attrs()
    problem = shard_problem(shard_path, work.ids, expected, dataset_shapes(work.spec, work.lengths, work.dim))
    if not problem:
        log.info("rank %d: %s already holds these %d sequences with these settings; keeping it",
                 rank, shard_path, len(work.ids))
        progress.update(len(work.ids), int(embedded.sum()), computed=False)
        return {**progress.finish(), **where, "store": None, "reused": len(work.ids), "embedded": 0}
    if Path(shard_path).exists():
        log.info("rank %d: the existing %s %s; making it again", rank, shard_path, problem)
    store_identity = {**work.identity, "compute_precision": work.compute_precision}
    store = Store(store_root, store_identity, work.spec, work.dim, settings.dtype, writer=f"r{rank}")
    todo = np.flatnonzero(store.find(work.digests)[0] < 0)
    log.info("rank %d/%d: %d distinct sequences, %d residues; %d already in the store %s, %d to compute",
             rank, work.world_size, len(work.ids), int(embedded.sum()), len(work.ids) - len(todo),
             store.directory, len(todo))
    done = np.setdiff1d(np.arange(len(work.ids)), todo)
    progress.update(len(done), int(embedded[done].sum()), computed=False)
    if len(todo):
        where["gpu"] = compute(work, todo, store, settings, progress)
        store = Store(store_root, store_identity, work.spec, work.dim, settings.dtype, writer=f"r{rank}")
    assemble_shard(shard_path, work, store, settings.dtype)
    return {**progress.finish(), **where, "store": str(store.directory), "reused": len(work.ids) - len(todo),
            "embedded": len(todo)}


def rank_work(index_dir, plan_path, rank: int, settings: RankSettings) -> RankWork:
    index = SequenceIndex(index_dir)
    plan = read_plan(plan_path)
    if plan.fingerprint != index.fingerprint:
        raise EsmShardError(f"{plan_path} was planned for another index; rerun the plan rule")
    if not 0 <= rank < plan.world_size:
        raise EsmShardError(f"rank {rank} is outside the plan's world size {plan.world_size}")
    positions = plan.positions_of(rank)
    spec = OutputSpec.resolve(settings.layers, settings.pooling, plan.model["num_layers"],
                              settings.long_sequences, settings.window_overlap)
    return RankWork(
        index, rank, plan.world_size, positions, index.ids(positions), index.lengths[positions],
        index.digests()[positions], spec, plan.model["embed_dim"], plan.model,
        settings_identity(plan.model["digest"], spec, settings.dtype, settings.precision, settings.engine),
        compute_precision(settings, "cuda" if visible_gpus() else "cpu"),
    )


def compute_precision(settings: RankSettings, device: str) -> str:
    if settings.precision != "auto":
        return settings.precision
    return "float32" if device == "cpu" else ("bfloat16" if settings.engine == "packed" else "float16")


def compute(work: RankWork, todo: np.ndarray, store: Store, settings: RankSettings, progress: Progress):
    """Embed the sequences ``todo`` (rows of ``work``) into store segments; returns the GPU used."""
    from esmshard.gpu import pin_gpu

    lease = pin_gpu(settings.gpu_lock_dir)
    engine = load_engine(work, settings)
    batches, budget = plan_batches(engine, work.lengths[todo], settings)
    log.info("rank %d: %d batches of at most %d tokens", work.rank, len(batches), budget)
    read = lambda batch: [work.index.residues(p) for p in work.positions[todo[batch]]]  # noqa: E731
    pending, last_write = [], time.monotonic()
    try:
        for batch, outputs in engine.embed_batches(batches, read):
            pending.append((todo[batch], outputs))
            progress.update(len(batch), int(work.spec.embedded_lengths(work.lengths[todo[batch]]).sum()))
            if (sum(len(rows) for rows, _ in pending) >= settings.segment_sequences
                    or sum(v.nbytes for _, out in pending for v in out.values()) >= SEGMENT_BYTES
                    or time.monotonic() - last_write >= settings.segment_seconds):
                _save(store, work, pending)
                last_write = time.monotonic()
    except BaseException:
        _save(store, work, pending)  # keep every finished batch, whatever stops the rank
        log.info("rank %d: finished work is kept in the store %s", work.rank, store.directory)
        raise
    _save(store, work, pending)
    return lease.gpu


def _save(store: Store, work: RankWork, pending: list) -> None:
    if not pending:
        return
    rows = np.concatenate([rows for rows, _ in pending])
    outputs = {name: np.concatenate([out[name] for _, out in pending]) for name in pending[0][1]}
    pending.clear()
    with signals_deferred():
        store.write(work.digests[rows], work.lengths[rows], outputs)


def load_engine(work: RankWork, settings: RankSettings):
    """The model of the plan on this process's device, as the engine the settings ask for."""
    import torch  # only now: the GPU lease has set CUDA_VISIBLE_DEVICES

    from esmshard.engine import PackedEngine, ReferenceEngine
    from esmshard.model import load_model

    torch.set_num_threads(settings.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and work.compute_precision != compute_precision(settings, "cpu"):
        raise EsmShardError(
            f"CUDA_VISIBLE_DEVICES={visible_gpus()} names GPUs, but torch finds no usable CUDA device here"
        )
    checkpoint = Path(work.checkpoint["path"])
    stat = checkpoint.stat()
    if (stat.st_size, stat.st_mtime_ns) != (work.checkpoint["size"], work.checkpoint["mtime_ns"]):
        raise EsmShardError(f"model: {checkpoint} changed after the plan was made; run snakemake again")
    started = time.monotonic()
    network, alphabet = load_model(str(checkpoint))
    precision = work.compute_precision
    if settings.engine == "packed":
        engine = PackedEngine(network, alphabet, device, precision, work.spec, settings.compile if device == "cuda" else False)
    else:
        engine = ReferenceEngine(network, alphabet, device, precision, work.spec)
    log.info("model %s (%d layers, dim %d) on %s, %s engine in %s, outputs %s; loaded in %.1f s",
             checkpoint, network.num_layers, network.embed_dim,
             torch.cuda.get_device_name() if device == "cuda" else "cpu", settings.engine, precision,
             ", ".join(work.spec.names), time.monotonic() - started)
    return engine


def plan_batches(engine, lengths, settings: RankSettings):
    """Batches of positions in ``lengths`` for the engine, and the token budget."""
    from esmshard.batching import packed_batches, padded_batches
    from esmshard.engine import PackedEngine

    spec = engine.spec
    if isinstance(engine, PackedEngine):
        budget = settings.tokens_per_batch or engine.default_tokens_per_batch()
        return packed_batches(spec.tokens(lengths), budget), budget
    budget = settings.tokens_per_batch or 4096
    return padded_batches(piece_tokens(lengths), budget, spec.window_counts(lengths)), budget


def assemble_shard(shard_path, work: RankWork, store: Store, dtype: str) -> None:
    """The rank's shard from the store, in plan order; only a complete file lands."""
    log.info("rank %d: assembling %s from %d store segments", work.rank, shard_path, len(store.segments))
    with signals_deferred(), atomic_output(shard_path) as tmp:
        attrs = {**work.identity, **work.shard_attrs(), "model": work.checkpoint["path"]}
        writer = ShardWriter(tmp, work.ids, work.lengths, work.spec, work.dim, dtype, attrs)
        store.copy_to(writer, work.digests)
        writer.close()
        crash_point("shard-written")
    crash_point("shard-renamed")
