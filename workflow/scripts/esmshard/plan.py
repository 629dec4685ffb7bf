"""Which rank embeds which sequences: each distinct sequence once, balanced by predicted cost.

Identical sequences (the same residues under other IDs, common in mutant scans and ORF sets)
are planned once, at their first occurrence; every ID gets that sequence's embeddings.

A sequence of T tokens costs about 24·d·T FLOPs per layer in its linear layers and 4·d·T² in
attention, so cost ∝ T + T²/(6·d) for a model of width d. Longest-processing-time-first
assignment (each sequence, most expensive first, to the least loaded rank) keeps the most
loaded rank within one small sequence of the mean.
"""

import heapq
import shutil
from dataclasses import dataclass

import h5py
import numpy as np

from esmshard import atomic_output
from esmshard.outputs import OutputSpec, piece_tokens
from esmshard.shard import outputs_nbytes


@dataclass
class Plan:
    rank: np.ndarray  # [u] int32, the rank of each distinct sequence
    position: np.ndarray  # [u] int64, the index position of its first occurrence (increasing)
    source: np.ndarray  # [n] int64, the distinct sequence (0..u-1) at each index position
    world_size: int
    fingerprint: str  # of the index it was planned from
    model: dict  # the checkpoint: path, digest (of its content), num_layers, embed_dim

    def positions_of(self, rank: int) -> np.ndarray:
        """Index positions of the rank's distinct sequences, in input order."""
        return self.position[self.rank == rank]


def distinct(digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index positions of each distinct digest's first occurrence, increasing;
    [n] which of them each position is)."""
    _, first, inverse = np.unique(digests, return_index=True, return_inverse=True)
    order = np.argsort(first)
    number = np.empty(len(first), np.int64)
    number[order] = np.arange(len(first))
    return first[order].astype(np.int64), number[inverse.ravel()]


def sequence_costs(lengths: np.ndarray, embed_dim: int, window_counts=None) -> np.ndarray:
    """Predicted cost of each sequence: every piece it is embedded as (the sequence itself, its
    first 1022 residues, or its windows of 1022) with BOS and EOS."""
    tokens = piece_tokens(lengths).astype(np.float64)
    pieces = 1 if window_counts is None else np.asarray(window_counts)
    return pieces * (tokens + tokens**2 / (6 * embed_dim))


def balance(costs: np.ndarray, world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Assign each sequence a rank; returns (rank per sequence, total cost per rank)."""
    order = np.argsort(-costs, kind="stable")
    assigned = []
    loads = [(0.0, rank) for rank in range(world_size)]
    for cost in costs[order].tolist():
        load, rank = loads[0]
        assigned.append(rank)
        heapq.heapreplace(loads, (load + cost, rank))
    ranks = np.empty(len(costs), np.int32)
    ranks[order] = assigned
    rank_costs = np.bincount(ranks, weights=costs, minlength=world_size)
    return ranks, rank_costs


def imbalance(rank_costs: np.ndarray) -> float:
    """Most loaded rank's cost over the mean (1 when there is nothing to do)."""
    mean = rank_costs.mean()
    return float(rank_costs.max() / mean) if mean else 1.0


def space_warning(directory, spec: OutputSpec, lengths: np.ndarray, position: np.ndarray, dim: int,
                  dtype: str) -> str | None:
    """What to tell the user when the embeddings of sequences of ``lengths`` (``position``: the
    distinct ones) may not fit in the free space of ``directory``, where the results go; None
    when they fit. The store and the shards each hold every distinct sequence's outputs, the
    merged file every ID's; all uncompressed (the most that is written)."""
    distinct = outputs_nbytes(spec, lengths[position], dim, dtype)
    merged = outputs_nbytes(spec, lengths, dim, dtype)
    free = shutil.disk_usage(directory).free
    if 2 * distinct + merged <= free:
        return None
    return (f"the embeddings of this run need up to {_size(2 * distinct + merged)} in {directory} (the store "
            f"and the shards {_size(distinct)} each, embeddings.h5 {_size(merged)}; less where the store "
            f"already holds some), but only {_size(free)} are free there: ranks will fail when the disk fills. "
            f"Free some space, or store less: dtype float16 halves it, per_residue output is most of it")


def _size(nbytes: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes / 2**10:,.1f} KiB"


def write_plan(path, plan: Plan, rank_costs: np.ndarray) -> None:
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("rank", data=plan.rank)
        h5.create_dataset("position", data=plan.position)
        h5.create_dataset("source", data=plan.source)
        h5.attrs["world_size"] = plan.world_size
        h5.attrs["fingerprint"] = plan.fingerprint
        h5.attrs["rank_costs"] = rank_costs
        h5.attrs["imbalance"] = imbalance(rank_costs)
        for key, value in plan.model.items():
            h5.attrs[f"model_{key}"] = value


def read_plan(path) -> Plan:
    with h5py.File(path, "r") as h5:
        model = {key[len("model_"):]: _plain(value) for key, value in h5.attrs.items() if key.startswith("model_")}
        return Plan(h5["rank"][:], h5["position"][:], h5["source"][:], int(h5.attrs["world_size"]),
                    str(h5.attrs["fingerprint"]), model)


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value
