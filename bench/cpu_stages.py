"""What a whole run spends outside the rank: Snakemake and the CPU jobs, on the CPU, tiny model.

    python bench/cpu_stages.py --real ../shared/data/P62593.fasta --repeat 5

The input of bench/whole_run.py (the first 1,000 records of --real and synthetic proteins up to
--n), embedded with a tiny random-weight ESM-2 (2 layers, width 32, as the tests' checkpoint) on
the CPU by the real `snakemake` (world_size 1). A first run fills a store; each timed run then
starts in a fresh directory holding a copy of that store, so its rank assembles its shard from
the store instead of computing (seconds, not minutes) while index, plan, aggregate and the report
do exactly the work of a first run. Prints, per run and as medians, seconds from the run's start:
when Snakemake announced each job and said it finished (its output, timestamped as it comes),
each job log's first and last line (whole_run.stages), and each job's own breakdown: process
start, imports (process start to its first log line: interpreter, Snakemake's script preamble,
imports), work (first to last log line) and exit (last line to Snakemake's "Finished": the
process's end and Snakemake's bookkeeping); and the exit of snakemake. With --compute the timed
runs start with an empty store instead (use a small --n): the rank then imports torch and computes.

To compare two versions (before/after a change), give each one's workflow directory with
--workflow (repeated): their runs alternate, so that a busy machine slows both alike.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow" / "scripts"))
sys.path.insert(0, str(REPO / "bench"))
import yaml  # noqa: E402

from whole_run import stages, write_input  # noqa: E402

JOBS = {"index": "index", "plan": "plan", "embed": "rank_0", "aggregate": "aggregate", "report_plots": "report_plots"}
ANNOUNCED = re.compile(r"^(?:local)?rule (\w+):")
FINISHED = re.compile(r"^Finished jobid: \d+ \(Rule: (\w+)\)")


def snakemake(
    workflow: Path, workdir: Path, fasta: Path, checkpoint: Path, cores: int, profile: bool = False
) -> tuple[float, dict]:
    """Run snakemake in ``workdir``; returns its start time and, per rule, when Snakemake
    announced its job and said it finished (seconds from the start). With ``profile``, its main
    process runs under cProfile, written to ``workdir``/snakemake.prof."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = {"fasta": [str(fasta)], "model": str(checkpoint), "world_size": 1}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    profiler = [sys.executable, "-m", "cProfile", "-o", str(workdir / "snakemake.prof")] if profile else []
    command = [
        *profiler,
        shutil.which("snakemake", path=Path(sys.executable).parent) or shutil.which("snakemake"),
        "--snakefile",
        str(workflow / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        "--cores",
        str(cores),
    ]
    lines, said = [], {}
    started = time.time()
    with subprocess.Popen(
        command,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        for line in process.stdout:
            lines.append(line)
            for pattern, what in ((ANNOUNCED, "announced"), (FINISHED, "finished")):
                found = pattern.match(line)
                if found:
                    said[f"{found.group(1)} {what}"] = time.time() - started
    said["snakemake exit"] = time.time() - started
    if process.returncode:
        sys.exit(f"snakemake failed in {workdir}:\n{''.join(lines)[-3000:]}")
    return started, said


def run_once(
    workflow: Path, workdir: Path, fasta: Path, checkpoint: Path, cores: int, store: Path | None, profile: bool
) -> dict:
    """One timed run, starting with a copy of ``store`` (if any); returns its figures."""
    if store:
        shutil.copytree(store, workdir / "results/store")
    started, said = snakemake(workflow, workdir, fasta, checkpoint, cores, profile)
    spans = stages(workdir, started)
    row = {}
    for rule, job in JOBS.items():
        process_start, first, last = spans[job]
        row.update(
            {
                f"{rule} announced": said[f"{rule} announced"],
                f"{rule} process start": process_start,
                f"{rule} imports": first - process_start,
                f"{rule} work": last - first,
                f"{rule} last line": last,
                f"{rule} finished": said[f"{rule} finished"],
                f"{rule} exit": said[f"{rule} finished"] - last,
            }
        )  # its process's end, Snakemake's bookkeeping
    row["embeddings.h5 written"] = (workdir / "results/embeddings.h5").stat().st_mtime - started
    row["snakemake exit"] = said["snakemake exit"]
    row["outside the rank"] = row["snakemake exit"] - (row["embed finished"] - row["embed announced"])
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=12000)
    parser.add_argument("--real", type=Path, default=None)
    parser.add_argument("--real-n", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--cache", type=Path, default=Path("/tmp/esmshard-cpu-stages"))
    parser.add_argument("--workflow", type=Path, action="append", help="a workflow directory (default: this one's)")
    parser.add_argument(
        "--compute",
        action="store_true",
        help="start with an empty store: the rank computes (imports torch, loads the model), as in a first run",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run Snakemake's main process under cProfile "
        "(each run's snakemake.prof; it slows that process, so its times are not comparable)",
    )
    args = parser.parse_args()
    workflows = [path.resolve() for path in args.workflow or [REPO / "workflow"]]

    args.cache.mkdir(parents=True, exist_ok=True)
    fasta = args.cache / f"proteins_{args.n}.fasta"
    if not fasta.exists():
        write_input(fasta, args.n, args.real, args.real_n)
    checkpoint = args.cache / "esm2_tiny.pt"
    if not checkpoint.exists():
        from esmshard.model import write_random_checkpoint

        write_random_checkpoint(checkpoint, 2, 32, 4, seed=1)
    seeded = args.cache / f"seed_{args.n}"  # the run that filled the store, kept for later benches
    if not args.compute and not (seeded / "results/embeddings.h5").exists():
        shutil.rmtree(seeded, ignore_errors=True)
        snakemake(workflows[0], seeded, fasta, checkpoint, args.cores)
    runs = Path(tempfile.mkdtemp(prefix="runs-", dir=args.cache))
    rows = {workflow: [] for workflow in workflows}
    for i in range(args.repeat):
        for number, workflow in enumerate(workflows):
            rows[workflow].append(
                run_once(
                    workflow,
                    runs / f"w{number}_run{i}",
                    fasta,
                    checkpoint,
                    args.cores,
                    None if args.compute else seeded / "results/store",
                    args.profile,
                )
            )

    print(
        f"{args.n} proteins, tiny random-weight model on the CPU "
        f"({'rank computing' if args.compute else 'rank from a filled store'}), "
        f"--cores {args.cores}; runs in {runs}"
    )
    for workflow, runs_of_it in rows.items():
        print(
            f"\n{workflow}\n| seconds from the run's start | "
            + " | ".join(f"run {i}" for i in range(len(runs_of_it)))
            + " | median |"
        )
        print("|---|" + "---:|" * (len(runs_of_it) + 1))
        for key in runs_of_it[0]:
            values = [row[key] for row in runs_of_it]
            print(f"| {key} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {statistics.median(values):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
