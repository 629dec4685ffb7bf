"""The whole run a user makes, against the script they would write instead, side by side.

    python bench/whole_run.py --like esm2_t33_650M_UR50D --n 12000 --real ../shared/data/P62593.fasta

Input: the first --real-n records of --real (real proteins) and synthetic ones (log-normal
lengths, median 300, uncapped: some exceed 1022 and are truncated by both) up to --n, written
once into --cache with a checkpoint of the named shape (RANDOM weights, float16 as the released
files). Then, timed as whole processes from start to exit:
  - fair-esm: bench/fair_esm_script.py, a plain fp16 fair-esm script writing the means to HDF5;
  - esmshard cold: `snakemake --cores C --resources gpu=1` in a fresh directory, with empty
    torch.compile caches (the page cache is not dropped: the files were just written);
  - esmshard warm: the same again in another fresh directory, caches as the cold run left them.
Each --variant (a YAML mapping of options) adds one more warm run with those options, and its
time over the warm run's (e.g. per-residue output against the mean alone, in one call). Prints
the table (seconds, ratio to fair-esm, time to embeddings.h5) and each run's stages from the job
logs (Snakemake's start, index, plan, rank start-up to its first batch, embedding,
aggregate, report). Checks esmshard's means against the fair-esm script's (cosine >= 0.999:
both are float16 approximations of the same forward) and exits non-zero when they differ.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow" / "scripts"))
sys.path.insert(0, str(REPO / "bench"))
from engine_speed import synthetic_records  # noqa: E402
from esmshard.architectures import ESM2_MODELS  # noqa: E402

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) ", re.M)
PROCESS_AGE = re.compile(r"job process started ([\d.]+) s ago")  # esmshard.logs.setup's second line


def write_input(path: Path, n: int, real: Path | None, real_n: int, seed: int = 0) -> None:
    """The first ``real_n`` records of ``real``, then synthetic ones (uncapped lengths) up to ``n``."""
    records = [r.removeprefix(b">").rstrip(b"\n") for r in real.read_bytes().split(b"\n>")[:real_n]] if real else []
    with open(path, "wb") as out:
        out.writelines(b">" + record + b"\n" for record in records)
        out.writelines(synthetic_records(n - len(records), 300, seed, cap=None))


def timed(command: list[str], env: dict, log: Path) -> float:
    started = time.time()
    with open(log, "w") as handle:
        result = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed, see {log}:\n{log.read_text()[-3000:]}")
    return started


def stages(workdir: Path, started: float) -> dict:
    """Seconds from the run's start to each job's process start (None where its log does not say)
    and its log's first and last line, and the rank's own figures."""
    out = {}
    for log in sorted((workdir / "logs").rglob("*.log")):
        text = log.read_text()
        stamps = [datetime.strptime(s, "%Y-%m-%d %H:%M:%S.%f").timestamp() - started for s in STAMP.findall(text)]
        if stamps:
            age = PROCESS_AGE.search(text)
            process_start = round(stamps[0] - float(age.group(1)), 3) if age else None
            out[log.stem] = (process_start, round(stamps[0], 3), round(stamps[-1], 3))  # the logs' resolution
    rank_log = (workdir / "logs/embed/rank_0.log").read_text()
    for key, pattern in (
        ("first batch after process start", r"first batch done, ([\d.]+) s after"),
        ("model loaded in", r"loaded in ([\d.]+) s"),
        ("rank's peak host memory (GiB)", r"peak host memory ([\d.]+) GiB"),
        ("rank's peak GPU memory (GiB)", r"peak GPU memory ([\d.]+) GiB"),
    ):
        found = re.search(pattern, rank_log)
        out[key] = float(found.group(1)) if found else None
    return out


def run_esmshard(workdir: Path, fasta: Path, checkpoint: Path, caches: Path, extra: dict) -> dict:
    workdir.mkdir(parents=True)
    config = {"fasta": [str(fasta)], "model": str(checkpoint), "world_size": 1, **extra}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
        "TRITON_CACHE_DIR": str(caches / "triton"),
    }
    command = [
        "snakemake",
        "--snakefile",
        str(REPO / "workflow/Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        "--cores",
        str(os.cpu_count()),
        "--resources",
        "gpu=1",
    ]
    started = timed(command, env, workdir / "snakemake.out")
    ended = time.time()
    return {
        "seconds": ended - started,
        "to_embeddings": (workdir / "results/embeddings.h5").stat().st_mtime - started,
        "stages": stages(workdir, started),
    }


def cosines(esmshard_h5: Path, fair_esm_h5: Path, layer: int) -> np.ndarray:
    with h5py.File(esmshard_h5) as ours, h5py.File(fair_esm_h5) as theirs:
        got, want = ours[f"mean/layer_{layer}"][:], theirs["mean"][:]
    return (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--like", default="esm2_t33_650M_UR50D", choices=sorted(ESM2_MODELS))
    parser.add_argument("--n", type=int, default=12000)
    parser.add_argument("--real", type=Path, default=None)
    parser.add_argument("--real-n", type=int, default=1000)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/esmshard-whole-run"))
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="esmshard option for both runs (YAML value), e.g. pooling=[mean,per_residue]",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        type=yaml.safe_load,
        metavar="YAML",
        help="options of one more warm run, compared with the warm run in the same call, "
        "e.g. --variant '{pooling: [mean, per_residue], dtype: float16}'; repeat for more",
    )
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    extra = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.config)}
    if not all(isinstance(variant, dict) for variant in args.variant):
        parser.error("--variant takes a YAML mapping, e.g. '{dtype: float16}'")

    args.cache.mkdir(parents=True, exist_ok=True)
    layers, dim, heads = ESM2_MODELS[args.like]
    fasta = args.cache / f"proteins_{args.n}.fasta"
    if not fasta.exists():
        write_input(fasta, args.n, args.real, args.real_n)
    checkpoint = args.cache / f"{args.like}.pt"  # fair-esm's loader wants a released name's stem
    if not checkpoint.exists():
        import torch

        from esmshard.model import write_random_checkpoint

        write_random_checkpoint(
            checkpoint,
            layers,
            dim,
            heads,
            seed=0,
            dtype=torch.float16,
            device="cuda" if torch.cuda.is_available() else "cpu",
        )

    runs = Path(tempfile.mkdtemp(prefix="runs-", dir=args.cache))
    rows = {}
    if not args.no_baseline:
        started = timed(
            [
                sys.executable,
                str(REPO / "bench/fair_esm_script.py"),
                str(fasta),
                str(checkpoint),
                str(runs / "fair_esm.h5"),
            ],
            dict(os.environ),
            runs / "fair_esm.out",
        )
        rows["fair-esm fp16 script"] = {"seconds": time.time() - started}
    caches = runs / "compile-caches"
    for name in ("cold", "warm"):
        rows[f"esmshard {name}"] = run_esmshard(runs / name, fasta, checkpoint, caches, extra)
    for number, variant in enumerate(args.variant):
        row = rows[f"esmshard warm, {variant}"] = run_esmshard(
            runs / f"variant{number}", fasta, checkpoint, caches, {**extra, **variant}
        )
        row["over warm"] = row["seconds"] / rows["esmshard warm"]["seconds"]

    with h5py.File(runs / "warm/results/embeddings.h5") as h5:
        residues = int(np.minimum(h5["lengths"][:], 1022).sum())
        sequences = len(h5["ids"])
    print(
        f"\n{args.like} shape (RANDOM weights), {sequences} proteins, {residues} residues embedded, "
        f"options {extra or 'default'}; runs in {runs}"
    )
    baseline = rows.get("fair-esm fp16 script", {}).get("seconds")
    print("| run | whole run (s) | to embeddings.h5 (s) | fair-esm / run | run / warm run |\n|---|---:|---:|---:|---:|")
    for name, row in rows.items():
        to_h5 = f"{row['to_embeddings']:.1f}" if "to_embeddings" in row else ""
        ratio = f"{baseline / row['seconds']:.2f}x" if baseline else ""
        over_warm = f"{row['over warm']:.2f}x" if "over warm" in row else ""
        print(f"| {name} | {row['seconds']:.1f} | {to_h5} | {ratio} | {over_warm} |")
    for name, row in rows.items():
        if "stages" in row:
            print(f"\n{name} stages (s from the start: process start, first and last log line):")
            for stage, value in row["stages"].items():
                print(f"  {stage:34s} {value}")
    (runs / "result.json").write_text(json.dumps(rows, indent=2))
    if baseline:
        cosine = cosines(runs / "warm/results/embeddings.h5", runs / "fair_esm.h5", layers)
        print(f"\nmeans against the fair-esm script's: cosine min {cosine.min():.6f} median {np.median(cosine):.6f}")
        if cosine.min() < 0.999:
            print("FAIL: esmshard's means differ from fair-esm's")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
