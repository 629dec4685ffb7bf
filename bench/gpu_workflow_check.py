"""GPU check of the whole workflow: run snakemake on a GPU-sized ESM-2 (random weights of a real
shape) and compare every embedding with fair-esm's own fp32 forward on the same GPU.

    python bench/gpu_workflow_check.py --like esm2_t33_650M_UR50D --fasta demo/proteins.fasta [more.fasta]

Prints per-sequence cosine and relative L2 against fair-esm (pass: cosine >= 0.9999) and the
workflow's wall time. Weights are RANDOM (no download here): this checks numerics, not biology.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow" / "scripts"))
from esmshard.architectures import ESM2_MODELS, MAX_RESIDUES  # noqa: E402
from esmshard.fasta import read_fasta  # noqa: E402
from esmshard.model import load_model, write_random_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def fair_esm_means(network, alphabet, sequences, layer, tokens_per_batch=16384):
    """fair-esm's extract.py logic (padded, length-sorted batches) in fp32 on the GPU."""
    converter = alphabet.get_batch_converter(truncation_seq_length=MAX_RESIDUES)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = [None] * len(sequences)
    batch = []
    for i in order + [None]:
        longest = min(len(sequences[batch[-1]]), MAX_RESIDUES) + 2 if batch else 0
        if i is None or (batch and (len(batch) + 1) * max(longest, min(len(sequences[i]), MAX_RESIDUES) + 2) > tokens_per_batch):
            _, _, tokens = converter([(str(j), sequences[j]) for j in batch])
            with torch.no_grad():
                reps = network(tokens.cuda(), repr_layers=[layer])["representations"][layer]
            for row, j in enumerate(batch):
                out[j] = reps[row, 1 : min(len(sequences[j]), MAX_RESIDUES) + 1].mean(0).cpu().numpy()
            batch = []
        if i is not None:
            batch.append(i)
    return np.stack(out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--like", default="esm2_t33_650M_UR50D", choices=sorted(ESM2_MODELS))
    parser.add_argument("--fasta", nargs="+", required=True)
    parser.add_argument("--workdir", default="/tmp/esmshard-gpu-check")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--engine", default="packed", choices=["packed", "reference"])
    parser.add_argument("--tokens-per-batch", type=int, default=None)
    args = parser.parse_args()

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = workdir / f"{args.like}_RANDOM_WEIGHTS.pt"
    if not checkpoint.exists():
        layers, dim, heads = ESM2_MODELS[args.like]
        write_random_checkpoint(checkpoint, layers, dim, heads, seed=0)
    config = {
        "fasta": [str(Path(f).resolve()) for f in args.fasta],
        "model": str(checkpoint),
        "precision": args.precision,
        "engine": args.engine,
        "tokens_per_batch": args.tokens_per_batch,
        "progress_seconds": 5,
    }
    (workdir / "config.yaml").write_text(json.dumps(config))
    started = time.monotonic()
    command = ["snakemake", "--snakefile", str(REPO / "workflow/Snakefile"), "--directory", str(workdir),
               "--configfile", str(workdir / "config.yaml"), "--cores", "4", "--resources", "gpu=1"]
    subprocess.run(command, check=True)
    wall = time.monotonic() - started

    with h5py.File(workdir / "results/embeddings.h5") as h5:
        ids = list(h5["ids"].asstr()[:])
        embedded = h5["embeddings"][:]
        attrs = dict(h5.attrs)
    sequences = {r.id: r.residues.decode() for f in args.fasta for r in read_fasta(f)}
    assert ids == list(sequences), "IDs differ from input order"
    network, alphabet = load_model(str(checkpoint))
    network = network.cuda().float().eval()
    reference = fair_esm_means(network, alphabet, list(sequences.values()), int(attrs["layer"]))
    cosine = (embedded * reference).sum(1) / (np.linalg.norm(embedded, axis=1) * np.linalg.norm(reference, axis=1))
    rel_l2 = np.linalg.norm(embedded - reference, axis=1) / np.linalg.norm(reference, axis=1)
    residues = sum(min(len(s), MAX_RESIDUES) for s in sequences.values())
    print(f"\nGPU: {torch.cuda.get_device_name()}  model: {args.like} shape, RANDOM weights  "
          f"precision: {attrs['precision']}  engine: {attrs['engine']}")
    print(f"sequences: {len(ids)}  residues embedded: {residues}  workflow wall time: {wall:.1f} s "
          f"(including model generation load and snakemake start)")
    print(f"cosine vs fair-esm fp32: min {cosine.min():.6f}  median {np.median(cosine):.6f}")
    print(f"relative L2 vs fair-esm fp32: max {rel_l2.max():.2e}  median {np.median(rel_l2):.2e}")
    print("PASS" if cosine.min() >= 0.9999 else "FAIL", "(cosine >= 0.9999 for every sequence)")
    for log in sorted((workdir / "logs/embed").glob("*.log")):
        print(log.name, log.read_text().strip().splitlines()[-1])


if __name__ == "__main__":
    main()
