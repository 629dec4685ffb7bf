"""Two parts of a packed layer alone, on one GPU, at 650M and 3B widths (forward only).

    python bench/packed_micro.py --choice choice.json

1. q/k rotary: inductor's fused code (compiled attention_inputs) against the compiled projection
   plus the Triton kernel of rotary_kernel.py; error of each against the float32 rotation of the
   same projection.
2. attention on the packed stream: FlashAttention-2 (varlen_attn) against cuDNN
   (aten._cudnn_attention_forward with cumulative sequence lengths); error of each against
   float32 math attention on a few sequences.
Prints JSON lines; --choice writes the faster correct option of each as bench flags.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow" / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from esmshard import packed  # noqa: E402
from packed_variants import lengths_for, timed  # noqa: E402


def emit(record):
    print(json.dumps(record), flush=True)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--choice", help="write the chosen flags here (JSON)")
    args = parser.parse_args()
    lengths = lengths_for(args.tokens, np.random.default_rng(args.tokens))
    sizes = np.array(lengths) + 2
    cu = torch.tensor(np.concatenate([[0], np.cumsum(sizes)]), dtype=torch.int32, device="cuda")
    T, max_len = int(sizes.sum()), int(sizes.max())
    positions = torch.tensor(np.concatenate([np.arange(n) for n in sizes]), device="cuda")
    angles = positions.float()[:, None] * (1.0 / 10000 ** (torch.arange(0, 64, 2, device="cuda").float() / 64))[None]
    angles = torch.cat([angles, angles], -1)
    cos, sin = angles.cos(), angles.sin()
    rotary_ok, rotary_gain, cudnn_ok, cudnn_gain = True, [], True, []
    for D, H in [(1280, 20), (2560, 40)]:
        torch.manual_seed(D)
        x = torch.randn(T, D, device="cuda")
        nw, nb = 1 + 0.1 * torch.randn(D, device="cuda"), 0.1 * torch.randn(D, device="cuda")
        w = (torch.randn(3 * D, D, device="cuda") / D**0.5).bfloat16()
        b = (0.1 * torch.randn(3 * D, device="cuda")).bfloat16()
        fused = torch.compile(packed.attention_inputs, dynamic=True)  # inductor defaults: quick to compile
        projection = torch.compile(packed.qkv_projection, dynamic=True)
        from esmshard.rotary_kernel import rotate_qk

        def kernel_path():
            qkv = projection(x, nw, nb, w, b)
            q, k = rotate_qk(qkv, cos, sin, H)
            return q, k, qkv.view(T, 3, H, -1)[:, 2]

        q0, k0, v0 = fused(x, cos, sin, nw, nb, w, b, H)
        q1, k1, v1 = kernel_path()
        qkv = projection(x, nw, nb, w, b).view(T, 3, H, -1)
        exact_q = packed._rotate(qkv[:, 0].float(), cos, sin)  # float32 rotation, no rounding
        exact_k = packed._rotate(qkv[:, 1].float(), cos, sin)
        record = {"part": "rotary", "D": D, "T": T,
                  "fused_rel_err": max(rel(q0, exact_q), rel(k0, exact_k)),
                  "kernel_rel_err": max(rel(q1, exact_q), rel(k1, exact_k)),
                  "kernel_vs_fused_max_abs": float(max((q1.float() - q0.float()).abs().max(),
                                                       (k1.float() - k0.float()).abs().max())),
                  "v_equal": bool(torch.equal(v0, v1))}
        qkv2 = qkv.view(T, 3 * D)
        t_fused = timed(lambda: fused(x, cos, sin, nw, nb, w, b, H), args.reps)
        t_kernel = timed(kernel_path, args.reps)
        t_proj = timed(lambda: projection(x, nw, nb, w, b), args.reps)
        t_rot = timed(lambda: rotate_qk(qkv2, cos, sin, H), args.reps)
        record.update({"fused_ms": t_fused * 1e3, "kernel_path_ms": t_kernel * 1e3, "projection_ms": t_proj * 1e3,
                       "rotary_kernel_ms": t_rot * 1e3,
                       "rotary_kernel_TBps": (4 * T * D * 2 + 2 * T * 64 * 4) / t_rot / 1e12})
        emit(record)
        # v: the same product, rounded once either way (inductor may add the bias outside cuBLAS)
        record["v_max_abs"] = float((v0.float() - v1.float()).abs().max())
        ok = record["kernel_rel_err"] <= 1.05 * record["fused_rel_err"] + 1e-6
        rotary_ok &= ok
        rotary_gain.append(t_fused / t_kernel)

        # attention on the real layout: q, k contiguous, v a strided view of the projection
        q, k, v = q1, k1, v1
        flash = lambda: packed.attention(q, k, v, cu, max_len)  # noqa: E731
        packed.ATTENTION = "flash"
        out_flash = flash()
        t_flash = timed(flash, args.reps)
        record = {"part": "attention", "D": D, "H": H, "T": T, "flash_ms": t_flash * 1e3}
        pick = np.linspace(0, len(lengths) - 1, 8).astype(int)
        bounds = cu.tolist()
        ref = []
        for i in pick:
            s, e = bounds[i], bounds[i + 1]
            qs, ks, vs = (t_[s:e].transpose(0, 1).float() for t_ in (q, k, v))
            ref.append((s, e, F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1)))

        def err(out):
            return max(rel(out[s:e], r) for s, e, r in ref)

        record["flash_rel_err"] = err(out_flash)
        try:
            packed.ATTENTION = "cudnn"
            out_cudnn = packed.attention(q, k, v, cu, max_len)
            torch.cuda.synchronize()
            record["cudnn_rel_err"] = err(out_cudnn)
            record["cudnn_vs_flash_rel"] = rel(out_cudnn, out_flash)
            record["cudnn_ms"] = timed(lambda: packed.attention(q, k, v, cu, max_len), args.reps) * 1e3
            cudnn_ok &= record["cudnn_rel_err"] <= 1.5 * record["flash_rel_err"] and torch.isfinite(out_cudnn).all().item()
            cudnn_gain.append(record["flash_ms"] / record["cudnn_ms"])
        except Exception as error:  # not supported on this build
            record["cudnn_error"] = " ".join(str(error).split())[:300]
            cudnn_ok = False
        finally:
            packed.ATTENTION = "flash"
        emit(record)
        del x, w, b, q0, k0, v0, q1, k1, v1, qkv, qkv2, exact_q, exact_k, q, k, v
        torch.cuda.empty_cache()
    choice = {"rotary_kernel": bool(rotary_ok and min(rotary_gain) > 1.02),
              "attention": "cudnn" if cudnn_ok and cudnn_gain and min(cudnn_gain) > 1.03 else "flash"}
    emit({"choice": choice, "rotary_gain": rotary_gain, "cudnn_gain": cudnn_gain})
    if args.choice:
        flags = ["--rotary-kernel", str(int(choice["rotary_kernel"])), "--attention", choice["attention"]]
        Path(args.choice).write_text(" ".join(flags))


if __name__ == "__main__":
    main()
