"""GPU check of the whole workflow: run snakemake on a GPU-sized ESM-2 (random weights of a real
shape) and compare every embedding with fair-esm's own fp32 forward on the same GPU.

    python bench/gpu_workflow_check.py --like esm2_t33_650M_UR50D --fasta demo/proteins.fasta [more.fasta]

Prints per-sequence cosine and relative L2 against fair-esm (pass: cosine >= --min-cosine and
relative L2 <= --max-rel-l2 for every row; defaults 0.9999 and 1e-2) and the
workflow's wall time. With --all-outputs the run stores mean, BOS and per-residue vectors of the
last and a middle layer (windows for long proteins) and every one is compared (per-residue: per
residue; proteins over 1022 residues, which fair-esm cannot take whole, are left out of the
comparison). Weights are RANDOM (no download here): this checks numerics, not biology.
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

ESM2_MAX_RESIDUES = MAX_RESIDUES["esm2"]  # fair-esm's scripts cut there

REPO = Path(__file__).resolve().parents[1]


def fair_esm_outputs(network, alphabet, sequences, layers, tokens_per_batch=16384):
    """{(pooling, layer): [per-sequence arrays]} from fair-esm's fp32 forward on the GPU, in
    extract.py's padded, length-sorted batches."""
    converter = alphabet.get_batch_converter(truncation_seq_length=ESM2_MAX_RESIDUES)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = {(p, layer): [None] * len(sequences) for p in ("mean", "bos", "per_residue") for layer in layers}
    batch = []
    for i in order + [None]:
        longest = min(len(sequences[batch[-1]]), ESM2_MAX_RESIDUES) + 2 if batch else 0
        if i is None or (
            batch and (len(batch) + 1) * max(longest, min(len(sequences[i]), ESM2_MAX_RESIDUES) + 2) > tokens_per_batch
        ):
            _, _, tokens = converter([(str(j), sequences[j]) for j in batch])
            with torch.no_grad():
                representations = network(tokens.cuda(), repr_layers=list(layers))["representations"]
            for layer in layers:
                for row, j in enumerate(batch):
                    per_residue = representations[layer][row, 1 : min(len(sequences[j]), ESM2_MAX_RESIDUES) + 1]
                    out["per_residue", layer][j] = per_residue.cpu().numpy()
                    out["mean", layer][j] = per_residue.mean(0).cpu().numpy()
                    out["bos", layer][j] = representations[layer][row, 0].cpu().numpy()
            batch = []
        if i is not None:
            batch.append(i)
    return out


def compare(name, got, want, min_cosine, max_rel_l2):
    """Row-wise cosine and relative L2 of two [n, dim] arrays; prints them; True if cosine >= 0.9999."""
    got, want = got.astype(np.float64), want.astype(np.float64)
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    rel_l2 = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    print(
        f"{name:22s} rows {len(got):8d}  cosine min {cosine.min():.6f} median {np.median(cosine):.6f}  "
        f"rel L2 max {rel_l2.max():.2e} median {np.median(rel_l2):.2e}"
    )
    return bool(cosine.min() >= min_cosine and rel_l2.max() <= max_rel_l2)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--like", default="esm2_t33_650M_UR50D", choices=sorted(ESM2_MODELS))
    parser.add_argument("--fasta", nargs="+", required=True)
    parser.add_argument("--workdir", default="/tmp/esmshard-gpu-check")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--engine", default="packed", choices=["packed", "reference"])
    parser.add_argument("--tokens-per-batch", type=int, default=None)
    parser.add_argument("--all-outputs", action="store_true", help="mean, bos, per_residue of two layers, windows")
    # the gates: bfloat16 passes cosine >= 0.9999, rel. L2 <= 1e-2; the float16 default (issue 11)
    # cosine >= 0.99999, rel. L2 <= 1e-3
    parser.add_argument("--min-cosine", type=float, default=0.9999)
    parser.add_argument("--max-rel-l2", type=float, default=1e-2)
    args = parser.parse_args()

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = workdir / f"{args.like}_RANDOM_WEIGHTS.pt"
    num_layers, dim, heads = ESM2_MODELS[args.like]
    if not checkpoint.exists():
        write_random_checkpoint(checkpoint, num_layers, dim, heads, seed=0)
    layers = [num_layers // 2, num_layers] if args.all_outputs else [num_layers]
    poolings = ["mean", "bos", "per_residue"] if args.all_outputs else ["mean"]
    config = {
        "fasta": [str(Path(f).resolve()) for f in args.fasta],
        "model": str(checkpoint),
        "precision": args.precision,
        "engine": args.engine,
        "tokens_per_batch": args.tokens_per_batch,
        "progress_seconds": 5,
        "layers": layers,
        "pooling": poolings,
        "long_sequences": "window" if args.all_outputs else "truncate",
    }
    (workdir / "config.yaml").write_text(json.dumps(config))
    started = time.monotonic()
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "results/embeddings.h5",
        "--snakefile",
        str(REPO / "workflow/Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        "--cores",
        "4",
        "--resources",
        "gpu=1",
    ]
    subprocess.run(command, check=True)
    wall = time.monotonic() - started

    sequences = {r.id: r.residues.decode() for f in args.fasta for r in read_fasta(f)}
    network, alphabet = load_model(str(checkpoint))
    network = network.cuda().float().eval()
    reference = fair_esm_outputs(network, alphabet, list(sequences.values()), layers)
    whole = [i for i, s in enumerate(sequences.values()) if len(s) <= ESM2_MAX_RESIDUES or not args.all_outputs]
    passed = True
    with h5py.File(workdir / "results/embeddings.h5") as h5:
        assert list(h5["ids"].asstr()[:]) == list(sequences), "IDs differ from input order"
        attrs = dict(h5.attrs)
        print(
            f"\nGPU: {torch.cuda.get_device_name()}  model: {args.like} shape, RANDOM weights  "
            f"precision: {attrs['compute_precision']}  engine: {attrs['engine']}"
        )
        print(
            f"sequences: {len(sequences)} ({len(sequences) - len(whole)} over {ESM2_MAX_RESIDUES} residues left out "
            f"of the comparison)  workflow wall time: {wall:.1f} s (including model load and snakemake start)"
        )
        for pooling in poolings:
            for layer in layers:
                name = f"{pooling}/layer_{layer}"
                if pooling == "per_residue":
                    offsets = h5["residue_offsets"][:]
                    flat = h5[name][:]
                    got = np.concatenate([flat[offsets[i] : offsets[i + 1]] for i in whole])
                    want = np.concatenate([reference[pooling, layer][i] for i in whole])
                else:
                    got, want = h5[name][:][whole], np.stack([reference[pooling, layer][i] for i in whole])
                passed &= compare(name, got, want, args.min_cosine, args.max_rel_l2)
    print(
        "PASS" if passed else "FAIL",
        f"(cosine >= {args.min_cosine} and rel. L2 <= {args.max_rel_l2:g} for every sequence and residue)",
    )
    for log in sorted((workdir / "logs/embed").glob("*.log")):
        print(log.name, log.read_text().strip().splitlines()[-1])
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
