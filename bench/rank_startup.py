"""Where a rank's start-up goes, step by step, in a fresh process (run it twice: cold, then warm).

    python bench/rank_startup.py CHECKPOINT [--kernels triton|torch]

Prints seconds since the process started after each step a rank takes before its first batch is
done: importing the package, torch and fair-esm, starting CUDA, reading the checkpoint, building
the packed model on the GPU, a one-sequence batch (kernel start-up alone), then batches of
log-normal lengths (131,072 tokens) until the time per batch settles. ``--kernels torch`` rotates
q and k and computes the LayerNorms with eager torch instead of esmshard's Triton kernels (no
Triton in the process).
"""

import sys
import time

STARTED = time.monotonic()
marks = []


def mark(step: str) -> None:
    marks.append((step, time.monotonic() - STARTED))


import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow" / "scripts"))
from esmshard.progress import process_age  # noqa: E402
from esmshard.rank import RankSettings  # noqa: E402, F401  (what the embed job imports first)

mark("import numpy, h5py, esmshard.rank")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--kernels", choices=["triton", "torch"], default="triton")
    parser.add_argument("--batches", type=int, default=5)
    args = parser.parse_args()
    import torch

    mark("import torch")
    torch.cuda.init()
    torch.empty(1, device="cuda")
    mark("CUDA started")
    from esmshard import packed
    from esmshard.engine import PackedEngine
    from esmshard.model import load_model
    from esmshard.outputs import OutputSpec

    mark("import fair-esm, esmshard.engine")
    packed.ROTARY_KERNEL = packed.NORM_KERNEL = args.kernels == "triton"
    if packed.ROTARY_KERNEL:
        import esmshard.norm_kernel  # noqa: F401
        import esmshard.rotary_kernel  # noqa: F401

        mark("import triton, the rotary and LayerNorm kernels")
    network, alphabet = load_model(args.checkpoint)
    mark("checkpoint read (load_model)")
    spec = OutputSpec.resolve([-1], ["mean"], network.num_layers, max_residues=1022)
    engine = PackedEngine(network, alphabet, "cuda", "float16", spec)
    torch.cuda.synchronize()
    mark("packed model on the GPU")
    rng = np.random.default_rng(0)
    amino = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", np.uint8)
    engine.embed([amino[rng.integers(0, 20, 100)]])
    mark("a one-sequence batch done (kernel start-up)")
    for batch in range(1, args.batches + 1):
        residues, tokens = [], 0
        while tokens < 131072 - 1024:
            length = int(np.clip(rng.lognormal(np.log(300), 0.6), 20, 1022))
            residues.append(amino[rng.integers(0, 20, length)])
            tokens += length + 2
        engine.embed(residues)
        mark(f"batch {batch} done ({tokens} tokens)")
    offset = process_age() - (time.monotonic() - STARTED)  # interpreter start before this file ran
    print(f"interpreter start to this script: {offset:.2f} s")
    previous = 0.0
    for step, at in marks:
        print(f"{at + offset:7.2f} s  (+{at - previous:5.2f})  {step}")
        previous = at


if __name__ == "__main__":
    main()
