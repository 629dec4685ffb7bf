"""Merging the shards of the ranks that succeeded into one file, in input order; it only reads.

A rank that failed for good left a failure shard (``shard.write_failure_shard``) and a failed
status; it counts as failed, with the error its status records. Every other shard is checked
against the current run before any of it is used: the plan's share of that rank (IDs and
residues), the numeric settings and the model's content, the rank and world size. A shard that is
missing, damaged or foreign, or whose rows cannot be read while merging (a store segment it reads
its per-residue rows from fails its checksum, or goes while the merge reads it), is *rejected*:
it counts as failed, never as data, and the merge goes on without it. Every ID gets its
sequence's embeddings, also where identical sequences were computed once.

Nothing here writes a rank's files: ``manifest.json`` says which ranks succeeded, which failed and
why, which IDs are missing, and gives each rejected rank a token, from which the next run's
Snakefile retries that rank's own job (``status.retry_failure``), which assembles its shard again
from the store (checking the store's segments first) and computes only what the store lacks.
"""

import errno
import json
import logging
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import h5py
import numpy as np

from esmshard import EsmShardError
from esmshard.files import atomic_output, ensure_space
from esmshard.index import SequenceIndex
from esmshard.outputs import blocks, pooling_of, ranges_index, residue_offsets
from esmshard.plan import Plan, read_plan
from esmshard.shard import create_outputs, missing_sources, outputs_nbytes, sequence_nbytes, shard_failure, write_attrs
from esmshard.status import new_token, read_status
from esmshard.work import RankSettings, RankWork, rank_work

log = logging.getLogger(__name__)

_BLOCK_ROWS = 16384  # sequences copied at a time ...
_BLOCK_BYTES = 256 << 20  # ... and at most this many bytes of their outputs
# Uncompressed outputs are written with O_DIRECT (past the page cache) where the file system
# takes it: in aligned pieces of at most _STAGE_BYTES, each a multiple of _ALIGNMENT (offsets,
# sizes and buffers of direct writes must be).
DIRECT_WRITES = True
_ALIGNMENT = 4096
_STAGE_BYTES = 32 << 20


def aggregate(
    index_dir,
    plan_path,
    shard_paths,
    status_paths,
    settings: RankSettings,
    out_path,
    manifest_path,
    missing_path,
    require_complete=False,
    compression="none",
) -> dict:
    """Merge the shards of the ranks that succeeded into ``out_path`` with that HDF5
    ``compression`` (none, gzip or lzf); returns the manifest, also written to ``manifest_path``."""
    index, plan = SequenceIndex(index_dir), read_plan(plan_path)
    if not len(shard_paths) == len(status_paths) == plan.world_size:
        raise EsmShardError(
            f"{len(shard_paths)} shards and {len(status_paths)} rank status files for a plan of {plan.world_size} ranks"
        )
    statuses, failed, rejected = {}, {}, {}
    for rank, path in enumerate(status_paths):
        try:
            statuses[rank] = read_status(path)
        except (OSError, ValueError) as error:
            failed[rank] = str(error)  # the next run retries the rank (status.retry_failure)
    # Of each good shard, only its rank's compute precision is kept: a rank's work holds its
    # share's IDs and keys, and all of them together would grow with the whole input.
    good, template = {}, None  # template: one good rank's work, for the settings all share
    for rank, status in statuses.items():
        failure = shard_failure(shard_paths[rank])
        if failure or not status["ok"]:
            failed[rank] = failure or status.get("error", "unknown error")
            continue
        work = rank_work(index, plan, rank, settings, status.get("compute_precision"))
        problem = work.shard_problem(shard_paths[rank])
        if problem:
            _reject(rank, f"shard {shard_paths[rank]} {problem}", failed, rejected)
        else:
            good[rank] = work.compute_precision
            template = work if template is None else template
    _check_same_precision(good, statuses)
    while True:  # again without a shard whose rows turn out unreadable
        keep = _check_enough(good, failed, plan, require_complete)
        nbytes = outputs_nbytes(template.spec, index.lengths[keep], template.dim, settings.dtype)
        ensure_space(Path(out_path).parent, nbytes, "the merged embeddings")
        try:
            with atomic_output(out_path) as tmp:
                shards = {r: shard_paths[r] for r in good}
                merge(tmp, shards, plan, keep, index.ids, index.lengths, template, compression)
            break
        except DamagedShard as damage:
            _reject(damage.rank, str(damage), failed, rejected)
            del good[damage.rank]
    missing = {r: index.ids(np.flatnonzero(plan.rank[plan.source] == r)).tolist() for r in sorted(failed)}
    manifest = _manifest(out_path, missing_path, plan, statuses, good, failed, rejected, missing, len(index))
    with atomic_output(missing_path) as tmp:
        Path(tmp).write_text("".join(f"{i}\n" for r in sorted(missing) for i in missing[r]))
    with atomic_output(manifest_path) as tmp:
        Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n")
    if failed:
        log.warning(
            "rank(s) %s failed: %d of %d sequences are missing from %s (IDs in %s). "
            "Rerun snakemake to retry only the failed ranks.",
            _list(failed),
            manifest["missing"],
            len(index),
            out_path,
            missing_path,
        )
    return manifest


class DamagedShard(EsmShardError):
    """Rows of a shard could not be read while merging (a store segment it reads failed its
    checksum, or went while the merge read it)."""

    def __init__(self, rank: int, error: Exception):
        self.rank, self.error = rank, " ".join(str(error).split())[:200]
        super().__init__(f"rank {rank}'s shard could not be read ({self.error})")


def _reject(rank: int, problem: str, failed: dict, rejected: dict) -> None:
    log.warning("rank %d: %s; it counts as failed and the next run redoes it", rank, problem)
    failed[rank], rejected[rank] = problem, new_token()


def _check_enough(good: dict, failed: dict, plan: Plan, require_complete: bool) -> np.ndarray:
    """[n] whether each ID's sequence is in a good shard (``good``: rank -> compute precision);
    raises when none is, or when some are missing and ``require_complete`` is set."""
    if not good:
        details = "; ".join(f"rank {r}: {error}" for r, error in sorted(failed.items()))
        raise EsmShardError(f"no rank succeeded, so there are no embeddings ({details}); see the rank logs")
    keep = np.isin(plan.rank[plan.source], list(good))
    if failed and require_complete:
        raise EsmShardError(
            f"require_complete is set and rank(s) {_list(failed)} failed ({int((~keep).sum())} sequences "
            f"missing); rerun snakemake to retry them"
        )
    return keep


def _check_same_precision(good: dict, statuses: dict) -> None:
    """``good``: each good rank's compute precision."""
    distinct = sorted(set(map(str, good.values())))
    if len(distinct) > 1:
        ranks = {r: statuses[r].get("host") for r in good}
        raise EsmShardError(
            f"the ranks computed in different precisions ({', '.join(distinct)}; "
            f"precision 'auto' on hosts with and without GPUs: {ranks}); set 'precision' explicitly and rerun"
        )


def _manifest(out_path, missing_path, plan: Plan, statuses, good, failed, rejected, missing, n_sequences) -> dict:
    n_missing = sum(len(ids) for ids in missing.values())
    return {
        "complete": not failed,
        "output": str(out_path),
        "fingerprint": plan.fingerprint,
        "world_size": plan.world_size,
        "model": plan.model["path"],
        "model_family": plan.model["family"],
        "random_weights": bool(plan.model.get("random_weights", False)),
        "sequences": n_sequences,
        "distinct_sequences": len(plan.position),
        "embedded": n_sequences - n_missing,
        "missing": n_missing,
        # distinct sequences of the succeeded ranks computed and taken from the store, as each rank's
        # latest job counted them: a rank this snakemake run did not start again keeps its counts
        "computed": sum(int(statuses[r].get("embedded", 0)) for r in good),
        "reused": sum(int(statuses[r].get("reused", 0)) for r in good),
        "missing_ids_file": str(missing_path),
        "ranks_succeeded": sorted(good),
        "ranks_failed": [
            {"rank": r, "error": failed[r], "missing_ids": missing[r]} | _rejection(r, rejected) for r in sorted(failed)
        ],
    }


def _rejection(rank: int, rejected: dict) -> dict:
    return {"rejected": rejected[rank]} if rank in rejected else {}


def _list(ranks) -> str:
    return ", ".join(str(r) for r in sorted(ranks))


def merge(
    path,
    shards: dict,
    plan: Plan,
    keep: np.ndarray,
    ids_of,
    lengths,
    work: RankWork,
    compression: str = "none",
) -> None:
    """Write the kept IDs in input order, each with its distinct sequence's rows from its shard.
    ``ids_of(positions)`` gives the IDs at increasing index positions: they are read and written
    block by block, so that the merge never holds every ID (~200 MiB per million proteins).
    Uncompressed outputs go to their datasets' storage through a ``RowAppender`` each."""
    spec = work.spec
    positions = np.flatnonzero(keep)
    distinct = plan.source[positions]  # [k] which distinct sequence each output row is
    row_in_shard = np.empty(len(plan.rank), np.int64)  # of each distinct sequence
    shard_offsets = {}
    for rank in shards:
        members = np.flatnonzero(plan.rank == rank)
        row_in_shard[members] = np.arange(len(members))
        shard_offsets[rank] = residue_offsets(spec.embedded_lengths(lengths[plan.position[members]]))
    embedded = spec.embedded_lengths(lengths[positions])
    out_offsets = residue_offsets(embedded)
    sources = {rank: h5py.File(p, "r") for rank, p in shards.items()}
    try:
        dtype = np.dtype(work.identity["dtype"])
        # big datasets start at a multiple of _ALIGNMENT, as direct writes need
        with (
            h5py.File(path, "w", alignment_threshold=1 << 20, alignment_interval=_ALIGNMENT) as out,
            ExitStack() as appending,  # the appenders' writes end before the file closes
        ):
            datasets = create_outputs(out, spec, None, lengths[positions], work.dim, dtype, compression, allocate=True)
            appenders = {
                name: appending.enter_context(RowAppender(path, dataset.id.get_offset(), dataset.nbytes))
                for name, dataset in datasets.items()
                if dataset.id.get_offset() is not None  # the allocated ones: uncompressed outputs
            }
            sizes = sequence_nbytes(spec, lengths[positions], work.dim, dtype)
            for start, end in blocks(sizes, _BLOCK_ROWS, _BLOCK_BYTES):
                out["ids"][start:end] = ids_of(positions[start:end])
                block_rank = plan.rank[distinct[start:end]]
                for name, dataset in datasets.items():
                    per_residue = pooling_of(name) == "per_residue"
                    out_start, out_end = (out_offsets[start], out_offsets[end]) if per_residue else (start, end)
                    ranks = np.unique(block_rank).tolist()
                    values = None if len(ranks) == 1 else np.empty((out_end - out_start, work.dim), dtype)
                    for rank in ranks:
                        mine = np.flatnonzero(block_rank == rank)
                        rows = row_in_shard[distinct[start + mine]]
                        if per_residue:
                            offsets = shard_offsets[rank]
                            rows = ranges_index(offsets[rows], embedded[start + mine])
                            mine = ranges_index(out_offsets[start + mine] - out_start, embedded[start + mine])
                        try:
                            found = _read_rows(sources[rank][name], rows)
                        except OSError as error:  # HDF5's checksum failures and unreadable sources
                            raise DamagedShard(rank, error) from None
                        if values is None:  # one shard's rows fill the block
                            values = found
                        else:
                            values[mine] = found
                    if name in appenders:  # blocks come in order: each appends after the last
                        appenders[name].append(values)
                    else:
                        dataset[out_start:out_end] = values
            for name, appender in appenders.items():
                appender.finish()
                if appender.written != datasets[name].nbytes:
                    raise EsmShardError(f"{name}: {appender.written} bytes merged, {datasets[name].nbytes} expected")
            _check_sources_kept(shards, sources, spec)
            attrs = {**work.identity, **work.run_attrs()}
            write_attrs(
                out,
                {
                    **attrs,
                    "model": work.checkpoint["path"],
                    "fingerprint": plan.fingerprint,
                    "versions": sources[min(shards)].attrs["versions"],
                    "ranks_succeeded": np.array(sorted(shards), np.int64),
                    "ranks_failed": np.array(sorted(set(range(plan.world_size)) - set(shards)), np.int64),
                    "n_missing": int((~keep).sum()),
                },
            )
    finally:
        for source in sources.values():
            source.close()


class RowAppender:
    """Appends rows to a contiguous dataset's storage (``nbytes`` allocated at byte ``offset`` of the
    file at ``path``), gathered in page-aligned buffers of at most _STAGE_BYTES and written on a
    thread while the merge reads on: with O_DIRECT (past the page cache) where the offset is
    aligned and the file system allows it, the unaligned end through the page cache. Copying
    gigabytes into the page cache costs more than the disk's time (docs/benchmarks.md)."""

    def __init__(self, path, offset: int, nbytes: int):
        self.written = 0
        self._stage = min(_STAGE_BYTES, -(-nbytes // _ALIGNMENT) * _ALIGNMENT)
        self._offset, self._filled, self._pending = offset, 0, None
        self._fd = os.open(path, os.O_WRONLY)
        self._direct_fd = _open_direct(path) if DIRECT_WRITES and offset % _ALIGNMENT == 0 else None
        self._buffers = [mmap.mmap(-1, self._stage) for _ in range(2)]  # one fills while one is written
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="row-writer")

    def append(self, values: np.ndarray) -> None:
        with memoryview(np.ascontiguousarray(values)).cast("B") as data:
            at = 0
            while at < len(data):
                n = min(len(data) - at, self._stage - self._filled)
                self._buffers[0][self._filled : self._filled + n] = data[at : at + n]
                self._filled, at = self._filled + n, at + n
                if self._filled == self._stage:
                    self._submit()

    def finish(self) -> None:
        """Write what is gathered and wait for every write; raises the first that failed."""
        if self._filled:
            self._submit()
        self._wait()

    def _submit(self) -> None:
        self._wait()  # the buffer filled next is the one whose write this waits for
        buffer = self._buffers.pop(0)
        self._buffers.append(buffer)
        self._pending = self._thread.submit(self._write, buffer, self._filled, self._offset)
        self._offset, self.written, self._filled = self._offset + self._filled, self.written + self._filled, 0

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _write(self, buffer: mmap.mmap, nbytes: int, offset: int) -> None:
        with memoryview(buffer) as view:
            direct = nbytes - nbytes % _ALIGNMENT if self._direct_fd is not None else 0
            if direct:
                try:
                    _write_at(self._direct_fd, view[:direct], offset)
                except OSError as error:  # a file system that opens with O_DIRECT but refuses its writes
                    if error.errno != errno.EINVAL:
                        raise
                    os.close(self._direct_fd)  # (only this thread writes with it)
                    self._direct_fd, direct = None, 0
            _write_at(self._fd, view[direct:nbytes], offset + direct)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)  # no write outlives the file
        for fd in (self._fd, self._direct_fd):
            if fd is not None:
                os.close(fd)
        for buffer in self._buffers:
            buffer.close()


def _open_direct(path) -> int | None:
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except (OSError, AttributeError):  # a file system without it (tmpfs on older kernels); not Linux
        return None


def _write_at(fd: int, data: memoryview, offset: int) -> None:
    while data:  # pwrite may write less than asked
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _check_sources_kept(shards: dict, sources: dict, spec) -> None:
    """DamagedShard for a shard whose store segments went while the merge read it: HDF5 reads the
    rows of a missing source as the fill value (NaN), which must never reach the merged file."""
    for rank, source in sources.items():
        gone = sorted(
            {
                file
                for name in spec.names
                if pooling_of(name) == "per_residue"
                for file in missing_sources(shards[rank], source[name])
            }
        )
        if gone:
            raise DamagedShard(rank, OSError(f"store segment {gone[0]} went while the merge read it"))


def _read_rows(dataset, rows: np.ndarray) -> np.ndarray:
    """dataset[rows] for rows in any order, with repeats: one contiguous read of their span, or
    of the distinct rows alone where the span is much longer (identical sequences far apart)."""
    if not len(rows):
        return np.empty((0,) + dataset.shape[1:], dataset.dtype)
    first, last = int(rows.min()), int(rows.max()) + 1
    if last - first == len(rows) and (np.diff(rows) == 1).all():  # a slice: read as it is, no copy
        return dataset[first:last]
    if last - first <= 2 * len(rows) + 4096:
        return dataset[first:last][rows - first]
    distinct, inverse = np.unique(rows, return_inverse=True)  # h5py reads increasing rows
    return dataset[distinct][inverse.ravel()]
