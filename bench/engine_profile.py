"""Where the packed engine's time goes on one GPU: kernel by kernel, and the gaps between them.

    python bench/engine_profile.py --models esm2_t33_650M_UR50D esmc_600m esm2_t36_3B_UR50D

For each model (RANDOM weights of the real shape; speed does not depend on the values): the rank's
engine (``PackedEngine`` in float16: tokenising on its thread, the packed forward, pooling, copies
to the host) on batches of the engine's default token budget, filled in input order with proteins
of log-normal lengths (median 300, capped at the family's limit). After --warmup batches,
--batches more run timed by the wall clock, then the same batches under torch.profiler. Prints:
- residues/s, and the share of the FLOP limit (2 x the matrix products' weights FLOPs per token
  plus attention's 4 x L x D per token and layer, at the dense float16 rate measured here on an
  8192^3 product);
- the GPU's busy share of the profiled span (the union of kernel intervals from the first kernel's
  start to the last one's end; the rest is launch gaps and host work) and of the whole wall clock;
- GPU milliseconds per batch by kind of kernel, with each kind's share, the matrix products' rate
  against cuBLAS's own on the model's largest layer shape alone, and attention's rate;
- the most expensive kernels by name.
The profiler's trace goes to --trace-dir (one JSON file per model) where given.
"""

import argparse
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow" / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_speed import AMINO, SHAPES, family_of, random_network  # noqa: E402
from esmshard.architectures import MAX_RESIDUES  # noqa: E402
from esmshard.engine import PackedEngine  # noqa: E402
from esmshard.outputs import OutputSpec  # noqa: E402

# Kinds of kernel, by the first pattern their name matches.
KINDS = (
    ("attention", r"flash|fmha"),  # first: FlashAttention's kernel names hold cutlass's
    ("matrix products", r"gemm|nvjet|cutlass|xmma|cublas"),
    ("LayerNorm (Triton)", r"_layer_norm_kernel"),
    ("rotary (Triton)", r"rotary"),
    ("SwiGLU (Triton)", r"_swiglu_kernel"),
    ("GELU / SiLU", r"[Gg]elu|[Ss]ilu"),
    ("multiply", r"[Mm]ul"),
    ("add", r"[Aa]dd"),
    ("cast / copy", r"copy|Memcpy|Memset"),
    ("other", r""),
)


def kind_of(name: str) -> str:
    return next(kind for kind, pattern in KINDS if re.search(pattern, name))


def matmul_rate(m: int, k: int, n: int, dtype=torch.float16, repeats: int = 20) -> float:
    """TFLOP/s of cuBLAS on [m, k] x [k, n], median of ``repeats`` (CUDA events)."""
    a = torch.randn(m, k, dtype=dtype, device="cuda")
    b = torch.randn(k, n, dtype=dtype, device="cuda")
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * m * k * n / float(np.median(times)) / 1e12


def proteins(n: int, cap: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(300), 0.6, n).astype(int), 20, cap)
    return [AMINO[rng.integers(0, 20, length)] for length in lengths]


def input_order_batches(residues: list[np.ndarray], budget: int, cap: int) -> list[np.ndarray]:
    """Positions in input order, each batch up to ``budget`` tokens (BOS and EOS counted)."""
    batches, current, used = [], [], 0
    for position, r in enumerate(residues):
        tokens = min(len(r), cap) + 2
        if current and used + tokens > budget:
            batches.append(np.array(current))
            current, used = [], 0
        current.append(position)
        used += tokens
    return batches


def kernel_intervals(trace: Path) -> list[tuple[str, float, float]]:
    """(name, start, end) in microseconds of every device activity in a Chrome trace."""
    events = json.loads(trace.read_text())["traceEvents"]
    return [
        (e["name"], e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    ]


def busy_microseconds(intervals) -> float:
    busy, end = 0.0, -np.inf
    for _, start, stop in sorted(intervals, key=lambda i: i[1]):
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy


def run_model(name: str, args, dense_rate: float) -> dict:
    layers, dim, _ = SHAPES[name]
    family = family_of(name)
    network = random_network(name)
    cap = MAX_RESIDUES[family]
    spec = OutputSpec.resolve([-1], ["mean"], layers, max_residues=cap)
    engine = PackedEngine(network, network.alphabet, "cuda", "float16", spec)
    del network
    torch.cuda.empty_cache()
    budget = args.tokens_per_batch or engine.default_tokens_per_batch()
    per_batch = budget // 365 + 1  # proteins per batch at the lengths' mean (~363 tokens)
    residues = proteins(per_batch * (args.warmup + 2 * args.batches + 2), cap)
    batches = input_order_batches(residues, budget, cap)
    warmup, timed = batches[: args.warmup], batches[args.warmup : args.warmup + args.batches]
    profiled = batches[args.warmup + args.batches : args.warmup + 2 * args.batches]

    def run(selected) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in engine.embed_batches(selected, lambda positions: [residues[i] for i in positions]):
            pass
        torch.cuda.synchronize()
        return time.perf_counter() - started

    run(warmup)
    seconds = run(timed)
    lengths = np.array([min(len(residues[i]), cap) for batch in timed for i in batch])
    trace = Path(args.trace_dir or tempfile.mkdtemp()) / f"trace-{name}.json"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        profiled_seconds = run(profiled)
    profiler.export_chrome_trace(str(trace))
    intervals = kernel_intervals(trace)
    span = max(i[2] for i in intervals) - min(i[1] for i in intervals)
    busy = busy_microseconds(intervals)
    by_kind, by_name = defaultdict(float), defaultdict(float)
    for kernel, start, stop in intervals:
        by_kind[kind_of(kernel)] += stop - start
        by_name[kernel] += stop - start

    linears = [m.weight.shape for m in engine.model.modules() if isinstance(m, nn.Linear)]  # [out, in]
    linear_weights = sum(out * inp for out, inp in linears)
    tokens = lengths + 2
    matmul_flops = 2 * linear_weights * tokens.sum()
    attention_flops = 4 * layers * dim * (tokens.astype(np.float64) ** 2).sum()
    widest = max(linears, key=lambda shape: shape[0] * shape[1])
    isolated = matmul_rate(budget, widest[1], widest[0])
    profiled_tokens = sum(min(len(residues[i]), cap) + 2 for batch in profiled for i in batch)
    scale = tokens.sum() / profiled_tokens  # kernels of the profiled batches, per timed run
    return {
        "model": name,
        "batches": len(timed),
        "tokens per batch": int(tokens.sum() / len(timed)),
        "residues/s": lengths.sum() / seconds,
        "of FLOP limit": (matmul_flops + attention_flops) / seconds / (dense_rate * 1e12),
        "busy of span": busy / span,
        "busy of wall": busy / 1e6 / profiled_seconds,
        "ms per batch": {kind: t / 1e3 * scale / len(timed) for kind, t in by_kind.items()},
        "matrix TFLOP/s": matmul_flops / (by_kind["matrix products"] / 1e6 * scale) / 1e12,
        "attention TFLOP/s": attention_flops / (by_kind["attention"] / 1e6 * scale) / 1e12,
        "isolated TFLOP/s": isolated,
        "widest": tuple(widest),
        "top kernels": sorted(by_name.items(), key=lambda item: -item[1])[:12],
        "kernel seconds": sum(by_kind.values()) / 1e6 * scale,
        "seconds": seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["esm2_t33_650M_UR50D", "esmc_600m"], choices=sorted(SHAPES))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--tokens-per-batch", type=int, default=None, help="default: the engine's, from free memory")
    parser.add_argument("--trace-dir", type=Path, default=None)
    args = parser.parse_args()
    dense_rate = matmul_rate(8192, 8192, 8192)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; float16 8192^3: {dense_rate:.0f} TFLOP/s")
    rows = []
    for name in args.models:
        rows.append(run_model(name, args, dense_rate))
        row = rows[-1]
        print(
            f"\n{name}: {row['residues/s']:,.0f} residues/s over {row['batches']} batches of "
            f"~{row['tokens per batch']:,} tokens ({row['seconds']:.2f} s), {100 * row['of FLOP limit']:.0f}% of the "
            f"FLOP limit; GPU busy {100 * row['busy of span']:.1f}% of the kernels' span, "
            f"{100 * row['busy of wall']:.1f}% of the wall clock"
        )
        total = sum(row["ms per batch"].values())
        print("| kind | ms per batch | share of kernel time |")
        print("|---|---:|---:|")
        for kind, _ in KINDS:
            if kind in row["ms per batch"]:
                ms = row["ms per batch"][kind]
                print(f"| {kind} | {ms:.1f} | {100 * ms / total:.1f}% |")
        print(f"| all | {total:.1f} | |")
        print(
            f"matrix products: {row['matrix TFLOP/s']:.0f} TFLOP/s in the forward; cuBLAS alone on "
            f"[{row['tokens per batch']}, {row['widest'][1]}] x [{row['widest'][1]}, {row['widest'][0]}]: "
            f"{row['isolated TFLOP/s']:.0f} TFLOP/s; attention {row['attention TFLOP/s']:.0f} TFLOP/s"
        )
        for kernel, microseconds in row["top kernels"]:
            print(f"  {microseconds / 1e3:9.1f} ms  {kernel[:150]}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
