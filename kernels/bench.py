"""Kernel benchmark on a GPU: our ``triton`` backend beside PyTorch's FlashAttention (``torch``
backend) and SDPA, measured side by side in one run.

    python -m distattn.kernels.bench [--seq-lens 1024 2048 ...] [--head-dims 64 128 192/128] [--dtype bf16] [--json F]

For each sequence length ``s``: a packed batch of ``--tokens`` tokens (default 32K), ``hidden /
head_dim`` heads (GQA off), three masks:

* ``causal`` / ``full``: ``tokens / s`` sequences of ``s`` tokens each;
* ``doc``: causal document masks, each length-``s`` sequence cut into documents of seeded
  log-uniform lengths between 64 and ``s`` (what packed pretraining batches look like).

A head dim ``192/128`` is Q/K's and V's (MLA: heads = hidden / V's head dim); K and V are then
views into one packed ``[T, H, Dqk + Dv]`` buffer, as the executors pass them. TFLOP/s of the
forward and of forward+backward (FLOPs: 2 * visible pairs * heads * (Dqk + Dv) forward, 2.5x that
backward; median of ``triton.testing.do_bench``). Our two backends run through
the plan path (a :class:`~distattn.kernels.Varlen` prepared once); SDPA (flash backend) runs on
the padded ``[b, h, s, d]`` layout and only for ``causal``/``full`` with one head dim; a backend
that refuses the shapes gets NaN. The last column is triton's fwd+bwd over the torch backend's. On
a machine without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from distattn.masks import mask_area

from . import prepare, varlen_bwd, varlen_fwd
from .varlen import Varlen

COLUMNS = ["head_dim", "seq_len", "mask", "triton_fwd", "torch_fwd", "sdpa_fwd", "triton_fwd_bwd", "torch_fwd_bwd",
           "sdpa_fwd_bwd", "triton_vs_torch"]


def _tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def doc_lens(seq_len: int, seed: int) -> list[int]:
    """Documents of log-uniform lengths in [64, seq_len] filling ``seq_len`` tokens."""
    rng = np.random.default_rng(seed)
    lens, left = [], seq_len
    while left > 0:
        n = int(min(left, np.exp(rng.uniform(np.log(64), np.log(seq_len)))))
        lens.append(n)
        left -= n
    return lens


def _time(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _ours(backend, q, k, v, dout, seg, flops):
    scale = q.shape[-1] ** -0.5
    try:
        prepare(seg, q.device, backend=backend)
        varlen_fwd(q, k, v, seg, scale=scale, backend=backend)
    except ValueError as exc:  # e.g. a backend without V's own head dim
        print(f"backend={backend!r} skipped: {exc}", flush=True)
        return float("nan"), float("nan")
    kw = dict(scale=scale, backend=backend)
    out, lse = varlen_fwd(q, k, v, seg, **kw)

    def both():
        o, l = varlen_fwd(q, k, v, seg, **kw)
        varlen_bwd(dout, q, k, v, o, l, seg, **kw)
    return _tflops(flops, _time(lambda: varlen_fwd(q, k, v, seg, **kw))), _tflops(3.5 * flops, _time(both))


def _sdpa(q, k, v, dout, batch, s, causal, flops):
    heads, d = q.shape[1:]
    qb, kb, vb = (t.view(batch, s, heads, d).transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    do_b = dout.view(batch, s, heads, d).transpose(1, 2)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        run = lambda: torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=causal)  # noqa: E731
        return _tflops(flops, _time(run)), _tflops(3.5 * flops, _time(lambda: run().backward(do_b)))


def head_dims(text: str) -> tuple[int, int]:
    """``"128"`` -> (128, 128); ``"192/128"`` -> (192, 128): Q/K's and V's head dim."""
    dims = [int(d) for d in text.split("/")]
    if len(dims) not in (1, 2) or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"head dims {text!r}: want D or DQK/DV")
    return dims[0], dims[-1]


def run(seq_lens, dims, dtype, tokens: int, hidden: int) -> list[dict]:
    rows = []
    for d, dv in dims:
        heads = hidden // dv
        for s in seq_lens:
            batch = max(1, tokens // s)
            for mask in ("causal", "full", "doc"):
                lens = [s] * batch if mask != "doc" else [n for b in range(batch) for n in doc_lens(s, b)]
                causal = mask != "full"
                area = int(mask_area(np.array(lens), np.array(lens), causal, None).sum())
                flops = 2 * area * heads * (d + dv)
                g = torch.Generator(device="cuda").manual_seed(0)
                q, kv, dout = (torch.randn(batch * s, heads, width, device="cuda", dtype=dtype, generator=g)
                               for width in (d, d + dv, dv))
                k, v = (kv[..., :d], kv[..., d:]) if d != dv else (kv[..., :d].contiguous(), kv[..., d:].contiguous())
                seg = Varlen.from_geometry(lens, lens, causal, None)
                row = {"head_dim": d if d == dv else f"{d}/{dv}", "seq_len": s, "mask": mask}
                row["triton_fwd"], row["triton_fwd_bwd"] = _ours("triton", q, k, v, dout, seg, flops)
                row["torch_fwd"], row["torch_fwd_bwd"] = _ours("torch", q, k, v, dout, seg, flops)
                row["sdpa_fwd"], row["sdpa_fwd_bwd"] = (_sdpa(q, k, v, dout, batch, s, causal, flops)
                                                        if mask != "doc" and d == dv else (float("nan"), float("nan")))
                row["triton_vs_torch"] = row["triton_fwd_bwd"] / row["torch_fwd_bwd"]
                rows.append(row)
                print("  ".join(f"{row[c]:>{len(c)}.2f}" if isinstance(row[c], float) else f"{row[c]!s:>{len(c)}}"
                                for c in COLUMNS), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--head-dims", type=head_dims, nargs="+", default=[(64, 64), (128, 128)],
                        help="e.g. 64 128 192/128 (Q/K's/V's head dim: MLA)")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per batch (batch = tokens / seq_len)")
    parser.add_argument("--hidden", type=int, default=2048, help="heads = hidden / head_dim")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("distattn kernel benchmark: no GPU on this machine, nothing to measure")
        return 0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print(f"distattn kernel benchmark on {torch.cuda.get_device_name()}: {args.dtype}, {args.tokens} tokens per "
          f"batch, {args.hidden} hidden, TFLOP/s (triton_vs_torch: fwd+bwd ratio)", flush=True)
    print("  ".join(COLUMNS), flush=True)
    rows = run(args.seq_lens, args.head_dims, dtype, args.tokens, args.hidden)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
