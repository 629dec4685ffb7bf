"""Variable-length attention kernels on the packed batches a rank runs, side by side on one GPU.

    python bench/attention_kernels.py
    python bench/attention_kernels.py --models esm2_t33_650M_UR50D esmc_600m esm2_t36_3B_UR50D --tokens 131072

For each model shape (its heads and head width): --batches packed batches of up to --tokens
tokens (log-normal lengths, median 300, at most 1024 with BOS and EOS, as the synthetic inputs of
the other benches), q and k contiguous [T, H, d] (as the rotary kernels write them) and v a view
of the fused q/k/v projection's output (token stride 3D), float16. Each kernel runs every batch:
its first call on a batch (where a kernel builds a plan per shape, that time is in it) and its
steady time (CUDA events, the mean of --repeats calls), attention's rate (4 * sum(L^2) * H * d
FLOPs per call), and its largest difference from FlashAttention-2's output and from float32
attention on a few sequences. Kernels:
  - flash: FlashAttention-2's variable-length kernel (aten._flash_attention_forward), what
    packed.attention runs today;
  - cudnn: cuDNN's fused attention on ragged tensors (aten._cudnn_attention_forward with
    cumulative sequence lengths);
  - cudnn_contiguous_v: the same with v copied to a contiguous [T, H, d] first (the copy timed);
  - efficient: the memory-efficient kernel's variable-length form (aten._efficient_attention_forward).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow" / "scripts"))
from esmshard.architectures import RELEASED_SHAPES  # noqa: E402

MAX_TOKENS_PER_SEQUENCE = 1024


def packed_lengths(tokens: int, batches: int, seed: int) -> list[list[int]]:
    """``batches`` lists of sequence lengths (tokens with BOS and EOS), each summing to <= tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batches):
        lengths, total = [], 0
        while True:
            length = int(min(MAX_TOKENS_PER_SEQUENCE, max(8, rng.lognormal(np.log(300), 0.6) + 2)))
            if total + length > tokens:
                break
            lengths.append(length)
            total += length
        out.append(lengths)
    return out


def inputs(lengths: list[int], heads: int, head_dim: int, device):
    T, D = sum(lengths), heads * head_dim
    qkv = torch.randn(T, 3 * D, device=device, dtype=torch.float16)
    q = qkv[:, :D].reshape(T, heads, head_dim).contiguous()
    k = qkv[:, D : 2 * D].reshape(T, heads, head_dim).contiguous()
    v = qkv[:, 2 * D :].view(T, heads, head_dim)  # token stride 3D, as packed.py hands it
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=device)
    return q, k, v, cu, max(lengths)


def flash(q, k, v, cu, max_len):
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, 0.0, False, False)[0]


def cudnn(q, k, v, cu, max_len):
    return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, max_len, max_len, False, 0.0, False)[0]


def cudnn_contiguous_v(q, k, v, cu, max_len):
    return cudnn(q, k, v.contiguous(), cu, max_len)


def efficient(q, k, v, cu, max_len):
    out = torch.ops.aten._efficient_attention_forward(
        q[None], k[None], v[None], None, cu, cu, max_len, max_len, 0.0, 0, False
    )[0]
    return out[0]


KERNELS = {"flash": flash, "cudnn": cudnn, "cudnn_contiguous_v": cudnn_contiguous_v, "efficient": efficient}


def reference(q, k, v, cu, sequences: int) -> list[torch.Tensor]:
    """float32 attention of the first ``sequences`` sequences, one at a time: [L, H, d] each."""
    bounds = cu.tolist()
    out = []
    for start, end in list(zip(bounds[:-1], bounds[1:]))[:sequences]:
        q_, k_, v_ = (t[start:end].float().transpose(0, 1) for t in (q, k, v))
        out.append(F.scaled_dot_product_attention(q_, k_, v_).transpose(0, 1))
    return out


def timed(kernel, args, repeats: int) -> tuple[float, float]:
    """(first call's seconds, steady seconds per call)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    kernel(*args)
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        kernel(*args)
    end.record()
    end.synchronize()
    return first, start.elapsed_time(end) / 1000 / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["esm2_t33_650M_UR50D", "esmc_600m", "esm2_t36_3B_UR50D"])
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print(
        "| model | heads x width | kernel | first call (ms, mean / max) | steady (ms per call) | TFLOP/s "
        "| max abs diff from flash | from float32 |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        _, dim, heads = RELEASED_SHAPES[name]
        head_dim = dim // heads
        batches = [inputs(lengths, heads, head_dim, device) for lengths in packed_lengths(args.tokens, args.batches, 0)]
        flops = sum(
            4 * float(((cu[1:] - cu[:-1]).double() ** 2).sum()) * heads * head_dim for _, _, _, cu, _ in batches
        )
        references = [reference(*batch[:4], sequences=4) for batch in batches[:2]]
        flash_out = [flash(*batch) for batch in batches]
        for kernel_name in args.kernels:
            kernel = KERNELS[kernel_name]
            try:
                times = [timed(kernel, batch, args.repeats) for batch in batches]
            except RuntimeError as error:
                print(
                    f"| {name} | {heads} x {head_dim} | {kernel_name} | fails: {str(error).splitlines()[0][:120]} "
                    "| | | | |"
                )
                continue
            firsts = [first for first, _ in times]
            steady = sum(s for _, s in times)
            outs = [kernel(*batch) for batch in batches]
            from_flash = max(float((o.float() - f.float()).abs().max()) for o, f in zip(outs, flash_out))
            from_fp32 = 0.0
            for batch, out, refs in zip(batches, outs, references):
                bounds = batch[3].tolist()
                for i, ref in enumerate(refs):
                    from_fp32 = max(from_fp32, float((out[bounds[i] : bounds[i + 1]].float() - ref).abs().max()))
            first = f"{1000 * np.mean(firsts):.2f} / {1000 * max(firsts):.2f}"
            print(
                f"| {name} | {heads} x {head_dim} | {kernel_name} | {first} | {1000 * steady / len(batches):.2f} "
                f"| {flops / steady / 1e12:.0f} | {from_flash:.2e} | {from_fp32:.2e} |"
            )


if __name__ == "__main__":
    main()
