"""One rank's run: its planned sequences to a complete shard, through the store.

The steps, each a function below: read the rank's share of the plan (``RankWork``); look the
share up in the store (``store.py``) and compute only what the store lacks (a GPU is leased and
the model loaded only then), saving finished work as store segments as it goes, so that a rank
killed at any moment resumes from its last segment; finally assemble the shard from the store.
The shard is the rule's output, which Snakemake deletes before every attempt: assembling it
again from the store costs disk I/O, never GPU work.
"""

import hashlib
import logging
import os
import resource
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from esmshard import EsmShardError
from esmshard.architectures import checkpoint_stamp, resolve_model
from esmshard.faults import crash_point, fail_if_asked
from esmshard.files import atomic_output, ensure_space
from esmshard.gpu import gpu_device, pin_gpu
from esmshard.index import SequenceIndex
from esmshard.outputs import OutputSpec, blocks, pooling_of, sorted_rows
from esmshard.plan import Plan, read_plan
from esmshard.progress import SNAPSHOT, Progress
from esmshard.settings import defaults
from esmshard.shard import ShardWriter, dataset_shapes, outputs_nbytes, sequence_nbytes, shard_problem
from esmshard.stopping import signals_deferred
from esmshard.store import (
    DamagedSegment,
    SegmentWriter,
    Store,
    discard_damaged,
    settings_identity,
    store_directory,
    store_key,
)

log = logging.getLogger(__name__)

# A window's outputs, saved as one store segment, are at most this size: the rank's host memory
# for outputs stays under ~4x it (the window filling; the one being written, copied once to sort it).
SEGMENT_BYTES = 512 << 20


@dataclass
class RankSettings:
    """The options a rank runs with: those that change the numbers and the operational ones, as in
    the config (whose schema holds their meanings and defaults)."""

    layers: list[int]
    pooling: list[str]
    long_sequences: str
    window_overlap: int
    precision: str  # of the computation; auto: float32 on the CPU, float16 on a GPU
    dtype: str  # of the stored vectors
    engine: str
    tokens_per_batch: int | None
    compile: bool | str
    progress_seconds: float
    chunk_sequences: int  # finished work goes to the store every this many sequences ...
    chunk_seconds: float  # ... or this many seconds, whichever comes first
    gpu_lock_dir: str
    threads: int = 2  # torch's CPU threads (the job's threads)

    @classmethod
    def from_config(cls, config: dict, **overrides) -> "RankSettings":
        """From a workflow config; options it lacks take the schema's defaults."""
        config = {**defaults(), **config, **overrides}
        return cls(**{field.name: config[field.name] for field in fields(cls) if field.name in config})


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
    checkpoint: dict  # the model (path: as the option names it), its files' digest, total size and latest time
    identity: dict  # the numeric settings, as the aggregation checks them
    compute_precision: str

    @property
    def store_identity(self) -> dict:
        return {**self.identity, "compute_precision": self.compute_precision}

    def shard_problem(self, path) -> str | None:
        """None when ``path`` is a complete shard of exactly this work, else what is wrong with it."""
        return shard_problem(path, self.ids, self.shard_attrs(), dataset_shapes(self.spec, self.lengths, self.dim))

    def run_attrs(self) -> dict:
        """What a shard of this work and the merged file share: the settings and the world size."""
        return {
            "settings_key": store_key(self.identity),
            "compute_precision": self.compute_precision,
            "world_size": self.world_size,
        }

    def shard_attrs(self) -> dict:
        """What identifies a complete shard of this work: the run's attributes, the rank and its share."""
        share = hashlib.sha256()
        for value in (self.ids.astype(str), self.digests):
            share.update(np.ascontiguousarray(value).tobytes())
        return {**self.run_attrs(), "share": share.hexdigest()[:32], "rank": self.rank}


def run_rank(
    index_dir, plan_path, checkpoint, rank: int, shard_path, store_root, settings: RankSettings, verify_store=False
) -> dict:
    """Make ``shard_path`` hold rank ``rank``'s embeddings, with the model ``checkpoint`` names (the
    one the plan was made with); returns throughput figures, where the rank ran and the store
    segments the shard reads. ``verify_store``: read every checksum of the store segments that hold
    the rank's sequences first (the aggregation could not read the shard's rows)."""
    fail_if_asked(rank)
    work = rank_work(SequenceIndex(index_dir), read_plan(plan_path), rank, settings)
    work.checkpoint = {**work.checkpoint, "path": str(checkpoint)}
    embedded = work.spec.embedded_lengths(work.lengths)
    snapshot = Path(store_root).parent / "progress" / SNAPSHOT.format(rank=rank)
    progress = Progress(len(work.ids), int(embedded.sum()), settings.progress_seconds, rank, snapshot)
    try:
        computed, gpu, engine, segments = fill_store_and_assemble(
            work, shard_path, store_root, settings, progress, verify=verify_store
        )
    except BaseException:
        progress.stopped()
        raise
    peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    peak_gpu_memory = gpu_peak_memory(engine)
    log.info(
        "rank %d: done; peak host memory %.2f GiB%s",
        rank,
        peak_memory,
        "" if peak_gpu_memory is None else f", peak GPU memory {peak_gpu_memory:.2f} GiB",
    )
    return {
        **progress.finish(),
        "gpu": gpu,
        "compute_precision": work.compute_precision,
        "peak_host_memory_gib": round(peak_memory, 2),
        "peak_gpu_memory_gib": peak_gpu_memory,
        "store": str(store_directory(store_root, work.store_identity)),
        "reused": len(work.ids) - computed,
        "embedded": computed,
        "bfloat16_batches": getattr(engine, "fallbacks", 0),
        "store_segments": [str(path) for path in segments],
    }


def gpu_peak_memory(engine) -> float | None:
    """GiB of GPU memory torch held at most in this process (None: no engine ran on a GPU)."""
    if engine is None or engine.device.type != "cuda":
        return None
    import torch

    return round(torch.cuda.max_memory_reserved(engine.device) / 2**30, 2)


def fill_store_and_assemble(
    work: RankWork, shard_path, store_root, settings: RankSettings, progress: Progress, engine=None, verify=False
):
    """Compute what the store lacks (with ``engine``, else the model loaded on a leased GPU), then
    assemble the shard from the store; a store segment found damaged while assembling (or, with
    ``verify``, by reading all its checksums first) is deleted and its sequences computed again.
    Returns (sequences computed, the GPU leased or None, the engine or None, the store segments
    the shard reads)."""
    gpu, computed = None, 0
    if verify:  # a damaged segment is deleted: its sequences are then computed as missing ones
        store = Store(store_root, work.store_identity, work.spec, work.dim, settings.dtype, writer=f"r{work.rank}")
        discard_damaged(store.segments_holding(work.digests), work.spec.names)
    for attempt in range(3):
        store = Store(store_root, work.store_identity, work.spec, work.dim, settings.dtype, writer=f"r{work.rank}")
        todo = np.flatnonzero(store.find(work.digests)[0] < 0)
        if not attempt:
            log.info(
                "rank %d/%d: %d distinct sequences, %d residues; %d already in the store %s, %d to compute",
                work.rank,
                work.world_size,
                len(work.ids),
                progress.total_residues,
                len(work.ids) - len(todo),
                store.directory,
                len(todo),
            )
            done = np.setdiff1d(np.arange(len(work.ids)), todo)
            progress.update(len(done), int(work.spec.embedded_lengths(work.lengths[done]).sum()), computed=False)
        if len(todo):
            if engine is None:
                engine, gpu = load_engine(work, settings, int(work.spec.tokens(work.lengths[todo]).sum()))
                progress.start_clock()
            compute(work, engine, todo, store, settings, progress)
            computed += len(todo)
            store = Store(store_root, work.store_identity, work.spec, work.dim, settings.dtype, writer=f"r{work.rank}")
        try:
            segments = assemble_shard(shard_path, work, store, settings.dtype, engine)
            return computed, gpu, engine, segments
        except DamagedSegment as error:
            log.warning("rank %d: %s; computing its sequences again", work.rank, error)
    raise EsmShardError(f"the store {store.directory} was found damaged three times; check the disk")


def rank_work(
    index: SequenceIndex, plan: Plan, rank: int, settings: RankSettings, precision: str | None = None
) -> RankWork:
    """Rank ``rank``'s work, computed in ``precision`` (default: what the settings resolve to on
    this host's device; the merge passes the one the rank's status records)."""
    if plan.fingerprint != index.fingerprint:
        raise EsmShardError("the plan was made for another index; rerun the plan rule")
    if not 0 <= rank < plan.world_size:
        raise EsmShardError(f"rank {rank} is outside the plan's world size {plan.world_size}")
    positions = plan.positions_of(rank)
    spec = OutputSpec.resolve(
        settings.layers, settings.pooling, plan.model["num_layers"], settings.long_sequences, settings.window_overlap
    )
    return RankWork(
        index,
        rank,
        plan.world_size,
        positions,
        index.ids(positions),
        index.lengths[positions],
        index.digests()[positions],
        spec,
        plan.model["embed_dim"],
        plan.model,
        settings_identity(plan.model["digest"], spec, settings.dtype, settings.engine),
        precision or compute_precision(settings, gpu_device()),  # (asking for the device runs nvidia-smi)
    )


def compute_precision(settings: RankSettings, device: str) -> str:
    if settings.precision != "auto":
        return settings.precision
    return "float32" if device == "cpu" else "float16"


def compute(work: RankWork, engine, todo: np.ndarray, store: Store, settings: RankSettings, progress: Progress):
    """Embed the sequences ``todo`` (increasing rows of ``work``) into store segments, as they finish.

    They go window by window: consecutive rows, at most ``chunk_sequences`` sequences and
    SEGMENT_BYTES of outputs, each window's batches packed on their own and saved as one segment in
    row order, so that the shard can refer to its per-residue rows in place (``Store.residue_runs``).
    Segments are written in the background (``SegmentWriter``); whatever stops the rank, every
    finished batch is saved first."""
    sizes = sequence_nbytes(work.spec, work.lengths[todo], work.dim, settings.dtype)
    windows = blocks(sizes, settings.chunk_sequences, SEGMENT_BYTES)
    batches, window_of = [], []
    for number, (start, end) in enumerate(windows):
        planned, budget = plan_batches(engine, work.lengths[todo[start:end]], settings)
        batches += [replace(batch, positions=start + batch.positions) for batch in planned]
        window_of += [number] * len(planned)
    largest = max(budget, *(batch.tokens for batch in batches))  # a lone window or sequence may be over
    log.info(
        "rank %d: %d batches of at most %d tokens, saved in %d windows", work.rank, len(batches), largest, len(windows)
    )
    unfinished = np.bincount(window_of, minlength=len(windows))  # batches of each window still to come
    read = lambda batch: [work.index.residues(p) for p in work.positions[todo[batch]]]  # noqa: E731
    writer, pending, last_save = SegmentWriter(store), [], time.monotonic()
    try:
        # a batch with only some of a protein's windows finishes no sequence: nothing to save
        for number, (batch, outputs) in zip(window_of, engine.embed_batches(batches, read)):
            if len(batch):
                pending.append((todo[batch], outputs))
            progress.update(len(batch), int(work.spec.embedded_lengths(work.lengths[todo[batch]]).sum()))
            unfinished[number] -= 1
            if not unfinished[number] or time.monotonic() - last_save >= settings.chunk_seconds:
                _save(writer, work, pending)
                last_save = time.monotonic()
        writer.wait()
    except BaseException:
        with signals_deferred():
            _save(writer, work, pending)
            writer.wait()
        log.info(
            "rank %d: stopped with %d of %d sequences in the store %s",
            work.rank,
            progress.sequences,
            len(work.ids),
            store.directory,
        )
        raise


def _save(writer: SegmentWriter, work: RankWork, pending: list) -> None:
    """Hand the pending batches to the writer as one segment, in row order. A stop signal that
    comes while the segment before is being written leaves them pending (the caller saves them);
    one that comes while they are handed over waits until they are."""
    if pending:
        writer.wait()
        with signals_deferred():
            batches = pending.copy()
            pending.clear()
            writer.submit(lambda: _segment(work, batches))


def _segment(work: RankWork, batches: list) -> tuple:
    """(digests, lengths, outputs) of finished batches [(rows, outputs)], in row order: each batch's
    rows copied once, straight to their place."""
    rows = np.concatenate([rows for rows, _ in batches])
    order, residue_order = sorted_rows(rows, work.spec.embedded_lengths(work.lengths[rows]))
    places = {}  # where each row of the batches goes, for the pooled and the per-residue outputs there are
    for per_residue in {pooling_of(name) == "per_residue" for name in batches[0][1]}:
        source_order = residue_order if per_residue else order
        places[per_residue] = np.empty_like(source_order)
        places[per_residue][source_order] = np.arange(len(source_order))
    outputs = {}
    for name, first in batches[0][1].items():
        place = places[pooling_of(name) == "per_residue"]
        values, done = np.empty((len(place), first.shape[1]), first.dtype), 0
        for _, out in batches:
            values[place[done : done + len(out[name])]] = out[name]
            done += len(out[name])
        outputs[name] = values
    return work.digests[rows[order]], work.lengths[rows[order]], outputs


def load_engine(work: RankWork, settings: RankSettings, tokens: int):
    """(the plan's model on a leased GPU or the CPU, as the engine the settings ask for, for
    ``tokens`` of work; the GPU)."""
    device = gpu_device()  # as the store key was made with
    if device == "cuda":
        gpu = pin_gpu(settings.gpu_lock_dir).gpu
    else:
        gpu, os.environ["CUDA_VISIBLE_DEVICES"] = None, ""
    import torch  # only now: CUDA reads CUDA_VISIBLE_DEVICES when it starts

    from esmshard.model import load_model

    torch.set_num_threads(settings.threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise EsmShardError(
            f"this host has an NVIDIA driver and GPU {gpu}, but torch {torch.__version__} "
            f"finds no usable CUDA device (a CPU-only torch build?)"
        )
    check_engine_precision(settings.engine, device, work.compute_precision)
    checkpoint = resolve_model(work.checkpoint["path"])
    if checkpoint_stamp(checkpoint) != {key: work.checkpoint[key] for key in ("size", "mtime_ns")}:
        raise EsmShardError(f"model: {checkpoint.location} changed after the plan was made; run snakemake again")
    started = time.monotonic()
    network, alphabet = load_model(str(checkpoint.location))
    precision = work.compute_precision
    engine, compile = build_engine(network, alphabet, device, precision, work.spec, settings)
    log.info(
        "model %s (%d layers, dim %d) on %s, %s engine in %s (compile %s), %d tokens to compute, outputs %s; "
        "loaded in %.1f s",
        checkpoint.location,
        network.num_layers,
        network.embed_dim,
        torch.cuda.get_device_name() if device == "cuda" else "cpu",
        settings.engine,
        precision,
        compile,
        tokens,
        ", ".join(work.spec.names),
        time.monotonic() - started,
    )
    return engine, gpu


def check_engine_precision(engine: str, device: str, precision: str) -> None:
    """Before the model loads: the one combination the engines cannot run."""
    if device == "cpu" and engine == "reference" and precision != "float32":
        raise EsmShardError(
            f"precision: the reference engine computes in float32 only on the CPU, not "
            f"{precision}; set precision to float32 or auto, or engine to packed"
        )


def build_engine(network, alphabet, device: str, precision: str, spec: OutputSpec, settings: RankSettings):
    """(the engine the settings ask for, on ``device`` (a torch device string); its compile mode)."""
    from esmshard.engine import PackedEngine, ReferenceEngine

    compile = compile_mode(settings, device.split(":")[0])
    if settings.engine == "packed":
        return PackedEngine(network, alphabet, device, precision, spec, compile, settings.dtype), compile
    return ReferenceEngine(network, alphabet, device, precision, spec, settings.dtype), False


def compile_mode(settings: RankSettings, device: str) -> bool | str:
    """The packed engine's compile mode: none on the CPU, and none for ``auto``: on an H200 eager
    float16 with the Triton LayerNorm and rotary kernels runs as fast as ``tuned`` (650M 302k
    residues/s both, 3B 89.2k and 88.8k; docs/benchmarks.md), which costs 20-40 s of compiling on
    a fresh machine."""
    if device != "cuda" or settings.compile == "auto":
        return False
    return settings.compile


def plan_batches(engine, lengths, settings: RankSettings):
    """``batching.Batch``es of positions in ``lengths`` for the engine, and the token budget."""
    from esmshard.batching import planned_batches
    from esmshard.engine import PackedEngine

    packed = isinstance(engine, PackedEngine)
    budget = settings.tokens_per_batch or (engine.default_tokens_per_batch() if packed else 4096)
    return planned_batches(lengths, engine.spec, budget, padded=not packed), budget


def assemble_shard(shard_path, work: RankWork, store: Store, dtype: str, engine=None) -> list[Path]:
    """The rank's shard from the store, in plan order; only a complete file lands. Its attributes
    say how many of this run's batches overflowed float16 and were computed in bfloat16. Returns
    the store segments its per-residue rows are read from."""
    runs = store.residue_runs(work.digests) if work.spec.per_residue else None
    log.info(
        "rank %d: assembling %s from %d store segments%s",
        work.rank,
        shard_path,
        len(store.segments),
        "" if runs is None else f", its per-residue rows referred to where they are ({len(runs)} runs)",
    )
    ensure_space(
        Path(shard_path).parent, outputs_nbytes(work.spec, work.lengths, work.dim, dtype, runs is None), "the shard"
    )
    with signals_deferred(), atomic_output(shard_path) as tmp:
        attrs = {
            **work.identity,
            **work.shard_attrs(),
            "model": work.checkpoint["path"],
            "bfloat16_batches": getattr(engine, "fallbacks", 0),
        }
        writer = ShardWriter(tmp, work.ids, work.lengths, work.spec, work.dim, dtype, attrs, runs)
        store.copy_to(writer, work.digests)
        writer.close()
        crash_point("shard-written")
    crash_point("shard-renamed")
    return sorted({path for path, *_ in runs or []})
