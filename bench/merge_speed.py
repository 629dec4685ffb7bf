"""The aggregation's merge of pooled outputs (esmshard.aggregate.merge), per million vectors.

    python bench/merge_speed.py --n 1000000 --dim 32 --world-size 2
    python bench/merge_speed.py --n 200000 --dim 1280 --world-size 2

Synthetic shards (random float32 means, one layer, every sequence distinct, ranks assigned by
the plan's own balancing, ``plan.balance``) written once under --cache; then the real
``merge`` into a new file, timed (the page cache holds the shards: they were just written), next
to a floor for the same bytes: each shard's rows copied in order, in blocks, into one dataset.
"""

import argparse
import hashlib
import sys
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow" / "scripts"))
from esmshard.aggregate import merge  # noqa: E402
from esmshard.outputs import OutputSpec  # noqa: E402
from esmshard.plan import Plan, balance, sequence_costs  # noqa: E402
from esmshard.work import RankWork  # noqa: E402

LAYERS = 2


def synthetic(cache: Path, n: int, dim: int, world_size: int) -> tuple[Plan, np.ndarray, np.ndarray, RankWork, dict]:
    """(plan, ids, lengths, work, {rank: shard path}) of ``n`` distinct sequences."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 1000, n)
    spec = OutputSpec.resolve([-1], ["mean"], LAYERS, "truncate", 512, max_residues=1022)
    ranks, _ = balance(sequence_costs(spec, lengths, dim), world_size)
    plan = Plan(
        ranks,
        np.arange(n, dtype=np.int64),
        np.arange(n, dtype=np.int64),
        world_size,
        "f" * 32,
        {"path": "synthetic.pt", "digest": "0" * 32, "family": "esm2", "num_layers": LAYERS, "embed_dim": dim},
    )
    ids = np.array([f"seq{i:09d}" for i in range(n)], dtype=object)
    spec = OutputSpec.resolve([-1], ["mean"], LAYERS, "truncate", 512, max_residues=1022)
    work = RankWork(
        None,
        0,
        world_size,
        plan.position,
        ids,
        lengths,
        np.zeros(n, "S16"),
        spec,
        dim,
        plan.model,
        {"dtype": "float32"},
        "float32",
    )
    shards, assignment = {}, hashlib.sha256(ranks.tobytes()).hexdigest()[:8]  # cached per assignment
    for rank in range(world_size):
        shards[rank] = cache / f"shard_{n}_{dim}_{world_size}_{assignment}_{rank}.h5"
        if not shards[rank].exists():
            rows = int((ranks == rank).sum())
            with h5py.File(shards[rank], "w") as h5:
                h5.attrs["versions"] = "synthetic"
                h5.create_dataset(f"mean/layer_{LAYERS}", data=rng.standard_normal((rows, dim), np.float32))
    return plan, ids, lengths, work, shards


def floor(shards: dict, out: Path, dim: int, block: int = 16384) -> float:
    """Seconds to copy every shard's rows, in order and in blocks, into one chunked dataset: the
    bytes the merge moves, without its IDs, reordering or attributes."""
    started = time.perf_counter()
    sources = [h5py.File(path, "r")[f"mean/layer_{LAYERS}"] for path in shards.values()]
    with h5py.File(out, "w") as h5:
        total = sum(len(s) for s in sources)
        chunk_rows = min(total, max(1, (4 << 20) // (dim * 4)))  # 4 MiB, as the merged file's; no more rows than it has
        rows = h5.create_dataset("rows", (total, dim), np.float32, chunks=(chunk_rows, dim))
        done = 0
        for source in sources:
            for start in range(0, len(source), block):
                values = source[start : start + block]
                rows[done : done + len(values)] = values
                done += len(values)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/esmshard-merge-speed"))
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    plan, ids, lengths, work, shards = synthetic(args.cache, args.n, args.dim, args.world_size)
    keep = np.ones(args.n, bool)
    out = args.cache / "merged.h5"
    merges, floors = [], []
    for _ in range(args.repeat):
        started = time.perf_counter()
        merge(out, shards, plan, keep, ids.__getitem__, lengths, work)
        merges.append(time.perf_counter() - started)
        floors.append(floor(shards, out, args.dim))
    out.unlink()
    megabytes = args.n * args.dim * 4 / 1e6
    merge_s, floor_s = min(merges), min(floors)
    print(
        f"{args.n:,} vectors of {args.dim} float32 ({megabytes:,.0f} MB), {args.world_size} ranks: "
        f"merge {merge_s:.3f} s ({merge_s / args.n * 1e6:.2f} s per million vectors), "
        f"in-order copy of the rows {floor_s:.3f} s ({floor_s / args.n * 1e6:.2f} s per million)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
