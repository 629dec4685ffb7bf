"""Balancing sequences over ranks by predicted cost.

A sequence of T tokens costs about 24·d·T FLOPs per layer in its linear layers and 4·d·T² in
attention, so cost ∝ T + T²/(6·d). Longest-processing-time-first assignment (each sequence,
most expensive first, to the least loaded rank) keeps the most loaded rank within one small
sequence of the mean.
"""

import heapq

import h5py
import numpy as np

from esmshard import atomic_output
from esmshard.architectures import ESM2_MODELS, MAX_RESIDUES

PLAN_FILE = "plan.h5"
DEFAULT_EMBED_DIM = 1280  # ESM-2 650M, for checkpoints given as a path


def sequence_costs(lengths: np.ndarray, embed_dim: int, window_counts=None) -> np.ndarray:
    """Predicted cost of each sequence; a protein embedded in ``window_counts`` windows (of
    MAX_RESIDUES each) costs that many full-length pieces."""
    tokens = np.minimum(lengths, MAX_RESIDUES).astype(np.float64) + 2  # BOS and EOS
    pieces = 1 if window_counts is None else np.asarray(window_counts)
    return pieces * (tokens + tokens**2 / (6 * embed_dim))


def embed_dim_for(model: str) -> int:
    architecture = ESM2_MODELS.get(model)
    return architecture.embed_dim if architecture else DEFAULT_EMBED_DIM


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
    """Most loaded rank's cost over the mean."""
    return float(rank_costs.max() / rank_costs.mean())


def write_plan(path, ranks: np.ndarray, rank_costs: np.ndarray, fingerprint: str) -> None:
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("rank", data=ranks)
        h5.attrs["world_size"] = len(rank_costs)
        h5.attrs["rank_costs"] = rank_costs
        h5.attrs["imbalance"] = imbalance(rank_costs)
        h5.attrs["fingerprint"] = fingerprint


def read_plan(path) -> tuple[np.ndarray, int, str]:
    """(rank per sequence, world_size, index fingerprint)."""
    with h5py.File(path, "r") as h5:
        return h5["rank"][:], int(h5.attrs["world_size"]), str(h5.attrs["fingerprint"])
