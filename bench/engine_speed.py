"""Speed of the embed job against fair-esm, on one GPU, same synthetic proteins, same run.

    python bench/engine_speed.py --models esm2_t33_650M_UR50D esm2_t36_3B_UR50D esm1b_t33_650M_UR50S
    python bench/engine_speed.py --models esmc_300m esmc_600m prot_t5_xl --no-baseline

For each model (RANDOM weights of the real shape: speed does not depend on the values):
  (a) fair-esm in fp16 the way its scripts/extract.py runs it: sequences in memory, length-sorted
      padded batches of --baseline-tokens tokens, per-sequence mean of the last layer;
  (b) esmshard's embed job end to end: index read, tokenising, packed forward (--precision), pooling and
      the HDF5 shard write (the rank's work after its model is loaded).
Prints residues/s, b/a, peak GPU memory, the fraction of the FLOP limit (2 x parameters FLOPs per
token at 790 TFLOP/s, the bf16 rate measured on an H200), and the numerics of (b) against
fair-esm's fp32 forward on a length-stratified subset (cosine >= 0.9999, relative L2 <= 1e-2).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import esm
import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow" / "scripts"))
from esmshard import packed  # noqa: E402
from esmshard.architectures import MAX_RESIDUES, RELEASED_SHAPES, release_family  # noqa: E402
from esmshard.engine import PackedEngine  # noqa: E402
from esmshard.huggingface import EsmConfig, ProtT5Config  # noqa: E402
from esmshard.index import SequenceIndex, build_index  # noqa: E402
from esmshard.model import build_module  # noqa: E402
from esmshard.outputs import OutputSpec  # noqa: E402
from esmshard.plan import Plan, balance, distinct, sequence_costs, write_plan  # noqa: E402
from esmshard.progress import Progress  # noqa: E402
from esmshard.rank import fill_store_and_assemble  # noqa: E402
from esmshard.work import RankSettings, read_rank_work  # noqa: E402

ESM2_MAX_RESIDUES = MAX_RESIDUES["esm2"]  # fair-esm's scripts cut there

PEAK_FLOPS = 790e12
AMINO = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", np.uint8)


def synthetic_fasta(path: Path, n: int, median: int, seed: int = 0, cap: int | None = ESM2_MAX_RESIDUES) -> None:
    """Log-normal lengths (median ~``median``, capped at ``cap``), uniform random residues."""
    with open(path, "wb") as handle:
        handle.writelines(synthetic_records(n, median, seed, cap))


def synthetic_records(n: int, median: int, seed: int = 0, cap: int | None = ESM2_MAX_RESIDUES):
    """FASTA records syn0000000, ...: log-normal lengths (median ~``median``, at least 20, at most
    ``cap``), uniform random residues."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), 0.6, n).astype(int), 20, cap)
    for i, length in enumerate(lengths):
        yield b">syn%07d\n" % i + AMINO[rng.integers(0, 20, length)].tobytes() + b"\n"


def fair_esm_fp16(network, alphabet, sequences: list[str], tokens_per_batch: int, layer: int) -> float:
    """extract.py's loop in fp16; returns seconds (synchronised). fair-esm's ESM-1b forward in
    half precision fails (its token-dropout rescale turns the embeddings float32 before its
    half LayerNorm), so there it runs under autocast, as a user makes it run."""
    dataset = esm.FastaBatchedDataset([str(i) for i in range(len(sequences))], sequences)
    batches = dataset.get_batch_indices(tokens_per_batch, extra_toks_per_seq=1)
    loader = torch.utils.data.DataLoader(
        dataset, collate_fn=alphabet.get_batch_converter(ESM2_MAX_RESIDUES), batch_sampler=batches
    )
    torch.cuda.synchronize()
    started = time.perf_counter()
    esm1b = isinstance(network, esm.ProteinBertModel)
    with torch.no_grad(), torch.autocast("cuda", torch.float16, enabled=esm1b):
        for _labels, strs, toks in loader:
            out = network(toks.to("cuda", non_blocking=True), repr_layers=[layer])["representations"][layer]
            for i, s in enumerate(strs):
                out[i, 1 : min(len(s), ESM2_MAX_RESIDUES) + 1].mean(0).clone().cpu()
    torch.cuda.synchronize()
    return time.perf_counter() - started


# ProtT5-XL's encoder (Rostlab/prot_t5_xl_half_uniref50-enc), by the name the bench gives it
PROTT5_XL = ProtT5Config(24, 1024, 32, 128, 16384, 32, 128, 1e-6, 128)
SHAPES = {**RELEASED_SHAPES, "prot_t5_xl": PROTT5_XL[:3]}


def family_of(name: str) -> str:
    return "prott5" if name == "prot_t5_xl" else release_family(name)


def reference_means(network, alphabet, sequences: list[str], layer: int, max_residues: int) -> np.ndarray:
    means = []
    with torch.no_grad():
        for s in sequences:
            s = s[:max_residues]
            ids = [alphabet.get_idx(c) for c in s]
            first = int(alphabet.prepend_bos)  # ProtT5: residues, then </s>
            toks = torch.tensor([[alphabet.cls_idx] * first + ids + [alphabet.eos_idx]])
            out = network(toks.cuda(), repr_layers=[layer])["representations"][layer]
            means.append(out[0, first : len(s) + first].float().mean(0).cpu().numpy())
    return np.stack(means)


def random_network(name: str):
    """The module of the released model ``name``'s shape (and family), random weights, on the GPU."""
    layers, dim, heads = SHAPES[name]
    family = family_of(name)
    config = EsmConfig(layers, dim, heads, family != "esmc", 1e-5, 10000.0, family, emb_layer_norm_before=True)
    config = PROTT5_XL if family == "prott5" else config
    torch.manual_seed(0)
    with torch.device("cuda"):
        return build_module(config, initialised=True).eval()


def run_model(name: str, args, workdir: Path) -> dict:
    layers, dim, heads = SHAPES[name]
    family = family_of(name)
    network = random_network(name)
    alphabet = network.alphabet
    params = sum(p.numel() for p in network.parameters())
    index = SequenceIndex(workdir / "index")
    sequences = [index.sequence(i) for i in range(len(index))]
    residues = int(np.minimum(index.lengths, MAX_RESIDUES[family]).sum())
    limit = PEAK_FLOPS / (2 * params)  # tokens/s at the FLOP limit

    # (b) first, while the fp32 network is the only copy on the GPU besides the packed one
    settings = RankSettings.from_config(
        {"precision": args.precision, "tokens_per_batch": args.tokens_per_batch, "progress_seconds": 1e9}
    )
    plan_path = write_bench_plan(workdir, name)
    work = read_rank_work(workdir / "index", plan_path, 0, settings)
    spec = work.spec
    engine = PackedEngine(network, alphabet, "cuda", args.precision, spec)
    started = time.perf_counter()
    engine.embed([index.residues(i) for i in range(min(64, len(index)))])  # warm-up
    torch.cuda.synchronize()
    print(
        f"{name}: the packed engine's first batch took {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    progress = Progress(len(work.ids), residues, settings.progress_seconds, 0)
    fill_store_and_assemble(work, workdir / "shard.h5", workdir / f"store-{name}", settings, progress, engine)
    packed_seconds = time.perf_counter() - started
    packed_peak = torch.cuda.max_memory_allocated()
    del engine

    # numerics of (b) on a length-stratified subset against fair-esm fp32
    order = np.argsort(index.lengths)
    subset = order[np.linspace(0, len(order) - 1, args.check).astype(int)]
    with h5py.File(workdir / "shard.h5") as shard:
        packed_vectors = shard[f"mean/layer_{layers}"][:][subset]
    reference = reference_means(network, alphabet, [sequences[i] for i in subset], layers, spec.max_residues)
    cosine = (packed_vectors * reference).sum(1) / (
        np.linalg.norm(packed_vectors, axis=1) * np.linalg.norm(reference, axis=1)
    )
    rel_l2 = np.linalg.norm(packed_vectors - reference, axis=1) / np.linalg.norm(reference, axis=1)

    if args.no_baseline:
        return result(
            name, params, residues, sequences, limit, float("nan"), 0, packed_seconds, packed_peak, cosine, rel_l2
        )
    # (a) fair-esm fp16
    network = network.half()
    fair_esm_fp16(network, alphabet, sequences[:64], args.baseline_tokens, layers)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    baseline_seconds = fair_esm_fp16(network, alphabet, sequences, args.baseline_tokens, layers)
    baseline_peak = torch.cuda.max_memory_allocated()
    del network
    torch.cuda.empty_cache()
    return result(
        name,
        params,
        residues,
        sequences,
        limit,
        baseline_seconds,
        baseline_peak,
        packed_seconds,
        packed_peak,
        cosine,
        rel_l2,
    )


def result(
    name,
    params,
    residues,
    sequences,
    limit,
    baseline_seconds,
    baseline_peak,
    packed_seconds,
    packed_peak,
    cosine,
    rel_l2,
) -> dict:
    tokens = residues + 2 * len(sequences)
    return {
        "model": name,
        "params": params,
        "residues": residues,
        "baseline": (residues / baseline_seconds, baseline_peak, tokens / baseline_seconds / limit),
        "packed": (residues / packed_seconds, packed_peak, tokens / packed_seconds / limit),
        "cos_min": float(cosine.min()),
        "rel_l2_max": float(rel_l2.max()),
        "limit_residues": limit * residues / tokens,
    }


def write_bench_plan(workdir: Path, name: str) -> Path:
    """One rank embeds every sequence, with the (random) model of a released shape."""
    index = SequenceIndex(workdir / "index")
    position, source = distinct(index.digests())
    layers, dim, _ = SHAPES[name]
    spec = OutputSpec.resolve([-1], ["mean"], layers, max_residues=MAX_RESIDUES[family_of(name)])
    ranks, rank_costs = balance(sequence_costs(spec, index.lengths[position], dim), 1)
    model = {
        "path": name,
        "digest": f"random-{name}",
        "size": 0,
        "mtime_ns": 0,
        "family": family_of(name),
        "num_layers": layers,
        "embed_dim": dim,
    }
    write_plan(workdir / f"plan-{name}.h5", Plan(ranks, position, source, 1, index.fingerprint, model), rank_costs)
    return workdir / f"plan-{name}.h5"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["esm2_t33_650M_UR50D", "esm2_t36_3B_UR50D"])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--median", type=int, default=300)
    parser.add_argument(
        "--cap", type=int, default=ESM2_MAX_RESIDUES, help="longest synthetic protein (default: ESM-2's limit)"
    )
    parser.add_argument("--tokens-per-batch", type=int, default=None, help="packed engine; default: from free memory")
    parser.add_argument(
        "--baseline-tokens", type=int, default=4096, help="fair-esm padded tokens per batch (extract.py: 4096)"
    )
    parser.add_argument("--check", type=int, default=200, help="sequences compared with fair-esm fp32")
    parser.add_argument(
        "--rotary-kernel",
        type=int,
        choices=[0, 1],
        default=None,
        help="CUDA: rotary through the Triton kernel (default: packed.ROTARY_KERNEL)",
    )
    parser.add_argument(
        "--norm-kernel",
        type=int,
        choices=[0, 1],
        default=None,
        help="CUDA: residual adds and LayerNorms through the Triton kernel (default: packed.NORM_KERNEL)",
    )
    parser.add_argument(
        "--precision",
        default="float16",
        choices=["float16", "bfloat16"],
        help="the packed engine's (default: float16, what precision: auto runs on a GPU)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="the packed engine only (no ratio)")
    args = parser.parse_args()
    if args.rotary_kernel is not None:
        packed.ROTARY_KERNEL = bool(args.rotary_kernel)
    if args.norm_kernel is not None:
        packed.NORM_KERNEL = bool(args.norm_kernel)

    workdir = Path(tempfile.mkdtemp(prefix="esmshard-bench-"))
    synthetic_fasta(workdir / "proteins.fasta", args.n, args.median, cap=args.cap)
    summary = build_index([workdir / "proteins.fasta"], workdir / "index")
    lengths = SequenceIndex(workdir / "index").lengths
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.n} synthetic proteins, median length "
        f"{int(np.median(lengths))}, {summary.n_residues} residues; RANDOM weights of the real shapes"
    )
    print(f"packed engine: {args.precision}, rotary kernel {packed.ROTARY_KERNEL}, norm kernel {packed.NORM_KERNEL}")

    rows = []
    for name in args.models:
        rows.append(run_model(name, args, workdir))
        row = rows[-1]
        print(
            f"{name}: packed {row['packed'][0]:,.0f} residues/s, fair-esm fp16 {row['baseline'][0]:,.0f}; "
            f"cos min {row['cos_min']:.6f}, rel L2 max {row['rel_l2_max']:.1e}",
            flush=True,
        )
    print("\n| model | path | residues/s | vs fair-esm fp16 | peak GPU memory | of FLOP limit | numerics vs fp32 |")
    print("|---|---|---:|---:|---:|---:|---|")
    for row in rows:
        base, ours = row["baseline"], row["packed"]
        if not args.no_baseline:
            print(
                f"| {row['model']} | fair-esm fp16, {args.baseline_tokens} padded tokens/batch | {base[0]:,.0f} "
                f"| 1.00x | {base[1] / 2**30:.1f} GiB | {100 * base[2]:.0f}% | |"
            )
        ratio = "not run" if args.no_baseline else f"{ours[0] / base[0]:.2f}x"
        print(
            f"| {row['model']} | esmshard embed job (packed {args.precision}) | {ours[0]:,.0f} | {ratio} "
            f"| {ours[1] / 2**30:.1f} GiB | {100 * ours[2]:.0f}% | cos min {row['cos_min']:.6f}, "
            f"rel L2 max {row['rel_l2_max']:.1e} |"
        )
    for row in rows:
        print(f"{row['model']}: FLOP limit {row['limit_residues']:,.0f} residues/s ({row['params'] / 1e6:.0f}M params)")
    failed = [row["model"] for row in rows if not (row["cos_min"] >= 0.9999 and row["rel_l2_max"] <= 1e-2)]
    print(
        f"FAIL: numerics of {', '.join(failed)}" if failed else "PASS",
        "(cosine >= 0.9999 and relative L2 <= 1e-2 against fair-esm fp32)",
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
