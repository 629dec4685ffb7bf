"""Forward-only timings of packed-engine variants on one GPU: one variant per process.

    python bench/packed_variants.py --model esm2_t33_650M_UR50D --options '{"max_autotune": true}' \
        --tokens 32768 131072 --profile --gemm

RANDOM weights of the real shape (or --checkpoint: a fair-esm file read by esmshard's loader,
to time the rank's start-up). Prints one JSON line per measurement:
  start-up: model load (checkpoint to CPU network), engine build (weights to the GPU), and the
            first batch, which holds the torch.compile time (cold or warm: run twice with one
            TORCHINDUCTOR_CACHE_DIR to see what the cache saves);
  numerics: pooled means against fair-esm fp32 (per sequence, as bench/engine_speed.py);
  speed:    the engine's pooled forward on packed batches of --tokens tokens drawn from
            engine_speed's length distribution, timed with CUDA events (median of --reps);
  --gemm:   the layer's four matrix products alone at M = --gemm-tokens (TFLOP/s);
  --profile: GPU kernel time of one forward by kind (torch.profiler).
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow" / "scripts"))
from esmshard import packed  # noqa: E402
from esmshard.architectures import ESM2_MODELS, MAX_RESIDUES  # noqa: E402
from esmshard.engine import PackedEngine  # noqa: E402

DEVICE = "cuda"
AMINO = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", np.uint8)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def residues_of(lengths, rng):
    return [AMINO[rng.integers(0, 20, n)] for n in lengths]


def lengths_for(tokens: int, rng, median: int = 300) -> list[int]:
    """engine_speed.py's log-normal lengths, drawn until the packed stream holds ``tokens``."""
    out, used = [], 0
    while True:
        n = int(np.clip(rng.lognormal(np.log(median), 0.6), 20, MAX_RESIDUES))
        if used + n + 2 > tokens:
            return out
        out.append(n)
        used += n + 2


def timed(fn, reps: int) -> float:
    """Median seconds of fn() over reps, with CUDA events, after one warm-up."""
    fn()
    if DEVICE == "cpu":  # smoke tests only
        started = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - started) / reps
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return float(np.median(times))


def reference_means(network, alphabet, residues, layer):
    converter = alphabet.get_batch_converter(MAX_RESIDUES)
    means = []
    with torch.no_grad():
        for r in residues:
            s = r.tobytes().decode()
            _, _, toks = converter([("x", s)])
            out = network(toks.to(DEVICE), repr_layers=[layer])["representations"][layer]
            means.append(out[0, 1 : len(s) + 1].float().mean(0).cpu().numpy())
    return np.stack(means)


def gemm_rates(dim: int, m: int, reps: int) -> None:
    torch.manual_seed(1)
    for name, n, k in [("qkv", 3 * dim, dim), ("out_proj", dim, dim), ("fc1", 4 * dim, dim), ("fc2", dim, 4 * dim)]:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        flops = 2 * m * n * k
        t_mm = timed(lambda: a @ w.t(), reps)
        t_lin = timed(lambda: F.linear(a, w, b), reps)
        emit({"gemm": name, "M": m, "N": n, "K": k, "mm_tflops": flops / t_mm / 1e12, "linear_bias_tflops": flops / t_lin / 1e12,
              "mm_ms": t_mm * 1e3})
        del a, w, b
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    emit({"gemm": "8192^3", "mm_tflops": 2 * 8192**3 / timed(lambda: a @ a, reps) / 1e12})
    a = torch.randn(2**28, device="cuda")
    emit({"copy_TBps": 2 * a.numel() * 4 / timed(lambda: a.clone(), reps) / 1e12})
    del a
    torch.cuda.empty_cache()


def profile(engine, batch, layers: int) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    engine.pooled(batch)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.pooled(batch)
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    kernels: dict[str, list] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name, us = event.name, event.time_range.elapsed_us()
        kernels.setdefault(name, [0.0, 0])
        kernels[name][0] += us
        kernels[name][1] += 1
        if re.search(r"gemm|nvjet|xmma|cutlass|sm90_|triton_tem|_mm_|Gemm", name):
            kind = "gemm"
        elif re.search(r"flash|fmha|attention", name, re.I):
            kind = "attention"
        elif name.startswith("triton_"):
            kind = "triton pointwise/reduction"
        elif "Memcpy" in name or "Memset" in name:
            kind = "memcpy/memset"
        else:
            kind = "other"
        kinds[kind] = kinds.get(kind, 0.0) + us
    total = sum(kinds.values())
    tokens = len(batch.tokens)
    emit({"profile_total_ms": total / 1e3, "tokens": tokens,
          "ns_per_token_layer": {k: 1e3 * v / tokens / layers for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}})
    for name, (us, count) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:16]:
        emit({"kernel": name[:110], "ms": round(us / 1e3, 2), "count": count, "share": round(us / total, 3)})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="esm2_t33_650M_UR50D")
    parser.add_argument("--checkpoint", help="load this fair-esm checkpoint with esmshard's loader (times the load)")
    parser.add_argument("--write-checkpoint", help="first write a random checkpoint of --model's shape here")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--options", default=json.dumps(packed.COMPILE_OPTIONS), help="torch.compile inductor options, JSON")
    parser.add_argument("--label", default="")
    parser.add_argument("--tokens", type=int, nargs="*", default=[131072])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--check", type=int, default=48, help="sequences compared with fair-esm fp32")
    parser.add_argument("--gemm", action="store_true")
    parser.add_argument("--gemm-tokens", type=int, default=131072)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    parser.add_argument("--rotary-kernel", type=int, choices=[0, 1], default=int(packed.ROTARY_KERNEL))
    parser.add_argument("--attention", choices=["flash", "cudnn"], default=packed.ATTENTION)
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    options = json.loads(args.options)
    packed.ATTENTION = args.attention
    label = args.label or ("eager" if args.eager else args.options)
    base = {"model": args.model, "variant": label, "rotary_kernel": args.rotary_kernel, "attention": args.attention}

    layers, dim, heads = ESM2_MODELS[args.model]
    if args.write_checkpoint:
        from esmshard.model import write_random_checkpoint

        started = time.perf_counter()
        write_random_checkpoint(args.write_checkpoint, layers, dim, heads)
        emit({**base, "wrote_checkpoint_s": time.perf_counter() - started})
        args.checkpoint = args.write_checkpoint
    if DEVICE == "cuda":
        torch.cuda.init()
    started = time.perf_counter()
    if args.checkpoint:
        from esmshard.model import load_model

        network, alphabet = load_model(args.checkpoint)
    else:
        import esm

        torch.manual_seed(0)
        with torch.device(DEVICE):
            network = esm.ESM2(num_layers=layers, embed_dim=dim, attention_heads=heads, token_dropout=True).eval()
        alphabet = network.alphabet
    loaded = time.perf_counter() - started
    engine = PackedEngine(network, alphabet, DEVICE, "bfloat16" if DEVICE == "cuda" else "float32", -1, compile=False)
    if not args.eager:
        engine.model.steps = packed.compiled_steps(options, rotary_kernel=bool(args.rotary_kernel))
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    built = time.perf_counter() - started - loaded

    rng = np.random.default_rng(0)
    check_lengths = sorted(lengths_for(10**9, rng)[:2000])
    check_lengths = [check_lengths[i] for i in np.linspace(0, len(check_lengths) - 1, args.check).astype(int)]
    check = residues_of(check_lengths, rng)
    started = time.perf_counter()
    vectors = engine.embed(check)  # the first batch: compiles
    first = time.perf_counter() - started
    started = time.perf_counter()
    engine.embed(check)
    second = time.perf_counter() - started
    emit({**base, "load_s": loaded, "engine_build_s": built, "first_batch_s": first, "second_batch_s": second,
          "compile_s_est": first - second})

    network = network.to(DEVICE).float().eval()
    reference = reference_means(network, alphabet, check, layers)
    cosine = (vectors * reference).sum(1) / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1))
    rel_l2 = np.linalg.norm(vectors - reference, axis=1) / np.linalg.norm(reference, axis=1)
    emit({**base, "cos_min": float(cosine.min()), "rel_l2_max": float(rel_l2.max())})
    del network
    if DEVICE == "cuda":
        torch.cuda.empty_cache()

    for tokens in args.tokens:
        lengths = lengths_for(tokens, np.random.default_rng(tokens))
        batch = engine.tokenizer.pack(residues_of(lengths, np.random.default_rng(1)), pin=DEVICE == "cuda").to(DEVICE)
        seconds = timed(lambda: engine.pooled(batch), args.reps)
        t = len(batch.tokens)
        emit({**base, "tokens": t, "seqs": len(lengths), "ms": seconds * 1e3, "residues_per_s": sum(lengths) / seconds,
              "ns_per_token_layer": seconds / t / layers * 1e9})
    if args.profile:
        lengths = lengths_for(131072, np.random.default_rng(131072))
        profile(engine, engine.tokenizer.pack(residues_of(lengths, np.random.default_rng(1)), pin=True).to("cuda"),
                layers)
    if args.gemm:
        del engine
        torch.cuda.empty_cache()
        gemm_rates(dim, args.gemm_tokens, args.reps)


if __name__ == "__main__":
    main()
