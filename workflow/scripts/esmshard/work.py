"""A rank's work: the settings it runs with, its share of the plan, and what identifies its shard.

The aggregation checks shards against the ranks' work with this alone, without torch or the
rank's machinery (leases, engines, segments being written).
"""

import hashlib
from dataclasses import dataclass, fields

import numpy as np

from esmshard import EsmShardError
from esmshard.architectures import MAX_RESIDUES
from esmshard.gpu import gpu_device
from esmshard.index import SequenceIndex
from esmshard.outputs import OutputSpec, pooling_of, sorted_rows
from esmshard.plan import Plan, read_plan, sequence_costs
from esmshard.settings import defaults
from esmshard.shard import dataset_shapes, shard_problem
from esmshard.store import Store, sequence_keys, settings_identity, store_key


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
    progress_seconds: float
    segment_sequences: int  # finished work goes to the store every this many sequences ...
    segment_seconds: float  # ... or this many seconds, whichever comes first
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

    def open_store(self, store_root, settings: RankSettings) -> Store:
        """The store of this work's settings, holding the keys of its share only."""
        identity, writer = self.store_identity, f"r{self.rank}"
        return Store(store_root, identity, self.spec, self.dim, settings.dtype, writer=writer, only=self.digests)

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

    def costs(self, rows) -> float:
        """The predicted cost of computing these rows (``plan.sequence_costs``), as progress counts it."""
        lengths = self.lengths[rows]
        return float(sequence_costs(self.spec, lengths, self.dim).sum())

    def segment(self, batches: list) -> tuple:
        """(digests, lengths, outputs) of finished batches [(rows, outputs)], in row order: each batch's
        rows copied once, straight to their place."""
        rows = np.concatenate([rows for rows, _ in batches])
        order, residue_order = sorted_rows(rows, self.spec.embedded_lengths(self.lengths[rows]))
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
        return self.digests[rows[order]], self.lengths[rows[order]], outputs


def read_rank_work(index_dir, plan_path, rank: int, settings: RankSettings) -> RankWork:
    """``rank_work`` of the index and the plan in these files."""
    return rank_work(SequenceIndex(index_dir), read_plan(plan_path), rank, settings)


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
        settings.layers,
        settings.pooling,
        plan.model["num_layers"],
        settings.long_sequences,
        settings.window_overlap,
        max_residues=MAX_RESIDUES[plan.model["family"]],
    )
    return RankWork(
        index,
        rank,
        plan.world_size,
        positions,
        index.ids(positions),
        index.lengths[positions],
        sequence_keys(index.digests(positions), index.lengths[positions], spec),
        spec,
        plan.model["embed_dim"],
        plan.model,
        settings_identity(plan.model["digest"], plan.model["family"], spec, settings.dtype, settings.engine),
        precision or compute_precision(settings, gpu_device()),  # (asking for the device runs nvidia-smi)
    )


def compute_precision(settings: RankSettings, device: str) -> str:
    """The precision the engine computes in on ``device`` (a device type: cpu or cuda)."""
    if settings.precision != "auto":
        return settings.precision
    return "float32" if device == "cpu" else "float16"
