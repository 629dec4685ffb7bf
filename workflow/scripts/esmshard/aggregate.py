"""Merging the shards of the ranks that succeeded into one file, in input order.

Every accepted shard is checked against the plan first (same index fingerprint, exactly the
planned IDs in order, same settings and width); the manifest says which ranks succeeded,
which failed and why, and which IDs are missing.
"""

import json
import logging
from pathlib import Path

import h5py
import numpy as np

from esmshard import EsmShardError, atomic_output
from esmshard.index import SequenceIndex
from esmshard.plan import read_plan
from esmshard.rank import new_token, read_status
from esmshard.shard import read_attrs, shard_problem

log = logging.getLogger(__name__)

# Attributes every shard of one run must share; they are copied to the merged file.
SHARED_ATTRS = ("model", "layer", "pooling", "precision", "dtype", "engine", "fingerprint", "world_size", "max_residues")
_BLOCK_ROWS = 16384


def aggregate(index_dir, plan_path, status_paths, token_paths, out_path, manifest_path, missing_path,
              require_complete=False) -> dict:
    """Merge the shards of the ranks whose status says they succeeded.

    A shard that turns out damaged (unreadable, or not exactly its planned IDs and settings)
    counts as a failed rank, and its token (``token_paths``) changes so that the next run of
    the workflow recomputes it.
    """
    index = SequenceIndex(index_dir)
    planned_rank, world_size, fingerprint = read_plan(plan_path)
    if len(status_paths) != world_size:
        raise EsmShardError(f"{len(status_paths)} rank status files for a plan of {world_size} ranks")
    statuses = [read_status(path) for path in status_paths]
    failed = {r: status.get("error", "unknown error") for r, status in enumerate(statuses) if not status["ok"]}
    all_ids = index.ids()
    shards = {r: Path(status["shard"]) for r, status in enumerate(statuses) if status["ok"]}
    attrs, damaged = _check_shards(shards, planned_rank, all_ids, fingerprint, world_size)
    for rank, problem in damaged.items():
        log.warning("rank %d: %s; it counts as failed and the next run recomputes it", rank, problem)
        new_token(token_paths[rank])
        failed[rank] = problem
        del shards[rank]
    ok_ranks = sorted(shards)

    missing = {r: all_ids[planned_rank == r].tolist() for r in sorted(failed)}
    n_missing = sum(len(ids) for ids in missing.values())
    if not ok_ranks:
        details = "; ".join(f"rank {r}: {error}" for r, error in sorted(failed.items()))
        raise EsmShardError(f"no rank succeeded, so there are no embeddings ({details}); see the rank logs")
    if failed and require_complete:
        raise EsmShardError(
            f"require_complete is set and rank(s) {_list(failed)} failed ({n_missing} sequences missing); "
            f"rerun snakemake to retry them"
        )

    keep = np.isin(planned_rank, ok_ranks)
    with atomic_output(out_path) as tmp:
        _merge(tmp, shards, planned_rank, keep, all_ids, index.lengths, attrs)
        with h5py.File(tmp, "a") as h5:
            h5.attrs["ranks_succeeded"] = ok_ranks
            h5.attrs["ranks_failed"] = np.array(sorted(failed), dtype=np.int64)
            h5.attrs["n_missing"] = n_missing

    manifest = {
        "complete": not failed,
        "output": str(out_path),
        "fingerprint": fingerprint,
        "world_size": world_size,
        "sequences": len(all_ids),
        "embedded": int(keep.sum()),
        "missing": n_missing,
        "missing_ids_file": str(missing_path),
        "ranks_succeeded": ok_ranks,
        "ranks_failed": [{"rank": r, "error": failed[r], "missing_ids": missing[r]} for r in sorted(failed)],
    }
    with atomic_output(missing_path) as tmp:
        Path(tmp).write_text("".join(f"{i}\n" for r in sorted(missing) for i in missing[r]))
    with atomic_output(manifest_path) as tmp:
        Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n")
    if failed:
        log.warning(
            "rank(s) %s failed: %d of %d sequences are missing from %s (IDs in %s). "
            "Rerun snakemake to retry only the failed ranks.",
            _list(failed), n_missing, len(all_ids), out_path, missing_path,
        )
    return manifest


def _list(ranks) -> str:
    return ", ".join(str(r) for r in sorted(ranks))


def _check_shards(shards: dict, planned_rank, all_ids, fingerprint: str, world_size: int):
    """(attributes the good shards share, {rank: problem} for damaged shards)."""
    shared, width, versions = None, None, None
    damaged = {}
    for rank, path in shards.items():
        expected = {"fingerprint": fingerprint, "rank": rank, "world_size": world_size}
        problem = shard_problem(path, all_ids[planned_rank == rank], expected)
        if problem:
            damaged[rank] = f"shard {path} {problem}"
            continue
        attrs = read_attrs(path)
        with h5py.File(path, "r") as h5:
            shard_width = h5["embeddings"].shape[1]
        these = {key: attrs.get(key) for key in SHARED_ATTRS}
        if shared is not None and (these != shared or shard_width != width):
            differ = [key for key in SHARED_ATTRS if these[key] != shared[key]] or ["width"]
            raise EsmShardError(
                f"shard {path} was made with other settings ({', '.join(differ)}) than the other shards; "
                f"delete results/status and rerun"
            )
        shared, width, versions = these, shard_width, attrs.get("versions")
    return ({**shared, "versions": versions} if shared else None), damaged


def _merge(path, shards: dict, planned_rank, keep, all_ids, lengths, attrs: dict) -> None:
    """Write the kept sequences in input order, copying contiguous row ranges from each shard."""
    positions = np.flatnonzero(keep)
    row_in_shard = np.empty(len(planned_rank), np.int64)
    for rank in shards:
        members = np.flatnonzero(planned_rank == rank)
        row_in_shard[members] = np.arange(len(members))
    sources = {rank: h5py.File(p, "r") for rank, p in shards.items()}
    try:
        first = next(iter(sources.values()))
        dim, dtype = first["embeddings"].shape[1], first["embeddings"].dtype
        with h5py.File(path, "w") as out:
            n = len(positions)
            out.create_dataset("ids", data=all_ids[positions].astype(object), dtype=h5py.string_dtype())
            out.create_dataset("lengths", data=lengths[positions])
            truncated = out.create_dataset("truncated", (n,), bool)
            embeddings = out.create_dataset("embeddings", (n, dim), dtype, chunks=(max(1, min(n, 1024)), dim))
            for start in range(0, n, _BLOCK_ROWS):
                block = positions[start : start + _BLOCK_ROWS]
                block_rank = planned_rank[block]
                vectors = np.empty((len(block), dim), dtype)
                flags = np.empty(len(block), bool)
                for rank in np.unique(block_rank):
                    rows = row_in_shard[block[block_rank == rank]]  # consecutive rows of that shard
                    source = sources[int(rank)]
                    vectors[block_rank == rank] = source["embeddings"][rows[0] : rows[-1] + 1]
                    flags[block_rank == rank] = source["truncated"][rows[0] : rows[-1] + 1]
                embeddings[start : start + len(block)] = vectors
                truncated[start : start + len(block)] = flags
            out.attrs.update({key: value for key, value in attrs.items() if value is not None})
    finally:
        for source in sources.values():
            source.close()
