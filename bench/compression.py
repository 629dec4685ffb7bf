"""Size and write speed of embeddings.h5's compression options (config ``compression``), on ESM-2
vectors: mean and per-residue, float32 and float16.

    python bench/compression.py [--proteins 400] [--median 120] [--checkpoint PATH] [--repeats 5]

The vectors are ``esmshard.embed``'s for synthetic proteins (log-normal lengths, uniform random
residues) with a checkpoint (default: RANDOM weights of esm2_t6_8M's shape: no real weights are
reachable offline). Each is written as the merge writes it (``shard.create_outputs``: ~4 MiB
chunks, byte shuffle with either filter) into a temporary directory; for comparison also without
the byte shuffle. Prints the stored size against none and MB/s of uncompressed data written and
read back (best of --repeats). Exits non-zero if any dataset does not read back bit for bit.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow" / "scripts"))
from esmshard import embed  # noqa: E402
from esmshard.architectures import MAX_RESIDUES  # noqa: E402
from esmshard.model import write_random_checkpoint  # noqa: E402
from esmshard.outputs import OutputSpec  # noqa: E402
from esmshard.shard import create_outputs  # noqa: E402

ESM2_MAX_RESIDUES = MAX_RESIDUES["esm2"]  # fair-esm's scripts cut there

AMINO = list("ACDEFGHIKLMNPQRSTVWY")
# (label, config compression, byte shuffle): the first three are what esmshard writes.
FILTERS = [
    ("none", "none", False),
    ("gzip", "gzip", True),
    ("lzf", "lzf", True),
    ("gzip, no shuffle", "gzip", False),
    ("lzf, no shuffle", "lzf", False),
]


def vectors(checkpoint: Path, proteins: int, median: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    """(lengths, {"mean": [n, dim], "per_residue": [residues, dim]}) float32, from esmshard.embed."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), 0.6, proteins).astype(int), 20, ESM2_MAX_RESIDUES)
    result = embed(
        ["".join(rng.choice(AMINO, n)) for n in lengths],
        model=checkpoint,
        pooling=["mean", "per_residue"],
        device="cpu",
    )
    (mean,) = [name for name in result if name.startswith("mean/")]
    per_residue = np.concatenate(result[mean.replace("mean", "per_residue")])
    return lengths, {"mean": result[mean], "per_residue": per_residue}


def write_once(path: Path, values: np.ndarray, lengths, pooling: str, compression: str, shuffle: bool):
    """(seconds to write ``values`` as dataset ``pooling/layer_1``, bytes stored)."""
    spec = OutputSpec.resolve([1], [pooling], 1, max_residues=ESM2_MAX_RESIDUES)
    with h5py.File(path, "w") as h5:
        if shuffle or compression == "none":  # what esmshard writes
            (dataset,) = create_outputs(
                h5, spec, [str(i) for i in range(len(lengths))], lengths, values.shape[1], values.dtype, compression
            ).values()
        else:
            rows = max(1, min(len(values), (4 << 20) // values[0].nbytes))  # as create_outputs' chunks
            dataset = h5.create_dataset(
                spec.names[0], values.shape, values.dtype, compression=compression, chunks=(rows, values.shape[1])
            )
        started = time.perf_counter()
        dataset[:] = values
        h5.flush()
        return time.perf_counter() - started, dataset.id.get_storage_size()


def measure(directory: Path, values: np.ndarray, lengths, pooling: str, repeats: int) -> list[tuple]:
    """Rows (filter, stored/none, write MB/s, read MB/s, lossless) for one dataset."""
    rows, plain = [], None
    for label, compression, shuffle in FILTERS:
        path = directory / f"{pooling}_{label.replace(' ', '_')}.h5"
        writes = [write_once(path, values, lengths, pooling, compression, shuffle) for _ in range(repeats)]
        stored = writes[0][1]
        plain = plain or stored
        reads = []
        for _ in range(repeats):
            started = time.perf_counter()
            with h5py.File(path, "r") as h5:
                back = h5[f"{pooling}/layer_1"][:]
            reads.append(time.perf_counter() - started)
        megabytes = values.nbytes / 1e6
        rows.append(
            (
                label,
                stored / plain,
                megabytes / min(t for t, _ in writes),
                megabytes / min(reads),
                np.array_equal(back, values),
            )
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proteins", type=int, default=400)
    parser.add_argument("--median", type=int, default=120, help="median protein length")
    parser.add_argument("--checkpoint", type=Path, help="default: random weights of esm2_t6_8M's shape")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        checkpoint = args.checkpoint or write_random_checkpoint(scratch / "esm2_t6_random.pt", 6, 320, 20)
        lengths, outputs = vectors(checkpoint, args.proteins, args.median)
        print(
            f"{len(lengths)} proteins, {int(lengths.sum())} residues, width {outputs['mean'].shape[1]}, "
            f"checkpoint {checkpoint if args.checkpoint else '(random weights, esm2_t6_8M shape)'}"
        )
        print(f"{'data':<28} {'compression':<17} {'size':>6} {'write MB/s':>11} {'read MB/s':>10}")
        lossless = True
        for dtype in ("float32", "float16"):
            for pooling, values in outputs.items():
                values = values.astype(dtype)
                what = f"{pooling} {dtype} {values.nbytes / 2**20:.1f} MiB"
                for label, size, write, read, same in measure(scratch, values, lengths, pooling, args.repeats):
                    print(
                        f"{what:<28} {label:<17} {size:>6.3f} {write:>11.0f} {read:>10.0f}"
                        f"{'' if same else '  NOT LOSSLESS'}"
                    )
                    lossless &= same
    print("PASS: every dataset read back bit for bit" if lossless else "FAIL: a dataset did not read back as written")
    return 0 if lossless else 1


if __name__ == "__main__":
    sys.exit(main())
