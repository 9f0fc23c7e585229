"""Kernel benchmark: our triton backend beside PyTorch SDPA (and flash-attn when installed).

    python -m distattn.kernels.bench [--seq-lens 1024 2048 ...] [--head-dims 64 128] [--dtype bf16]

For each sequence length, a batch of equal sequences totalling ``--tokens``
(default 32K) tokens, ``hidden / head_dim`` heads: TFLOP/s of forward,
backward and forward+backward (FLOPs: 4 * visible pairs * heads * head_dim
forward, 2.5x that backward), causal and not, measured in one run. SDPA runs
on the padded ``[b, h, s, d]`` layout with its flash backend; our kernel on
the packed varlen layout. On a machine without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse

import torch


def _tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def run(seq_lens, head_dims, dtype, tokens: int, hidden: int) -> list[dict]:
    import triton.testing

    from distattn.kernels import attn_bwd, attn_fwd
    from distattn.masks import cu_seqlens

    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        flash_attn_varlen_func = None
    rows = []
    for d in head_dims:
        heads = hidden // d
        for s in seq_lens:
            batch = max(1, tokens // s)
            for causal in (False, True):
                area = batch * (s * (s + 1) // 2 if causal else s * s)
                fwd_flops = 4 * area * heads * d
                q, k, v, dout = (torch.randn(batch * s, heads, d, device="cuda", dtype=dtype) for _ in range(4))
                cu = cu_seqlens([s] * batch, "cuda")
                out, lse = attn_fwd(q, k, v, cu, cu, causal=causal, backend="triton")
                ours_fwd = triton.testing.do_bench(lambda: attn_fwd(q, k, v, cu, cu, causal=causal, backend="triton"))
                ours_bwd = triton.testing.do_bench(
                    lambda: attn_bwd(dout, q, k, v, out, lse, cu, cu, causal=causal, backend="triton"))
                row = {"head_dim": d, "seq_len": s, "causal": causal,
                       "ours_fwd": _tflops(fwd_flops, ours_fwd), "ours_bwd": _tflops(2.5 * fwd_flops, ours_bwd),
                       "ours_fwd_bwd": _tflops(3.5 * fwd_flops, ours_fwd + ours_bwd)}
                qb, kb, vb = (t.view(batch, s, heads, d).transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
                with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=causal)  # noqa
                    o = sdpa()
                    do_b = dout.view(batch, s, heads, d).transpose(1, 2)
                    sdpa_fwd = triton.testing.do_bench(sdpa)
                    sdpa_total = triton.testing.do_bench(lambda: sdpa().backward(do_b))
                del o
                row.update(sdpa_fwd=_tflops(fwd_flops, sdpa_fwd), sdpa_fwd_bwd=_tflops(3.5 * fwd_flops, sdpa_total))
                if flash_attn_varlen_func is not None:
                    qf, kf, vf = (t.detach().requires_grad_() for t in (q, k, v))
                    fa = lambda: flash_attn_varlen_func(qf, kf, vf, cu, cu, s, s, causal=causal)  # noqa: E731
                    row["fa_fwd"] = _tflops(fwd_flops, triton.testing.do_bench(fa))
                    row["fa_fwd_bwd"] = _tflops(3.5 * fwd_flops, triton.testing.do_bench(lambda: fa().backward(dout)))
                rows.append(row)
                print("  ".join(f"{key}={val:.1f}" if isinstance(val, float) else f"{key}={val}"
                                for key, val in row.items()), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per batch (batch = tokens / seq_len)")
    parser.add_argument("--hidden", type=int, default=2048, help="heads = hidden / head_dim")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("distattn kernel benchmark: no GPU on this machine, nothing to measure")
        return 0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print(f"distattn kernel benchmark on {torch.cuda.get_device_name()}: {args.dtype}, {args.tokens} tokens per batch, "
          f"TFLOP/s", flush=True)
    run(args.seq_lens, args.head_dims, dtype, args.tokens, args.hidden)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
