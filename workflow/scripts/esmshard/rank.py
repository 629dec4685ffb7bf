"""One rank's run: its planned sequences to a complete shard, through the store.

The steps, each a function below: read the rank's share of the plan (``RankWork``); look the
share up in the store (``store.py``) and compute only what the store lacks (a GPU is leased and
the model loaded only then), saving finished work as store segments as it goes, so that a rank
killed at any moment resumes from its last segment; finally assemble the shard from the store.
The shard is the rule's output, which Snakemake deletes before every attempt: assembling it
again from the store costs disk I/O, never GPU work.
"""

import logging
import os
import resource
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from esmshard import EsmShardError
from esmshard.faults import crash_point, fail_if_asked, slow_batch
from esmshard.files import atomic_output, ensure_space
from esmshard.gpu import gpu_device, pin_gpu
from esmshard.outputs import blocks
from esmshard.progress import SNAPSHOT, Progress
from esmshard.shard import ShardWriter, outputs_nbytes, sequence_nbytes
from esmshard.stopping import signals_deferred
from esmshard.store import DamagedSegment, SegmentWriter, Store, discard_damaged, store_directory
from esmshard.work import RankSettings, RankWork, read_rank_work

log = logging.getLogger(__name__)

# A store segment's outputs are at most this size: the rank's host memory for outputs stays under
# ~4x it (the segment filling; the one being written, copied once to sort it).
SEGMENT_BYTES = 512 << 20
# ``Engine.stats`` of a rank that computed nothing (and loaded no model)
NOTHING_COMPUTED = {"bfloat16_batches": 0, "out_of_memory_splits": 0, "cpu_batches": 0, "peak_gpu_memory_gib": None}


def run_rank(
    index_dir, plan_path, checkpoint, rank: int, shard_path, store_root, settings: RankSettings, verify_store=False
) -> dict:
    """Make ``shard_path`` hold rank ``rank``'s embeddings, with the model ``checkpoint`` names (the
    one the plan was made with); returns throughput figures, where the rank ran and the store
    segments the shard reads. ``verify_store``: read every checksum of the store segments that hold
    the rank's sequences first (the aggregation could not read the shard's rows)."""
    fail_if_asked(rank)
    work = read_rank_work(index_dir, plan_path, rank, settings)
    work.checkpoint = {**work.checkpoint, "path": str(checkpoint)}
    embedded = work.spec.embedded_lengths(work.lengths)
    snapshot = Path(store_root).parent / "progress" / SNAPSHOT.format(rank=rank)
    progress = Progress(
        len(work.ids),
        int(embedded.sum()),
        settings.progress_seconds,
        rank,
        snapshot,
        total_cost=work.costs(slice(None)),
    )
    try:
        computed, gpu, stats, segments = fill_store_and_assemble(
            work, shard_path, store_root, settings, progress, verify=verify_store
        )
    except BaseException:
        progress.stopped()
        raise
    peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    peak_gpu_memory = stats["peak_gpu_memory_gib"]
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
        "store": str(store_directory(store_root, work.store_identity)),
        "reused": len(work.ids) - computed,
        "embedded": computed,
        **stats,
        "store_segments": [str(path) for path in segments],
    }


def fill_store_and_assemble(
    work: RankWork, shard_path, store_root, settings: RankSettings, progress: Progress, engine=None, verify=False
):
    """Compute what the store lacks (with ``engine``, else the model loaded on a leased GPU), then
    assemble the shard from the store; a store segment found damaged while assembling (or, with
    ``verify``, by reading all its checksums first) is deleted and its sequences computed again.
    Returns (sequences computed, the GPU leased or None, the engine's stats, the store segments
    the shard reads)."""
    gpu, computed = None, 0
    if verify:  # a damaged segment is deleted: its sequences are then computed as missing ones
        store = work.open_store(store_root, settings)
        discard_damaged(store.segments_holding(work.digests), work.spec.names)
    for attempt in range(3):
        store = work.open_store(store_root, settings)
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
            residues = int(work.spec.embedded_lengths(work.lengths[done]).sum())
            progress.update(len(done), residues, computed=False, cost=work.costs(done))
        if len(todo):
            if engine is None:
                engine, gpu = load_engine(work, settings, int(work.spec.tokens(work.lengths[todo]).sum()))
                progress.start_clock()
            compute(work, engine, todo, store, settings, progress)
            computed += len(todo)
            store = work.open_store(store_root, settings)
        try:
            stats = NOTHING_COMPUTED if engine is None else engine.stats()
            segments = assemble_shard(shard_path, work, store, settings.dtype, stats["bfloat16_batches"])
            return computed, gpu, stats, segments
        except DamagedSegment as error:
            log.warning("rank %d: %s; computing its sequences again", work.rank, error)
    raise EsmShardError(f"the store {store.directory} was found damaged three times; check the disk")


def compute(work: RankWork, engine, todo: np.ndarray, store: Store, settings: RankSettings, progress: Progress):
    """Embed the sequences ``todo`` (increasing rows of ``work``) into store segments, as they finish.

    Consecutive rows make a segment: at most ``segment_sequences`` sequences and SEGMENT_BYTES of
    outputs, its batches packed on their own and saved in row order (more often, as several
    segments, where ``segment_seconds`` pass first), so that the shard reads its per-residue rows
    in few runs (``Store.residue_runs``). Segments are written in the background
    (``SegmentWriter``); whatever stops the rank, every finished batch is saved first."""
    sizes = sequence_nbytes(work.spec, work.lengths[todo], work.dim, settings.dtype)
    segments = blocks(sizes, settings.segment_sequences, SEGMENT_BYTES)
    batches, segment_of = [], []
    for number, (start, end) in enumerate(segments):
        planned, budget = engine.batches(work.lengths[todo[start:end]], settings.tokens_per_batch)
        batches += [replace(batch, positions=start + batch.positions) for batch in planned]
        segment_of += [number] * len(planned)
    largest = max(budget, *(batch.tokens for batch in batches))  # a lone long sequence may be over
    log.info(
        "rank %d: %d batches of at most %d tokens, saved in %d segments",
        work.rank,
        len(batches),
        largest,
        len(segments),
    )
    unfinished = np.bincount(segment_of, minlength=len(segments))  # batches of each segment still to come
    read = lambda batch: [work.index.residues(p) for p in work.positions[todo[batch]]]  # noqa: E731
    writer, pending, last_save = SegmentWriter(store), [], time.monotonic()
    try:
        # a batch with only some of a protein's windows finishes no sequence: nothing to save
        for number, (batch, outputs) in zip(segment_of, engine.embed_batches(batches, read)):
            slow_batch()
            if len(batch):
                pending.append((todo[batch], outputs))
            rows = todo[batch]
            progress.update(
                len(batch), int(work.spec.embedded_lengths(work.lengths[rows]).sum()), cost=work.costs(rows)
            )
            unfinished[number] -= 1
            if not unfinished[number] or time.monotonic() - last_save >= settings.segment_seconds:
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
            writer.submit(lambda: work.segment(batches))


def load_engine(work: RankWork, settings: RankSettings, tokens: int):
    """(the plan's model on a leased GPU or the CPU, as the engine the settings ask for; the GPU)."""
    device = gpu_device()  # as the store key was made with
    if device == "cuda":
        gpu = pin_gpu(settings.gpu_lock_dir).gpu
    else:
        gpu, os.environ["CUDA_VISIBLE_DEVICES"] = None, ""
    import torch  # only now: CUDA reads CUDA_VISIBLE_DEVICES when it starts

    from esmshard.engine import open_engine

    torch.set_num_threads(settings.threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise EsmShardError(
            f"this host has an NVIDIA driver and GPU {gpu}, but torch {torch.__version__} "
            f"finds no usable CUDA device (a CPU-only torch build?)"
        )
    log.info("rank %d: %d tokens to compute", work.rank, tokens)
    engine = open_engine(work.checkpoint, settings.engine, device, work.compute_precision, work.spec, settings.dtype)
    return engine, gpu


def assemble_shard(shard_path, work: RankWork, store: Store, dtype: str, bfloat16_batches: int) -> list[Path]:
    """The rank's shard from the store, in plan order; only a complete file lands. Its attributes
    say how many of this run's batches overflowed float16 and were computed in bfloat16
    (``bfloat16_batches``). Returns
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
            "bfloat16_batches": bfloat16_batches,
        }
        writer = ShardWriter(tmp, work.ids, work.lengths, work.spec, work.dim, dtype, attrs, runs)
        store.copy_to(writer, work.digests)
        writer.close()
        crash_point("shard-written")
    crash_point("shard-renamed")
    return sorted({path for path, *_ in runs or []})
