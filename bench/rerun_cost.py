"""What a rerun costs after each kind of change, as a user runs it: the whole `snakemake` command.

    python bench/rerun_cost.py --like esm2_t33_650M_UR50D --n 5000 [--fasta real.fasta ...]

Makes a checkpoint of the named shape (RANDOM weights), a FASTA of --n proteins (log-normal
lengths, median 300, plus any --fasta files), runs the workflow once, then after each change in
turn: nothing, the FASTA touched, one protein appended, world_size + 1, an operational setting
(tokens_per_batch), layers [-1] -> [-1, 1] and back. Prints wall time, what the ranks computed
(from the manifest) and whether a model was loaded; exits non-zero when a rerun computed more
than its change needs or changed a vector it should not have.
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow" / "scripts"))
sys.path.insert(0, str(REPO / "bench"))
from engine_speed import synthetic_records  # noqa: E402
from esmshard.architectures import ESM2_MODELS  # noqa: E402
from esmshard.model import write_random_checkpoint  # noqa: E402


def write_proteins(path: Path, n: int, extra: list[Path], seed: int = 0) -> None:
    with open(path, "wb") as out:
        out.writelines(synthetic_records(n, 300, seed))
        for fasta in extra:
            out.write(fasta.read_bytes())


def run(workdir: Path, config: dict, gpus: int) -> dict:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "workflow/Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        "--cores",
        "all",
        "--resources",
        f"gpu={gpus}",
    ]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode:
        sys.exit(f"snakemake failed:\n{result.stderr[-4000:]}")
    logs = "".join(p.read_text() for p in (workdir / "logs/embed").glob("rank_*.log"))
    manifest = json.loads((workdir / "results/manifest.json").read_text())
    return {
        "seconds": seconds,
        "nothing": "Nothing to be done" in result.stderr,
        "computed": manifest["computed"],
        "loaded": "loaded in" in logs,
        "rules": sorted(set(re.findall(r"^(?:local)?rule (\w+):", result.stderr, re.M))),
    }


def vectors(workdir: Path) -> tuple[list, np.ndarray]:
    with h5py.File(workdir / "results/embeddings.h5") as h5:
        layer = max(int(k.split("_")[1]) for k in h5["mean"])
        return list(h5["ids"].asstr()[:]), h5[f"mean/layer_{layer}"][:]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--like", default="esm2_t33_650M_UR50D", choices=sorted(ESM2_MODELS))
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--fasta", nargs="*", type=Path, default=[])
    parser.add_argument("--world-size", type=int, default=1)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="esmshard-rerun-"))
    write_random_checkpoint(workdir / "model.pt", *ESM2_MODELS[args.like])
    write_proteins(workdir / "proteins.fasta", args.n, args.fasta)
    config = {
        "fasta": ["proteins.fasta"],
        "model": "model.pt",
        "world_size": args.world_size,
    }
    gpus = args.world_size + 1
    rows = [("first run", run(workdir, config, gpus), None)]
    ids, first = vectors(workdir)
    rows.append(("nothing changed", run(workdir, config, gpus), 0))
    (workdir / "proteins.fasta").touch()
    rows.append(("FASTA touched", run(workdir, config, gpus), 0))
    with open(workdir / "proteins.fasta", "a") as fasta:
        fasta.write(">appended\nMKKLLPTAAGLLLLAAQPAMAMDIGINSDPNSSSVDKLAAALEHHHHHH\n")
    rows.append(("one protein appended", run(workdir, config, gpus), 1))
    rows.append(("world_size + 1", run(workdir, {**config, "world_size": args.world_size + 1}, gpus), 0))
    rows.append(
        (
            "tokens_per_batch changed",
            run(workdir, {**config, "world_size": args.world_size + 1, "tokens_per_batch": 20000}, gpus),
            0,
        )
    )
    rows.append(("layers [-1] -> [-1, 1]", run(workdir, {**config, "layers": [-1, 1]}, gpus), None))
    rows.append(("layers back to [-1]", run(workdir, config, gpus), 0))
    after_ids, after = vectors(workdir)
    same = after_ids[: len(ids)] == ids and np.array_equal(after[: len(ids)], first)

    print(
        f"\n{args.n} proteins + {len(args.fasta)} file(s), {args.like} shape (RANDOM weights), "
        f"world_size {args.world_size}; whole snakemake runs in {workdir}"
    )
    print("| change | wall time | sequences computed | model loaded | rules run |")
    print("|---|---:|---:|---|---|")
    ok = same
    for name, row, allowed in rows:
        print(
            f"| {name} | {row['seconds']:.1f} s | {row['computed'] if not row['nothing'] else 0} | "
            f"{'yes' if row['loaded'] and not row['nothing'] else 'no'} | "
            f"{', '.join(row['rules']) or 'nothing to be done'} |"
        )
        ok &= allowed is None or row["nothing"] or row["computed"] <= allowed
    print(f"vectors of the first run unchanged after all reruns: {same}")
    print("PASS" if ok else "FAIL: a rerun computed more than its change needs, or a vector changed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
