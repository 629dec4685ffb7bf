"""Cost at scale of the CPU stages: index, plan, store lookup, shard assembly and merge, per million proteins.

    python bench/scale.py --sizes 1000000 2000000 5000000 --ranks 32 --dim 1280 --json /tmp/scale-rows.json
    python bench/scale.py --sizes 1000000 3000000 10000000 --ranks 32 --dim 1280 1280 320  # ~80 GB free, >30 min

For each size: a synthetic FASTA of that many proteins (UniRef50-like lengths: log-normal, median
270, sigma 0.7, 20 to 35,000 residues, ~3% over 1,022; wrapped at 60; UniRef50-like headers; every
sequence distinct), then each stage of a run in its own process, with the package's own functions,
as the rule scripts and the rank call them:

- index: ``index.build_index`` (workflow/scripts/index.py);
- plan: ``plan.make_plan`` (all workflow/scripts/plan.py does) over --ranks ranks, the model's
  identity given instead of read from a checkpoint (650M's 33 layers, width --dim);
- store write (setup): every rank's share written to the store as the rank saves it, segments of
  ``segment_sequences`` and ``rank.SEGMENT_BYTES`` (``outputs.blocks``) through ``Store.write``, of
  random float16 mean vectors of width --dim (no model);
- lookup: what a rank does before it knows what to compute: ``rank_work`` (the index, the plan, its
  share), ``RankWork.open_store`` (every segment's keys read, its share's held) and ``Store.find`` of
  its share (rank 0);
- shard assembly: every rank's job in turn, as workflow/scripts/embed.py runs it with everything in
  the store (``rank.run_rank``: its lookup again, then ``assemble_shard``; ``status.write_success``);
  seconds are the sum of the --ranks jobs, peak memory the largest;
- merge: ``aggregate.aggregate`` of all shards into embeddings.h5 (its checks, then ``merge``).

Each stage is one process (a fresh interpreter, as Snakemake runs a job): seconds are its wall time,
start and imports included, peak memory its own ru_maxrss (``os.wait4``), bytes what it left on
disk. Outputs: the mean of the last layer (--pooling adds others), float16 (the 650M default's shape); --dim takes one
width, or one per size (a smaller one where the disk cannot hold store + shards + embeddings.h5 of
the big sizes; the table says which). Prints one markdown table (progress and each stage's
details go to stderr), then per stage the exponent k of seconds ~ n^k (linear: k ~ 1; fixed costs
and a busy machine at the small sizes pull it below 1), and an extrapolation to --target proteins
on --ranks GPUs at --target-dim: hours from the largest size's seconds per protein (where the
widths differ, from a fit of seconds = a*n + b*bytes for the stages that move the vectors), memory
per job from a straight line through the peaks, disk from the bytes per protein. Each size's
scratch folder is deleted after it (--keep keeps them). Needs free space for ~3 copies of
n x dim x 2 bytes plus ~2x the residues. --json saves the measurements; --from-json prints the
table and extrapolation of saved ones again.

Unlike bench/merge_speed.py (``merge`` alone against a plain copy of the same bytes) and
bench/cpu_stages.py (Snakemake and its jobs on a small input), this measures how each stage grows
with the input, with the real jobs' start, checks and bookkeeping.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow" / "scripts"))

NUM_LAYERS = 33  # esm2_t33_650M_UR50D's shape
MEDIAN, SIGMA, SHORTEST, LONGEST = 270, 0.7, 20, 35000
AMINO = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", np.uint8)
UNIQUE = 7  # residues that spell the record number (base 20): every sequence distinct up to 1.28e9
POOL_ROWS = 16384  # random vectors the store's segments are sliced from
STAGES = ("fasta", "index", "plan", "store", "lookup", "assembly", "merge")
LABELS = {
    "fasta": "FASTA written (setup)",
    "index": "index",
    "plan": "plan",
    "store": "store write, all ranks (setup)",
    "lookup": "store lookup, one rank job",
    "assembly": "shard assembly, all rank jobs",
    "merge": "merge (aggregate)",
}
VECTOR_STAGES = ("store", "assembly", "merge")  # whose cost has a part per byte of vectors


# --- the stages, each run in its own process ---------------------------------------------------


# The 650M default's output in float16; --pooling (to the stages through SCALE_POOLING) adds others.
PLAN_SETTINGS = {"layers": [-1], "pooling": os.environ.get("SCALE_POOLING", "mean").split(","), "dtype": "float16"}


def rank_settings():
    from esmshard.work import RankSettings

    return RankSettings.from_config({**PLAN_SETTINGS, "precision": "float16"})  # as on a GPU


def model_identity(dim: int) -> dict:
    """What the plan records of a model (architectures.checkpoint_identity), without a model."""
    return {
        "path": "synthetic-650M-shape.pt",
        "digest": "0" * 32,
        "family": "esm2",
        "num_layers": NUM_LAYERS,
        "embed_dim": dim,
        "random_weights": False,
    }


def write_fasta(path: Path, n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(MEDIAN), SIGMA, n).astype(np.int64), SHORTEST, LONGEST)
    pool = AMINO[rng.integers(0, 20, 64 << 20, dtype=np.uint8)].tobytes()
    offsets = rng.integers(0, len(pool) - LONGEST, n)
    with open(path, "wb") as out:
        for start in range(0, n, 100_000):
            end = min(n, start + 100_000)
            numbers = np.arange(start, end)
            digits = (numbers[:, None] // 20 ** np.arange(UNIQUE)) % 20
            prefixes = AMINO[digits].tobytes()
            parts = []
            for k, i in enumerate(range(start, end)):
                length, at = int(lengths[i]), int(offsets[i])
                sequence = prefixes[UNIQUE * k : UNIQUE * (k + 1)] + pool[at : at + length - UNIQUE]
                parts.append(
                    b">UniRef50_Q%09d Synthetic protein n=1 Tax=Synthetic organism TaxID=0 RepID=Q%09d_SYNTH\n" % (i, i)
                )
                parts.extend(sequence[j : j + 60] + b"\n" for j in range(0, length, 60))
            out.write(b"".join(parts))
    return {
        "residues": int(lengths.sum()),
        "median_length": float(np.median(lengths)),
        "mean_length": round(float(lengths.mean()), 1),
        "over_1022": round(float((lengths > 1022).mean()), 4),
        "longest": int(lengths.max()),
    }


def stage(name: str, folder: Path, dim: int, ranks: int, rank: int) -> dict:
    """Run one stage in this process; returns its details."""
    import h5py

    from esmshard.index import SequenceIndex, build_index
    from esmshard.plan import read_plan
    from esmshard.settings import defaults
    from esmshard.work import rank_work, read_rank_work

    index_dir, plan_path, store_root = folder / "index", folder / "plan.h5", folder / "store"
    settings = rank_settings()
    if name == "fasta":
        return write_fasta(folder / "input.fasta", int(os.environ["SCALE_N"]))
    if name == "index":
        summary = build_index([folder / "input.fasta"], index_dir)
        return {"sequences": summary.n_sequences, "residues": summary.n_residues}
    if name == "plan":  # make_plan, with the model's identity given instead of read from a checkpoint
        from types import SimpleNamespace

        from esmshard import plan as plan_module

        plan_module.resolve_model = lambda model: SimpleNamespace(location=Path(model))
        plan_module.check_model = lambda model_type, pooling, checkpoint: None
        plan_module.checkpoint_identity = lambda checkpoint: model_identity(dim)
        config = {**defaults(), **PLAN_SETTINGS}
        plan_module.make_plan(index_dir, model_identity(dim)["path"], "esm2", config, ranks, plan_path)
        with h5py.File(plan_path) as h5:
            return {"distinct": len(h5["position"]), "imbalance": round(float(h5.attrs["imbalance"]), 5)}
    if name == "store":
        from esmshard.outputs import blocks, pooling_of
        from esmshard.rank import SEGMENT_BYTES
        from esmshard.shard import sequence_nbytes
        from esmshard.store import Store

        index, plan = SequenceIndex(index_dir), read_plan(plan_path)
        rng = np.random.default_rng(1)
        pool = (0.5 * rng.standard_normal((POOL_ROWS, dim), np.float32)).astype(np.float16)
        works = [rank_work(index, plan, r, settings) for r in range(ranks)]
        # every rank opens the store at its start, as in a first run (all at once, on an empty store)
        stores = [
            Store(store_root, w.store_identity, w.spec, w.dim, settings.dtype, writer=f"r{w.rank}") for w in works
        ]
        segments = 0
        for work, store in zip(works, stores):
            sizes = sequence_nbytes(work.spec, work.lengths, work.dim, settings.dtype)
            for start, end in blocks(sizes, settings.segment_sequences, SEGMENT_BYTES):
                rows = {"per_residue": int(work.spec.embedded_lengths(work.lengths[start:end]).sum())}
                outputs = {}
                for name in work.spec.names:
                    count = rows.get(pooling_of(name), end - start)
                    at = int(rng.integers(0, max(POOL_ROWS - count, 0) + 1))
                    outputs[name] = pool[at : at + count] if count <= POOL_ROWS else np.resize(pool, (count, dim))
                store.write(work.digests[start:end], work.lengths[start:end], outputs)
                segments += 1
        return {"segments": segments}
    if name == "lookup":
        started = time.perf_counter()
        work = read_rank_work(index_dir, plan_path, rank, settings)
        shared = time.perf_counter()
        store = work.open_store(store_root, settings)
        opened = time.perf_counter()
        todo = np.flatnonzero(store.find(work.digests)[0] < 0)  # as rank.fill_store_and_assemble
        found = time.perf_counter()
        if len(todo):
            raise SystemExit(f"the store lacks {len(todo)} of rank {rank}'s sequences")
        return {
            "share": len(work.ids),
            "segments": len(store.segments),
            "rank_work_s": round(shared - started, 3),
            "store_open_s": round(opened - shared, 3),
            "find_s": round(found - opened, 4),
        }
    if name == "assembly":  # one rank's job: workflow/scripts/embed.py with nothing left to compute
        from esmshard.rank import run_rank
        from esmshard.status import write_success

        shard = folder / "shards" / f"shard_{rank}.h5"
        stats = run_rank(index_dir, plan_path, model_identity(dim)["path"], rank, shard, store_root, settings)
        if stats["embedded"]:
            raise SystemExit(f"rank {rank} computed {stats['embedded']} sequences: the store was not full")
        write_success(folder / "status" / f"rank_{rank}.json", shard, rank, stats, attempt=1, retried=None)
        return {"share": stats["reused"]}
    if name == "merge":
        from esmshard.aggregate import aggregate

        manifest = aggregate(
            index_dir,
            plan_path,
            [folder / "shards" / f"shard_{r}.h5" for r in range(ranks)],
            [folder / "status" / f"rank_{r}.json" for r in range(ranks)],
            settings,
            folder / "embeddings.h5",
            folder / "manifest.json",
            folder / "missing_ids.txt",
        )
        if not manifest["complete"] or manifest["missing"]:
            raise SystemExit(f"the merge is incomplete: {manifest['ranks_failed']}")
        return {"embedded": manifest["embedded"]}
    raise ValueError(name)


# --- the parent: run, measure, tabulate, fit ----------------------------------------------------


def run_stage(name: str, folder: Path, n: int, dim: int, ranks: int, rank: int = 0) -> dict:
    """Run a stage in a child process: (wall seconds, peak RSS in MiB, its details)."""
    result = folder / f".result_{name}_{rank}.json"
    command = [sys.executable, __file__, "--child", name, "--scratch", str(folder)]
    command += ["--dim", str(dim), "--ranks", str(ranks), "--rank", str(rank)]
    started = time.perf_counter()
    child = subprocess.Popen(command, env={**os.environ, "SCALE_N": str(n), "SCALE_RESULT": str(result)})
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        sys.exit(f"stage {name} (rank {rank}) failed with exit status {child.returncode}")
    details = json.loads(result.read_text())
    result.unlink()
    return {"seconds": seconds, "rss_mib": usage.ru_maxrss / 1024, "details": details}


def disk_bytes(*paths: Path) -> int:
    total = 0
    for path in paths:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()] if path.exists() else []
        total += sum(p.stat().st_size for p in files)
    return total


def measure(n: int, dim: int, ranks: int, folder: Path) -> list[dict]:
    """Every stage at one size; returns the table's rows."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rows = []

    def row(stage_name, measured, nbytes, note=""):
        rows.append({"stage": stage_name, "n": n, "dim": dim, **measured, "bytes": nbytes, "note": note})
        details = json.dumps(measured["details"])
        print(
            f"  {stage_name}: {measured['seconds']:.1f} s, {measured['rss_mib']:.0f} MiB, {nbytes / 1e9:.2f} GB",
            details,
            file=sys.stderr,
            flush=True,
        )

    print(f"{n:,} proteins, width {dim}, load {os.getloadavg()}", file=sys.stderr, flush=True)
    fasta = run_stage("fasta", folder, n, dim, ranks)
    d = fasta["details"]
    row("fasta", fasta, disk_bytes(folder / "input.fasta"), f"{d['residues']:,} residues, {d['over_1022']:.1%} > 1022")
    index = run_stage("index", folder, n, dim, ranks)
    row("index", index, disk_bytes(folder / "index"))
    (folder / "input.fasta").unlink()  # nothing after the index reads it
    plan = run_stage("plan", folder, n, dim, ranks)
    row("plan", plan, disk_bytes(folder / "plan.h5"), f"imbalance {plan['details']['imbalance']:.4f}")
    store = run_stage("store", folder, n, dim, ranks)
    row("store", store, disk_bytes(folder / "store"), f"{store['details']['segments']} segments")
    lookup = run_stage("lookup", folder, n, dim, ranks)
    d = lookup["details"]
    row(
        "lookup",
        lookup,
        0,
        f"rank_work {d['rank_work_s']:.2f} s, Store() {d['store_open_s']:.2f} s, find {d['find_s']:.3f} s",
    )
    jobs = [run_stage("assembly", folder, n, dim, ranks, rank) for rank in range(ranks)]
    walls = [job["seconds"] for job in jobs]
    assembly = {
        "seconds": sum(walls),
        "rss_mib": max(job["rss_mib"] for job in jobs),
        "details": {"jobs": ranks, "slowest_s": round(max(walls), 2), "fastest_s": round(min(walls), 2)},
    }
    row("assembly", assembly, disk_bytes(folder / "shards"), f"{ranks} jobs, slowest {max(walls):.1f} s")
    merge = run_stage("merge", folder, n, dim, ranks)
    row("merge", merge, disk_bytes(folder / "embeddings.h5"))
    print(f"  load {os.getloadavg()}", file=sys.stderr, flush=True)
    return rows


def power_fit(n, y) -> tuple[float, float]:
    """(exponent k, coefficient c) of y = c * n^k, least squares in log space."""
    k, log_c = np.polyfit(np.log(n), np.log(y), 1)
    return float(k), float(np.exp(log_c))


def table(rows: list[dict]) -> str:
    lines = [
        "| stage | proteins | dim | seconds | s per million proteins | peak RSS MiB | bytes on disk | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {LABELS[r['stage']]} | {r['n']:,} | {r['dim']} | {r['seconds']:.1f} "
            f"| {r['seconds'] / r['n'] * 1e6:.1f} | {r['rss_mib']:,.0f} | {r['bytes']:,} | {r['note']} |"
        )
    return "\n".join(lines)


def extrapolate(rows: list[dict], target: int, target_dim: int, ranks: int) -> str:
    """Per stage: how its seconds and peak memory grow with n, and what they come to at ``target``.
    Time: the largest size's seconds per protein (its constant included, so an upper bound where
    the stage is linear), scaled to ``target_dim`` by bytes for the stages that move the vectors;
    the exponent k of seconds ~ n^k says whether it is linear. Memory: a straight line through
    the sizes' peaks."""
    out = [f"\nExtrapolation to {target:,} proteins on {ranks} GPUs ({ranks} ranks), width {target_dim} float16:"]
    per_job = {"store": ranks, "assembly": ranks}  # work the ranks share, each in its own job
    where = {
        "lookup": "each rank job",
        "store": f"all ranks' writes; each rank writes ~1/{ranks} while it computes",
        "assembly": f"all {ranks} rank jobs together; each ~1/{ranks} of it, in parallel",
    }
    hours, disk = {}, 0.0
    for name in STAGES:
        mine = [r for r in rows if r["stage"] == name]
        if len(mine) < 2:
            continue
        n = np.array([r["n"] for r in mine], float)
        seconds = np.array([r["seconds"] for r in mine])
        rss = np.array([r["rss_mib"] for r in mine])
        dims = np.array([r["dim"] for r in mine])
        nbytes = np.array([r["bytes"] for r in mine], float)
        width = target_dim / dims if name in VECTOR_STAGES else np.ones(len(dims))
        target_bytes = float(nbytes[-1] / n[-1] * width[-1] * target)
        # the exponent over sizes of one width where the width matters: the widest with two sizes
        same = np.ones(len(dims), bool)
        if name in VECTOR_STAGES:
            repeated = [d for d in sorted(set(dims.tolist()), reverse=True) if (dims == d).sum() >= 2]
            same = dims == (repeated[0] if repeated else dims[-1])
        k = power_fit(n[same], seconds[same])[0] if same.sum() >= 2 else float("nan")
        k_top = power_fit(n[same][-2:], seconds[same][-2:])[0] if same.sum() >= 2 else float("nan")
        if name in VECTOR_STAGES and len(set(dims.tolist())) > 1:  # the widths tell bytes from proteins apart
            (a, b), *_ = np.linalg.lstsq(np.stack([n, nbytes], 1), seconds, rcond=None)
            predicted = a * target + b * target_bytes
            how = f"{a * 1e6:.1f} s per M proteins + {b * 1e9:.2f} s per GB (fit over the widths)"
        else:
            predicted = seconds[-1] / n[-1] * width[-1] * target
            how = f"{seconds[-1] / n[-1] * 1e6:.1f} s per M proteins at {n[-1] / 1e6:g}M"
            if width[-1] != 1:
                how += f", x{width[-1]:g} for width {target_dim}"
        (slope, base), *_ = np.linalg.lstsq(np.stack([n, np.ones_like(n)], 1), rss, rcond=None)
        memory = (base + slope * target) / 1024
        hours[name] = predicted / 3600
        if name != "fasta":
            disk += target_bytes
        job = f", {predicted / per_job[name] / 3600:.2f} h per rank job" if name in per_job else ""
        out.append(
            f"- {LABELS[name]}: seconds ~ n^{k:.2f} over {same.sum()} sizes, n^{k_top:.2f} over the two "
            f"largest of them{f' (width {dims[same][-1]})' if name in VECTOR_STAGES else ''}; {how} "
            f"-> {predicted / 3600:.2f} h ({where.get(name, 'one job')}){job}; peak memory "
            f"{slope * 1e6:.0f} MiB per M proteins + {base:.0f} MiB -> {memory:.1f} GiB per job; "
            f"disk {target_bytes / 1e9:,.0f} GB"
        )
    if {"index", "plan", "assembly", "merge"} <= set(hours):
        path = hours["index"] + hours["plan"] + hours["assembly"] / ranks + hours["merge"]
        out.append(
            f"- CPU stages on the critical path (index + plan + one rank job's lookup and assembly + merge; "
            f"the store writes overlap the GPU work): {path:.2f} h"
        )
    out.append(f"- disk: index, plan, store, shards and embeddings.h5 (not the FASTA): {disk / 1e9:,.0f} GB")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000])
    parser.add_argument("--ranks", type=int, default=32)
    parser.add_argument("--dim", type=int, nargs="+", default=[1280], help="one width, or one per size")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/scale-run"))
    parser.add_argument("--target", type=int, default=100_000_000)
    parser.add_argument("--target-dim", type=int, default=1280)
    parser.add_argument("--keep", action="store_true", help="keep each size's scratch folder")
    parser.add_argument(
        "--pooling", nargs="+", default=["mean"], choices=["mean", "bos", "per_residue"], help="the outputs"
    )
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--from-json", type=Path, help="print the table and extrapolation of saved measurements")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        details = stage(args.child, args.scratch, args.dim[0], args.ranks, args.rank)
        Path(os.environ["SCALE_RESULT"]).write_text(json.dumps(details))
        return 0
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
    else:
        os.environ["SCALE_POOLING"] = ",".join(args.pooling)  # for the stages' processes
        dims = args.dim * len(args.sizes) if len(args.dim) == 1 else args.dim
        if len(dims) != len(args.sizes):
            parser.error("--dim takes one width, or one per size")
        started, load = time.time(), os.getloadavg()
        rows = []
        for n, dim in zip(args.sizes, dims):
            folder = args.scratch / f"n{n}_d{dim}"
            rows += measure(n, dim, args.ranks, folder)
            if not args.keep:
                shutil.rmtree(folder)
        git = ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]
        commit = subprocess.run(git, capture_output=True, text=True)
        saved = {
            "caption": f"bench/scale.py, commit {commit.stdout.strip()}, {time.strftime('%Y-%m-%d')}, "
            f"{platform.node()}, {os.cpu_count()} cores; load average {load[0]:.2f} before, "
            f"{os.getloadavg()[0]:.2f} after; {time.time() - started:.0f} s in all; outputs {', '.join(args.pooling)}",
            "ranks": args.ranks,
            "rows": rows,
        }
        if args.json:
            args.json.write_text(json.dumps(saved, indent=1))
    print(saved["caption"] + "\n")
    print(table(saved["rows"]))
    print(extrapolate(saved["rows"], args.target, args.target_dim, saved["ranks"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
