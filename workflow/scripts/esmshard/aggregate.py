"""Merging the shards of the ranks that succeeded into one file, in input order.

A rank that failed for good left a failure shard (``shard.write_failure_shard``) and a failed
status; it counts as failed, with the error the shard records.

Every other shard is checked against the current run before any of it is used: the plan's share of
that rank (IDs and residues), the numeric settings and the model's content, the rank and world
size. A shard that is missing or damaged is assembled again from the store (no GPU work); one
that cannot be, or was made for other settings, counts as a failed rank, never as data, and the
next run retries that rank. Every ID gets its sequence's embeddings, also where identical
sequences were computed once. A shard whose rows cannot be read while merging (a store segment it
refers to fails its checksums: the segment is deleted) counts as failed too, and the merge starts
again without it. The manifest says which ranks succeeded, which failed and why,
which IDs are missing, and how many sequences were reused from the store or computed.

The merged file holds its own copy of every row, or (``per_residue_in_embeddings: refer``) its
per-residue outputs are virtual datasets over the store segments that hold them, which the
manifest lists per rank: a segment lost later makes the next run retry those ranks
(``status.lost_segments``).
"""

import json
import logging
import os
from pathlib import Path

import h5py
import numpy as np

from esmshard import EsmShardError, atomic_output, ensure_space
from esmshard.index import SequenceIndex
from esmshard.outputs import blocks, pooling_of, ranges_index, residue_offsets
from esmshard.plan import Plan, read_plan
from esmshard.rank import RankSettings, RankWork, assemble_shard, rank_work
from esmshard.shard import (
    create_outputs,
    missing_sources,
    outputs_nbytes,
    sequence_nbytes,
    shard_failure,
    virtual_sources,
    write_attrs,
)
from esmshard.status import read_status, record_failure
from esmshard.store import MAX_VIRTUAL_RUNS, Store, discard_damaged

log = logging.getLogger(__name__)

_BLOCK_ROWS = 16384  # sequences copied at a time ...
_BLOCK_BYTES = 256 << 20  # ... and at most this many bytes of their outputs


def aggregate(
    index_dir,
    plan_path,
    shard_paths,
    status_paths,
    store_root,
    settings: RankSettings,
    out_path,
    manifest_path,
    missing_path,
    require_complete=False,
    compression="none",
    per_residue_in_embeddings="copy",
) -> dict:
    """Merge the shards of the ranks that succeeded (a failure shard or a failed status is a
    failed rank), into ``out_path`` with that HDF5 ``compression`` (none, gzip or lzf), its
    per-residue rows copied or referred to in the store (``per_residue_in_embeddings``: copy
    or refer); returns the manifest."""
    index, plan = SequenceIndex(index_dir), read_plan(plan_path)
    if not len(shard_paths) == len(status_paths) == plan.world_size:
        raise EsmShardError(
            f"{len(shard_paths)} shards and {len(status_paths)} rank status files for a plan of {plan.world_size} ranks"
        )
    statuses = [read_status(path) for path in status_paths]
    works, failed = _usable_ranks(index, plan, shard_paths, status_paths, statuses, store_root, settings)
    _check_same_precision(works, statuses)
    all_ids = index.ids()
    while True:  # again without a shard whose rows in the store turn out damaged
        keep = _check_enough(works, failed, plan, require_complete)
        first = next(iter(works.values()))  # the settings every good shard shares
        runs, segments = None, {}
        if per_residue_in_embeddings == "refer" and first.spec.per_residue:
            runs, segments = store_references(
                store_root, first, settings.dtype, index.digests()[keep], plan.rank[plan.source[keep]], compression
            ) or (None, {})
        ensure_space(
            Path(out_path).parent,
            outputs_nbytes(first.spec, index.lengths[keep], first.dim, settings.dtype, runs is None),
            "the merged embeddings",
        )
        try:
            with atomic_output(out_path) as tmp:
                merge(
                    tmp,
                    {r: shard_paths[r] for r in works},
                    plan,
                    keep,
                    all_ids,
                    index.lengths,
                    first,
                    compression,
                    runs,
                )
            break
        except DamagedShard as damage:
            problem = damaged_rows_problem(shard_paths[damage.rank], first.spec, damage)
            _count_failed(damage.rank, problem, status_paths[damage.rank], statuses[damage.rank], failed)
            del works[damage.rank]
            for rank in list(works):  # a deleted segment may hold rows of other shards too
                problem = works[rank].shard_problem(shard_paths[rank])
                if problem:
                    _count_failed(
                        rank, f"shard {shard_paths[rank]} {problem}", status_paths[rank], statuses[rank], failed
                    )
                    del works[rank]
    missing = {r: all_ids[plan.rank[plan.source] == r].tolist() for r in sorted(failed)}
    manifest = _manifest(out_path, missing_path, plan, statuses, works, failed, missing, len(all_ids))
    folder = Path(manifest_path).resolve().parent  # the store segments embeddings.h5 reads, from there
    manifest["store_segments_by_rank"] = {
        str(rank): [os.path.relpath(path.resolve(), folder) for path in paths]
        for rank, paths in sorted(segments.items())
    }
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
            len(all_ids),
            out_path,
            missing_path,
        )
    return manifest


def _usable_ranks(index, plan: Plan, shard_paths, status_paths, statuses: list, store_root, settings: RankSettings):
    """({rank: its RankWork} of the ranks whose shards can be merged, {rank: error} of the others)."""
    works, failed = {}, {}
    for rank, status in enumerate(statuses):
        failure = shard_failure(shard_paths[rank])
        if failure or not status["ok"]:
            failed[rank] = failure or status.get("error", "unknown error")
            continue
        work = rank_work(index, plan, rank, settings, status.get("compute_precision"))
        problem = usable_shard(Path(shard_paths[rank]), work, store_root, settings.dtype)
        if problem:
            _count_failed(rank, problem, status_paths[rank], status, failed)
        else:
            works[rank] = work
    return works, failed


class DamagedShard(EsmShardError):
    """Rows of a shard could not be read while merging (a store segment it refers to failed its checksum)."""

    def __init__(self, rank: int, error: Exception):
        self.rank, self.error = rank, " ".join(str(error).split())[:200]
        super().__init__(f"rank {rank}'s shard could not be read ({self.error})")


def damaged_rows_problem(shard_path, spec, damage: DamagedShard) -> str:
    """What to record for a shard whose rows could not be read: the store segments it refers to
    that fail their checksums are deleted (so that the next run computes their sequences again)."""
    with h5py.File(shard_path, "r") as h5:
        sources = {
            file for name in spec.names for file in virtual_sources(shard_path, h5[name]).values() if file.is_file()
        }  # (one gone already needs no deleting)
    damaged = discard_damaged(sorted(sources), [name for name in spec.names if pooling_of(name) == "per_residue"])
    found = f"; damaged store segments deleted: {', '.join(p.name for p in damaged)}" if damaged else ""
    return f"shard {shard_path} could not be read ({damage.error}){found}"


def _count_failed(rank: int, problem: str, status_path, status: dict, failed: dict) -> None:
    log.warning("rank %d: %s; it counts as failed and the next run retries it", rank, problem)
    record_failure(status_path, rank, problem, status.get("attempt", 1), host=status.get("host"))
    failed[rank] = problem


def _check_enough(works: dict, failed: dict, plan: Plan, require_complete: bool) -> np.ndarray:
    """[n] whether each ID's sequence is in a good shard; raises when none is, or when some are
    missing and ``require_complete`` is set."""
    if not works:
        details = "; ".join(f"rank {r}: {error}" for r, error in sorted(failed.items()))
        raise EsmShardError(f"no rank succeeded, so there are no embeddings ({details}); see the rank logs")
    keep = np.isin(plan.rank[plan.source], list(works))
    if failed and require_complete:
        raise EsmShardError(
            f"require_complete is set and rank(s) {_list(failed)} failed ({int((~keep).sum())} sequences "
            f"missing); rerun snakemake to retry them"
        )
    return keep


def usable_shard(path: Path, work: RankWork, store_root, dtype: str) -> str | None:
    """None when ``path`` holds exactly ``work`` (assembling it from the store first if it is
    missing or damaged); otherwise why it cannot be used."""
    problem = work.shard_problem(path)
    if not problem or "other settings" in problem:
        return problem and f"shard {path} {problem}"
    store = Store(store_root, work.store_identity, work.spec, work.dim, dtype, writer="aggregate")
    if (store.find(work.digests)[0] < 0).any():
        return f"shard {path} {problem}, and the store does not hold all its sequences"
    log.warning("rank %d: shard %s %s; assembling it again from the store", work.rank, path, problem)
    assemble_shard(path, work, store, dtype)
    return None


def store_references(store_root, work: RankWork, dtype: str, digests: np.ndarray, ranks: np.ndarray, compression: str):
    """Where the merged file's per-residue rows lie in the store, for sequences of these
    ``digests`` in output order (``ranks``: the rank each came from): (``Store.residue_runs``,
    {rank: the store segments that hold its rows}); None, saying why in the log, where they must
    be copied instead."""
    if compression != "none":
        why = f"compression {compression}: a compressed file holds its own copy"
    else:
        store = Store(store_root, work.store_identity, work.spec, work.dim, dtype, writer="aggregate")
        segment = store.find(digests)[0]
        lacking = int((segment < 0).sum())
        runs = None if lacking else store.residue_runs(digests)
        if runs is not None:
            log.info(
                "per-residue rows referred to where they are: %d runs of the store's %s", len(runs), store.directory
            )
            pairs = np.unique(np.stack([ranks, segment]), axis=1).tolist()  # every (rank, segment) pair there is
            return runs, {rank: [store.segments[s] for r, s in zip(*pairs) if r == rank] for rank in set(pairs[0])}
        why = (
            f"the store {store.directory} lacks {lacking} of their sequences"
            if lacking
            else f"they lie in too many runs of the store, over {MAX_VIRTUAL_RUNS}"
        )
    log.warning(
        "per_residue_in_embeddings is refer, but the per-residue rows are copied into the merged file (%s)", why
    )
    return None


def _check_same_precision(works: dict, statuses: list) -> None:
    precisions = {work.compute_precision for work in works.values()}
    if len(precisions) > 1:
        ranks = {r: statuses[r].get("host") for r in works}
        raise EsmShardError(
            f"the ranks computed in different precisions ({', '.join(sorted(map(str, precisions)))}; "
            f"precision 'auto' on hosts with and without GPUs: {ranks}); set 'precision' explicitly and rerun"
        )


def _manifest(out_path, missing_path, plan: Plan, statuses, works, failed, missing, n_sequences) -> dict:
    n_missing = sum(len(ids) for ids in missing.values())
    return {
        "complete": not failed,
        "output": str(out_path),
        "fingerprint": plan.fingerprint,
        "world_size": plan.world_size,
        "sequences": n_sequences,
        "distinct_sequences": len(plan.position),
        "embedded": n_sequences - n_missing,
        "missing": n_missing,
        # distinct sequences of the succeeded ranks computed and taken from the store, as each rank's
        # latest job counted them: a rank this snakemake run did not start again keeps its counts
        "computed": sum(int(statuses[r].get("embedded", 0)) for r in works),
        "reused": sum(int(statuses[r].get("reused", 0)) for r in works),
        "missing_ids_file": str(missing_path),
        "ranks_succeeded": sorted(works),
        "ranks_failed": [{"rank": r, "error": failed[r], "missing_ids": missing[r]} for r in sorted(failed)],
    }


def _list(ranks) -> str:
    return ", ".join(str(r) for r in sorted(ranks))


def merge(
    path,
    shards: dict,
    plan: Plan,
    keep: np.ndarray,
    all_ids,
    lengths,
    work: RankWork,
    compression: str = "none",
    residue_runs=None,
) -> None:
    """Write the kept IDs in input order, each with its distinct sequence's rows from its shard;
    with ``residue_runs`` (``store_references``) the per-residue outputs refer to the store instead."""
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
        with h5py.File(path, "w") as out:
            datasets = create_outputs(
                out, spec, all_ids[positions], lengths[positions], work.dim, dtype, compression, residue_runs
            )
            sizes = sequence_nbytes(spec, lengths[positions], work.dim, dtype, residue_runs is None)
            for start, end in blocks(sizes, _BLOCK_ROWS, _BLOCK_BYTES):
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
                    dataset[out_start:out_end] = values
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
