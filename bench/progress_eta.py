"""How honest the terminal's ETA is: a whole run, its progress lines timed as they arrive.

    python bench/progress_eta.py --fasta ../shared/data/P62593.fasta --like esm2_t6_8M_UR50D --world-size 2

Runs `snakemake` on the proteins of --fasta with a checkpoint of the named shape (RANDOM
weights) in a fresh directory, reads the `esmshard: progress:` lines from its output as they come,
and when every residue is done compares each line's ETA with the time that was really left. Prints
one row per line (share done, ETA, time left, error) and the largest error once 10% of the
residues are done: the target is within 30%.
"""

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow" / "scripts"))
from esmshard.architectures import ESM2_MODELS  # noqa: E402
from esmshard.model import write_random_checkpoint  # noqa: E402

LINE = re.compile(
    r"esmshard: progress: [\d,]+/[\d,]+ sequences \([\d.]+%\), ([\d,]+)/([\d,]+) residues, [\d,]+ residues/s, "
    r"ETA (\S+) \(ranks: (\d+) running, (\d+) done\)"
)


def seconds(clock: str) -> float | None:
    if clock == "?":
        return None
    hours, minutes, secs = map(int, clock.split(":"))
    return 3600 * hours + 60 * minutes + secs


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fasta", type=Path, default=REPO.parent / "shared/data/P62593.fasta")
    parser.add_argument("--n", type=int, default=None, help="the first N records only")
    parser.add_argument("--like", default="esm2_t6_8M_UR50D", choices=sorted(ESM2_MODELS))
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--progress-seconds", type=float, default=3)
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="esmshard-eta-"))
    model = write_random_checkpoint(workdir / "model.pt", *ESM2_MODELS[args.like])
    fasta = args.fasta.resolve()
    if args.n:
        records = args.fasta.read_text().split(">")[1 : args.n + 1]
        fasta = workdir / "proteins.fasta"
        fasta.write_text("".join(">" + record for record in records))
    config = {
        "fasta": [str(fasta)],
        "model": str(model),
        "world_size": args.world_size,
        "progress_seconds": args.progress_seconds,
        "threads_per_rank": max(1, args.cores // args.world_size),
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    command = [
        str(Path(sys.executable).with_name("snakemake")),
        "--snakefile",
        str(REPO / "workflow/Snakefile"),
        "--configfile",
        "config.yaml",
        "--cores",
        str(args.cores),
    ]
    started = time.monotonic()
    lines, done_at = [], None
    with subprocess.Popen(command, cwd=workdir, stderr=subprocess.PIPE, text=True) as process:
        for text in process.stderr:
            match = LINE.search(text)
            if not match:
                continue
            now = time.monotonic() - started
            residues, total = (int(match[i].replace(",", "")) for i in (1, 2))
            lines.append((now, residues, total, seconds(match[3]), int(match[4]), int(match[5])))
            if done_at is None and residues == total and int(match[4]) == 0:
                done_at = now
    if process.returncode or done_at is None:
        print(f"the run failed or never finished its ranks (exit {process.returncode}); see {workdir}")
        return 1
    print(
        f"{fasta.name} ({args.n or 'all'} records), {args.like} shape (RANDOM weights), "
        f"world_size {args.world_size}, {args.cores} cores"
    )
    print("| time | residues done | ETA shown | time really left | error |")
    print("|---:|---:|---:|---:|---:|")
    worst = worst_away = 0.0  # away: while more than two progress intervals were left
    for now, residues, total, eta, running, _ in lines:
        if not running:
            continue
        left = done_at - now
        error = None if eta is None or left <= 0 else (eta - left) / left
        if error is not None and residues >= 0.1 * total:
            worst = max(worst, abs(error))
            if left > 2 * args.progress_seconds:
                worst_away = max(worst_away, abs(error))
        shown = "?" if eta is None else f"{eta:.0f} s"
        print(
            f"| {now:.1f} s | {100 * residues / total:.1f}% | {shown} | {left:.1f} s | "
            f"{'' if error is None else f'{100 * error:+.0f}%'} |"
        )
    print(
        f"largest ETA error once 10% was done: {100 * worst_away:.0f}% while more than "
        f"{2 * args.progress_seconds:g} s were left, {100 * worst:.0f}% to the end (target: within 30%)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
