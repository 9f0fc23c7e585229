"""Many short documents on one rank: ``local_attention`` on N documents against the same tokens as
one document, side by side in one run (``backend="torch"``, CPU).

    python -m distattn.bench.many_documents                    # 1e5 documents of 20 tokens
    python -m distattn.bench.many_documents --docs 20000 --doc-len 50 --old-docs 5000

The one-document side is windowed (``window = doc_len - 1`` unless ``--window``): each query sees as
many keys as in its document, so both sides do the same arithmetic and the ratio is what the
documents' count costs. A full causal document of N * doc_len tokens would do N / 2 times more work.
With ``--old-docs M > 0`` it also times the per-document kernel path (what ran before short
documents were batched) against the batched one on the first M documents, through the kernel
functions directly. Times are fwd+bwd seconds, best of ``--repeats``; causal, fp32.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable


def _best(fn: Callable[[], None], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _local(q, k, v, lens, window) -> Callable[[], None]:
    import distattn

    def step():
        distattn.local_attention(q, k, v, lens, causal=True, window=window, backend="torch").sum().backward()
    return step


def _kernel(q, k, v, lens, per_document: bool) -> Callable[[], None]:
    from distattn.kernels import Varlen, torch_cpu
    seg = Varlen.from_geometry(lens, lens, True, None)
    scale = q.shape[-1] ** -0.5

    def step():
        out, lse = torch_cpu.torch_fwd(q, k, v, seg, scale, per_document=per_document)
        torch_cpu.torch_bwd(out, q, k, v, out, lse, seg, scale, per_document=per_document)
    return step


def run(docs: int, doc_len: int, heads: int, head_dim: int, window: int | None, old_docs: int,
        repeats: int) -> dict:
    """The timings as a dict (seconds); see the module docstring."""
    import torch
    if docs < 1 or doc_len < 1 or heads < 1 or head_dim < 1 or old_docs < 0 or repeats < 1:
        raise ValueError("--docs, --doc-len, --heads, --head-dim and --repeats must be >= 1, --old-docs >= 0")
    window = doc_len - 1 if window is None else window
    g = torch.Generator().manual_seed(0)
    tokens = docs * doc_len
    q, k, v = (torch.randn(tokens, heads, head_dim, generator=g).requires_grad_() for _ in range(3))
    res = {"docs": docs, "doc_len": doc_len, "tokens": tokens, "window": window}
    res["many_s"] = _best(_local(q, k, v, [doc_len] * docs, None), repeats)
    res["one_s"] = _best(_local(q, k, v, [tokens], window if window > 0 else None), repeats)
    res["ratio"] = res["many_s"] / res["one_s"]
    if old_docs:
        m = min(old_docs, docs) * doc_len
        small = [x.detach()[:m] for x in (q, k, v)]
        lens = [doc_len] * (m // doc_len)
        res["old_docs"] = len(lens)
        res["old_per_document_s"] = _best(_kernel(*small, lens, True), 1)
        res["old_batched_s"] = _best(_kernel(*small, lens, False), repeats)
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, default=100_000)
    p.add_argument("--doc-len", type=int, default=20)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--window", type=int, default=None, help="the one document's window (default doc_len - 1)")
    p.add_argument("--old-docs", type=int, default=10_000, help="documents for the per-document path (0: skip)")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args(argv)
    try:
        r = run(a.docs, a.doc_len, a.heads, a.head_dim, a.window, a.old_docs, a.repeats)
    except ValueError as e:
        p.error(str(e))
    print(f"{r['docs']} documents of {r['doc_len']} tokens ({r['tokens']} tokens), fwd+bwd, backend=torch, CPU")
    print(f"  {r['docs']:>8} documents         {r['many_s']:9.3f} s")
    print(f"  1 document, window {r['window']:<5} {r['one_s']:9.3f} s")
    print(f"  ratio                    {r['ratio']:9.2f}x")
    if "old_docs" in r:
        n = r["old_docs"]
        print(f"  {n} documents through the kernel: per-document {r['old_per_document_s']:.3f} s, "
              f"batched {r['old_batched_s']:.3f} s ({r['old_per_document_s'] / r['old_batched_s']:.1f}x faster)")


if __name__ == "__main__":
    main()
