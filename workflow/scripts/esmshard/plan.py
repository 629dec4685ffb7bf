"""Which rank embeds which sequences: each distinct sequence once, balanced by predicted cost.

Identical sequences (the same residues under other IDs, common in mutant scans and ORF sets)
are planned once, at their first occurrence; every ID gets that sequence's embeddings.

A sequence of T tokens costs about 24·d·T FLOPs per layer in its linear layers and 4·d·T² in
attention, so cost ∝ T + T²/(6·d) for a model of width d. Each rank gets a contiguous run of the
distinct sequences in input order (rank r's all precede rank r+1's), cut where the most loaded
rank's cost is the least any contiguous split allows: on realistic inputs within a fraction of
a percent of the mean. Contiguous shares keep the merge simple: the merged file's blocks come
from one shard each, and a shard's rows lie in the store segments (written by each rank in
input order) in few runs, so that it can refer to them in place.
"""

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from esmshard import EsmShardError
from esmshard.architectures import FAMILIES, MAX_RESIDUES, check_model, checkpoint_identity, resolve_model
from esmshard.files import atomic_output
from esmshard.index import SequenceIndex
from esmshard.outputs import OutputSpec
from esmshard.shard import outputs_nbytes

# Said wherever a run's results are described (the plan's log and terminal, the manifest, the report).
RANDOM_WEIGHTS_WARNING = (
    "model %s has RANDOM weights (written by esmshard random-checkpoint, for tests and demos): "
    "its embeddings mean nothing"
)


log = logging.getLogger(__name__)


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


def sequence_costs(spec: OutputSpec, lengths: np.ndarray, embed_dim: int) -> np.ndarray:
    """Predicted cost of each sequence: every piece it is embedded as (the sequence itself, its
    first ``spec.max_residues``, or its windows of that many) with BOS and EOS."""
    tokens = spec.piece_tokens(lengths).astype(np.float64)
    return spec.window_counts(lengths) * (tokens + tokens**2 / (6 * embed_dim))


def balance(costs: np.ndarray, world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Assign each sequence a rank, contiguously in order; returns (rank per sequence, total
    cost per rank). The most loaded rank's cost is the least of all contiguous splits (to the
    last bit of a float64); ranks beyond the sequences get none."""
    prefix = np.concatenate([[0.0], np.cumsum(costs, dtype=np.float64)])
    capacity = _least_capacity(prefix, world_size)
    ranks = np.repeat(np.arange(world_size, dtype=np.int32), np.diff(_cuts(prefix, world_size, capacity)))
    return ranks, np.bincount(ranks, weights=costs, minlength=world_size)


def _parts_needed(prefix: np.ndarray, capacity: float, limit: int) -> int:
    """How many contiguous parts of at most ``capacity`` the costs (``prefix``: their running
    sums from 0) need, filling each as far as it goes; ``limit + 1`` once that is more than ``limit``."""
    start, parts = 0, 0
    while start < len(prefix) - 1:
        end = _furthest_end(prefix, start, capacity)
        if end == start or parts == limit:  # one cost over the capacity, or too many parts
            return limit + 1
        start, parts = end, parts + 1
    return parts


# A run's cost is prefix[end] - prefix[start], as floats: searchsorted finds the cut, the loops
# correct the last bit of rounding, so that every step here agrees on which runs fit.
def _furthest_end(prefix: np.ndarray, start: int, capacity: float) -> int:
    """The last end of a run from ``start`` that costs at most ``capacity``."""
    end = int(np.searchsorted(prefix, prefix[start] + capacity, side="right")) - 1
    while end > start and prefix[end] - prefix[start] > capacity:
        end -= 1
    while end < len(prefix) - 1 and prefix[end + 1] - prefix[start] <= capacity:
        end += 1
    return end


def _earliest_start(prefix: np.ndarray, end: int, capacity: float) -> int:
    """The first start of a run up to ``end`` that costs at most ``capacity``."""
    start = int(np.searchsorted(prefix, prefix[end] - capacity, side="left"))
    while start < end and prefix[end] - prefix[start] > capacity:
        start += 1
    while start > 0 and prefix[end] - prefix[start - 1] <= capacity:
        start -= 1
    return start


def _least_capacity(prefix: np.ndarray, world_size: int) -> float:
    """The least capacity that splits the costs into ``world_size`` contiguous parts, by
    bisection: the optimum lies between the larger of the mean and the largest cost, and their
    sum (filling each part up to mean + largest leaves less than the mean for the last); that
    range is at most a factor 2 wide, so ~50 halvings reach adjacent floats."""
    largest = float(np.diff(prefix).max(initial=0.0))
    low, high = max(largest, prefix[-1] / world_size), largest + prefix[-1] / world_size
    if _parts_needed(prefix, low, world_size) <= world_size:
        return low
    while low < (middle := (low + high) / 2) < high:
        if _parts_needed(prefix, middle, world_size) <= world_size:
            high = middle
        else:
            low = middle
    return high


def _cuts(prefix: np.ndarray, world_size: int, capacity: float) -> np.ndarray:
    """[world_size + 1] where each rank's run starts and ends: each cut as near the even share of
    what is left as ``capacity`` allows (a rank takes at most ``capacity``, and leaves no more than
    the ranks after it can take), so that the ranks below the most loaded one are even too."""
    n = len(prefix) - 1
    earliest = [n]  # earliest[m]: the first sequence from which on the last m ranks can take all
    for _ in range(world_size - 1):  # (each of them as much as it can, from the end)
        earliest.append(_earliest_start(prefix, earliest[-1], capacity))
    cuts = [0]
    for rank in range(world_size):
        start = cuts[-1]
        share = prefix[start] + (prefix[-1] - prefix[start]) / (world_size - rank)
        nearest = min(max(int(np.searchsorted(prefix, share)), start), n)
        if nearest > start and share - prefix[nearest - 1] < prefix[nearest] - share:
            nearest -= 1
        cuts.append(max(earliest[world_size - rank - 1], min(nearest, _furthest_end(prefix, start, capacity))))
    return np.array(cuts)


def make_plan(index_dir, model: str, model_type: str, settings: dict, world_size: int, plan_path) -> None:
    """Plan the indexed sequences over ``world_size`` ranks for ``model`` (a config's ``model``,
    checked to be of ``model_type``) with the numeric ``settings`` (layers, pooling, windows,
    dtype) into ``plan_path``, saying so in the log. Raises EsmShardError for a model that cannot
    be used with these settings (unknown, of another family, without a layer asked for)."""
    checkpoint = resolve_model(model)
    check_model(model_type, settings["pooling"], checkpoint)
    identity = checkpoint_identity(checkpoint)
    try:
        spec = OutputSpec.resolve(
            settings["layers"],
            settings["pooling"],
            identity["num_layers"],
            settings["long_sequences"],
            settings["window_overlap"],
            max_residues=MAX_RESIDUES[identity["family"]],
        )
    except ValueError as error:  # a layer the model does not have
        raise EsmShardError(f"config: {error}") from None
    index = SequenceIndex(index_dir)
    position, source = distinct(index.digests())
    lengths = index.lengths[position]
    costs = sequence_costs(spec, lengths, identity["embed_dim"])
    ranks, rank_costs = balance(costs, world_size)
    write_plan(plan_path, Plan(ranks, position, source, len(rank_costs), index.fingerprint, identity), rank_costs)
    log.info(
        "%d sequences, %d distinct; model %s (%s, %d layers, width %d, content %s)",
        len(index),
        len(position),
        checkpoint.location,
        FAMILIES[identity["family"]],
        identity["num_layers"],
        identity["embed_dim"],
        identity["digest"],
    )
    if identity["random_weights"]:
        log.warning(RANDOM_WEIGHTS_WARNING, checkpoint.location)
    for rank, cost in enumerate(rank_costs):
        log.info("rank %d: %d sequences, predicted cost %.4g", rank, int((ranks == rank).sum()), cost)
    log.info("rank cost max/mean: %.4f over %d ranks", imbalance(rank_costs), len(rank_costs))
    warning = space_warning(
        Path(plan_path).parent, spec, index.lengths, position, identity["embed_dim"], settings["dtype"]
    )
    if warning:  # before any GPU work: the ranks check each write again and fail cleanly
        log.warning("%s", warning)


def imbalance(rank_costs: np.ndarray) -> float:
    """Most loaded rank's cost over the mean (1 when there is nothing to do)."""
    mean = rank_costs.mean()
    return float(rank_costs.max() / mean) if mean else 1.0


def space_warning(
    directory,
    spec: OutputSpec,
    lengths: np.ndarray,
    position: np.ndarray,
    dim: int,
    dtype: str,
) -> str | None:
    """What to tell the user when the embeddings of sequences of ``lengths`` (``position``: the
    distinct ones) may not fit in the free space of ``directory``, where the results go; None
    when they fit. The store holds every distinct sequence's outputs; the shards their pooled
    ones (their per-residue rows are the store's); embeddings.h5 every ID's outputs. All
    uncompressed (the most that is written)."""
    store = outputs_nbytes(spec, lengths[position], dim, dtype)
    shards = outputs_nbytes(spec, lengths[position], dim, dtype, per_residue=False)
    merged = outputs_nbytes(spec, lengths, dim, dtype)
    free = shutil.disk_usage(directory).free
    if store + shards + merged <= free:
        return None
    return (
        f"the embeddings of this run need up to {_size(store + shards + merged)} in {directory} (the store "
        f"{_size(store)}, the shards {_size(shards)}, embeddings.h5 {_size(merged)}; less where the store "
        f"already holds some), but only {_size(free)} are free there: ranks will fail when the disk fills. "
        f"Free some space, or store less: dtype float16 halves it, per_residue output is most of it"
    )


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
        model = {key[len("model_") :]: _plain(value) for key, value in h5.attrs.items() if key.startswith("model_")}
        return Plan(
            h5["rank"][:],
            h5["position"][:],
            h5["source"][:],
            int(h5.attrs["world_size"]),
            str(h5.attrs["fingerprint"]),
            model,
        )


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value
