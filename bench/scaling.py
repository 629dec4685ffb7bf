"""Whole-workflow scaling: the real snakemake run with N ranks on N GPUs, same input.

    python bench/scaling.py --ranks 4 [--ranks 1] [--residues 100e6]

Writes (once, cached in --cache) a synthetic FASTA of log-normal lengths (median ~300, capped
at 1022) with at least --residues residues and an ESM-2 650M checkpoint with RANDOM weights,
then times `snakemake --cores C --resources gpu=N` from start to finish for each N, and prints
wall time, residues/s and each rank's own rate. An untimed run with the most ranks on the first
2,000 proteins comes first (unless --no-warmup), so that every timed run is warm: Triton's
kernels compiled on each GPU, the checkpoint's identity cached and its file in the page cache.
Run the N you want in separate calls if one call cannot hold them all; results accumulate in
--cache/scaling.jsonl.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow" / "scripts"))
sys.path.insert(0, str(REPO / "bench"))
from engine_speed import synthetic_fasta  # noqa: E402
from esmshard.architectures import ESM2_MODELS  # noqa: E402


def snakemake(workdir: Path, fasta: Path, checkpoint: Path, ranks: int) -> float:
    """The whole workflow with ``ranks`` ranks on the first ``ranks`` GPUs, in a fresh ``workdir``;
    returns its wall time in seconds."""
    subprocess.run(["rm", "-rf", str(workdir)], check=True)
    workdir.mkdir()
    config = {"fasta": [str(fasta)], "model": str(checkpoint), "world_size": ranks, "progress_seconds": 10}
    (workdir / "config.yaml").write_text(json.dumps(config))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(ranks)))}
    command = [
        "snakemake",
        "--snakefile",
        str(REPO / "workflow/Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        "--cores",
        str(4 * ranks + 2),
        "--resources",
        f"gpu={ranks}",
        "--quiet",
        "all",
    ]
    started = time.monotonic()
    subprocess.run(command, check=True, env=env)
    return time.monotonic() - started


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, action="append", required=True)
    parser.add_argument("--residues", type=float, default=100e6)
    parser.add_argument("--model", default="esm2_t33_650M_UR50D", choices=sorted(ESM2_MODELS))
    parser.add_argument("--cache", default="/tmp/esmshard-scaling")
    parser.add_argument("--no-warmup", action="store_true", help="time the first run cold")
    args = parser.parse_args()

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    fasta = cache / "proteins.fasta"
    if not fasta.exists():
        n = int(args.residues / 330 * 1.03)  # mean length of the capped log-normal is ~330
        synthetic_fasta(fasta, n, 300, seed=1)
    checkpoint = cache / f"{args.model}_RANDOM_WEIGHTS.pt"
    if not checkpoint.exists():
        from esmshard.model import write_random_checkpoint

        write_random_checkpoint(checkpoint, *ESM2_MODELS[args.model], seed=0)

    if not args.no_warmup:
        warmup = cache / "warmup.fasta"
        with open(fasta) as source, open(warmup, "w") as out:
            out.writelines(line for line, _ in zip(source, range(4000)))  # 2,000 records of two lines
        snakemake(cache / "warmup", warmup, checkpoint, max(args.ranks))

    for ranks in args.ranks:
        workdir = cache / f"run{ranks}"
        wall = snakemake(workdir, fasta, checkpoint, ranks)
        with h5py.File(workdir / "results/embeddings.h5") as h5:
            residues = int(np.minimum(h5["lengths"][:], 1022).sum())
            n = len(h5["ids"])
        statuses = [json.loads((workdir / f"results/status/rank_{r}.json").read_text()) for r in range(ranks)]
        row = {
            "ranks": ranks,
            "sequences": n,
            "residues": residues,
            "wall_s": round(wall, 1),
            "residues_per_s": round(residues / wall),
            "rank_residues_per_s": [s["residues_per_second"] for s in statuses],
            "rank_seconds": [s["seconds"] for s in statuses],
        }
        print(json.dumps(row), flush=True)
        with open(cache / "scaling.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")

    rows = [json.loads(line) for line in open(cache / "scaling.jsonl")]
    one = next((r for r in rows if r["ranks"] == 1), None)
    print("\n| ranks | sequences | residues | wall time (whole snakemake run) | residues/s | speed-up vs 1 rank |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        speedup = f"{one['wall_s'] / r['wall_s']:.2f}x" if one else "-"
        cells = [r["ranks"], f"{r['sequences']:,}", f"{r['residues']:,}", f"{r['wall_s']:.1f} s"]
        print("| " + " | ".join(map(str, cells + [f"{r['residues_per_s']:,}", speedup])) + " |")


if __name__ == "__main__":
    main()
