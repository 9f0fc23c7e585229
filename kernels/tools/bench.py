"""Kernel benchmark on a GPU: TFLOP/s of the forward, the backward and forward+backward of our ``triton``
backend beside PyTorch's FlashAttention-2 (the ``torch`` backend), FlashAttention-3 (``fa3``: the
``flash_attn_3`` / hopper build's ``flash_attn_interface.flash_attn_varlen_func``, when it imports) and
SDPA (``sdpa``, flash backend), measured side by side in one run.

    python -m distattn.kernels.bench [--seq-lens 8192 32768 ...] [--masks causal doc] [--head-dims 64 128 192/128]
                                     [--backends triton torch fa3 sdpa] [--budget-s 150] [--json F]
                                     [--heads 1 4 32 [--heads-seq-lens 4096 32768] [--heads-head-dim 128]]

For each sequence length ``s``: a packed batch of ``max(--tokens, s)`` tokens (default 32K), ``hidden /
head_dim`` heads (GQA off), masks:

* ``causal`` / ``full``: ``tokens / s`` sequences of ``s`` tokens each;
* ``doc``: causal document masks, each length-``s`` sequence cut into documents of seeded
  log-uniform lengths between 64 and ``s`` (what packed pretraining batches look like).

**Heads per call** (``--heads``: the simulator's head term, :mod:`distattn.sim.kernel`): after those
cases, causal sequences at each ``--heads-seq-lens`` and head dim ``--heads-head-dim`` on each ``--heads``
query-head count, with ``max(1, H // 4)`` KV heads (Llama-3 8B's GQA group: 32 / 8) -- the share of
the heads a Ulysses or TP rank runs a call on (Llama-3 8B under Ulysses at CP 32: one head). Each head
count's batch holds ``max(--heads) / H`` times the sequences of the most heads' batch, so every call
of a length does the same work, as a Ulysses rank does (``1/U`` of the heads, ``U`` times the tokens):
their TFLOP/s compare the speed per FLOP. Their rows say ``heads_sweep``.

**CAD-shaped calls** (``--cad-shapes Q:K ...``): one causal segment of ``Q`` query rows against ``K``
keys (bottom-right aligned: a task of CAD's, or a CP rank's chunk at a document's end), Llama-3 8B's
32 query and 8 KV heads at ``--heads-head-dim``, forward and backward timed apart. Short-query tasks
run their backward as many key-block CTAs with short loops; the tile model (:mod:`distattn.costmodel.tiles`)
prices that, and ``--table`` writes every causal row in its table format (``q_len, k_len, heads,
segments, direction, backend, ms``) for ``distattn cluster kernel-fit TABLE --fit-on backend=NAME``.
Their rows say ``cad_shape``.

A head dim ``192/128`` is Q/K's and V's (MLA: heads = hidden / V's head dim); K and V are then
views into one packed ``[T, H, Dqk + Dv]`` buffer, as the executors pass them. FlashAttention-2 has
no Dv != Dqk (the ``torch`` backend would fall back to dense math): ``n/a``, as a backend that refuses
the shapes or is not installed.

Columns (one row per case and backend): ``fwd``, ``bwd`` and ``fwd_bwd`` TFLOP/s. FLOPs: ``F = 2 *
visible pairs * heads * (Dqk + Dv)`` forward, ``2.5 F`` backward (over the backward's time alone;
``F (3 Dqk + 2 Dv) / (Dqk + Dv)`` where V's head dim differs: 2.6 F at 192/128), ``3.5 F`` over
forward + backward. Our backends (the plan path: a :class:`~distattn.kernels.Varlen`
prepared once) time ``varlen_fwd`` and ``varlen_bwd`` apart; FA3 and SDPA run through autograd, so
their backward's time is forward+backward's minus the forward's. Forward+backward's time is the
forward's plus the backward's. Each time is the median of CUDA-event timed calls after one warm-up
call (compiling, autotuning): at least :data:`MIN_REPS`, at most :data:`MAX_REPS`, stopping once they
add up to ``--rep-budget-s`` -- at 128K a call takes a few hundred ms, so a few calls. Cases run
shortest first (the autotuner's keys do not hold the length, so it tunes on a short one); once the
whole run passes ``--budget-s`` the remaining cases are listed as skipped. On a machine without a GPU
it says so and exits 0.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time

import numpy as np
import torch

from distattn.costmodel.cost import BWD_FLOPS_FACTOR
from distattn.planning.masks import mask_area

from .. import prepare, varlen_bwd, varlen_fwd
from ..varlen import Varlen

BACKENDS = ("triton", "torch", "fa3", "sdpa")
MASKS = ("causal", "full", "doc")
MIN_REPS, MAX_REPS = 3, 30
COLUMNS = ["head_dim", "seq_len", "q_len", "segments", "mask", "heads", "kv_heads", "heads_sweep", "cad_shape",
           "backend", "fwd", "bwd", "fwd_bwd", "note"]
KV_GROUP = 4                # the head sweep's query heads per KV head (Llama-3 8B's 32 / 8)


def tflops(flops: float, ms: float | None) -> float | None:
    """TFLOP/s of ``flops`` done in ``ms`` milliseconds (None when there is no time)."""
    if ms is None or not ms > 0 or not math.isfinite(ms):
        return None
    return flops / (ms * 1e-3) / 1e12


def bwd_flops_factor(head_dim: int, head_dim_v: int) -> float:
    """The backward's FLOPs over the forward's: per visible pair the forward's two dots are ``Dqk + Dv``
    wide, the backward's five (S and dP recomputed, dV, dK, dQ) ``3 Dqk + 2 Dv``; 2.5
    (``distattn.costmodel.cost.BWD_FLOPS_FACTOR``) for one head dim, 2.6 for MLA's 192/128."""
    return (3 * head_dim + 2 * head_dim_v) / (head_dim + head_dim_v)


def rates(flops: float, fwd_ms: float | None, bwd_ms: float | None, bwd_factor: float = BWD_FLOPS_FACTOR) -> dict:
    """The three TFLOP/s columns of a forward of ``flops`` FLOPs timed ``fwd_ms`` and its backward ``bwd_ms``
    (``bwd_factor`` times the forward's FLOPs: :func:`bwd_flops_factor`)."""
    both = None if fwd_ms is None or bwd_ms is None else fwd_ms + bwd_ms
    return {"fwd": tflops(flops, fwd_ms), "bwd": tflops(bwd_factor * flops, bwd_ms),
            "fwd_bwd": tflops((1 + bwd_factor) * flops, both), "fwd_ms": fwd_ms, "bwd_ms": bwd_ms}


def doc_lens(seq_len: int, seed: int) -> list[int]:
    """Documents of log-uniform lengths in [64, seq_len] filling ``seq_len`` tokens."""
    rng = np.random.default_rng(seed)
    lens, left = [], seq_len
    while left > 0:
        n = int(min(left, np.exp(rng.uniform(np.log(64), np.log(seq_len)))))
        lens.append(n)
        left -= n
    return lens


def case_lens(seq_len: int, mask: str, tokens: int) -> list[int]:
    """The segments of one case: ``max(1, tokens // seq_len)`` sequences, cut into documents for ``doc``."""
    batch = max(1, tokens // seq_len)
    return [seq_len] * batch if mask != "doc" else [n for b in range(batch) for n in doc_lens(seq_len, b)]


def case_flops(lens, causal: bool, heads: int, d: int, dv: int) -> float:
    """Forward FLOPs of one case: ``2 * visible pairs * heads * (Dqk + Dv)``."""
    area = int(mask_area(np.array(lens), np.array(lens), causal, None).sum())
    return 2.0 * area * heads * (d + dv)


def enough(times_ms: list[float], budget_s: float) -> bool:
    """Whether the timed calls so far suffice: :data:`MAX_REPS` of them, or at least :data:`MIN_REPS`
    adding up to ``budget_s``."""
    return len(times_ms) >= MAX_REPS or (len(times_ms) >= MIN_REPS and sum(times_ms) >= budget_s * 1e3)


def time_ms(fn, budget_s: float, cuda: bool = True) -> float:
    """Median milliseconds of ``fn()``: one warm-up call, then timed calls (CUDA events; the wall clock
    for a CPU run) until :func:`enough`."""
    fn()
    times: list[float] = []
    while not enough(times, budget_s):
        if not cuda:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def head_dims(text: str) -> tuple[int, int]:
    """``"128"`` -> (128, 128); ``"192/128"`` -> (192, 128): Q/K's and V's head dim."""
    dims = [int(d) for d in text.split("/")]
    if len(dims) not in (1, 2) or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"head dims {text!r}: want D or DQK/DV")
    return dims[0], dims[-1]


@functools.lru_cache(maxsize=1)
def _fa3():
    """FlashAttention-3's varlen function, or None when no build of it imports."""
    for name in ("flash_attn_interface", "flash_attn_3.flash_attn_interface"):
        try:
            module = __import__(name, fromlist=["flash_attn_varlen_func"])
            return module.flash_attn_varlen_func
        except ImportError:
            continue
    return None


def _ours(backend, q, k, v, dout, seg, budget_s):
    scale = q.shape[-1] ** -0.5
    kw = dict(scale=scale, backend=backend)
    prepare(seg, q.device, backend=backend)
    out, lse = varlen_fwd(q, k, v, seg, **kw)
    cuda = q.is_cuda
    return (time_ms(lambda: varlen_fwd(q, k, v, seg, **kw), budget_s, cuda),
            time_ms(lambda: varlen_bwd(dout, q, k, v, out, lse, seg, **kw), budget_s, cuda))


def _autograd(run, inputs, dout, budget_s):
    """(forward ms, backward ms) of ``run(*inputs)`` through autograd: the backward's is
    forward+backward's minus the forward's."""
    cuda = inputs[0].is_cuda
    with torch.no_grad():
        fwd = time_ms(lambda: run(*inputs), budget_s, cuda)
    both = time_ms(lambda: torch.autograd.grad(run(*inputs), inputs, dout), budget_s, cuda)
    return fwd, max(both - fwd, 1e-6)


def _flash3(q, k, v, dout, lens, causal, budget_s, k_lens=None):
    fn = _fa3()
    k_lens = lens if k_lens is None else k_lens
    cu_q, cu_k = (torch.tensor(np.concatenate([[0], np.cumsum(n)]), dtype=torch.int32, device=q.device)
                  for n in (lens, k_lens))

    def run(q, k, v):
        res = fn(q, k, v, cu_q, cu_k, int(max(lens)), int(max(k_lens)), softmax_scale=q.shape[-1] ** -0.5,
                 causal=causal)
        return res[0] if isinstance(res, (tuple, list)) else res
    inputs = tuple(t.detach().requires_grad_() for t in (q, k, v))
    return _autograd(run, inputs, dout, budget_s)


def _sdpa(q, k, v, dout, batch, s, causal, budget_s):
    heads, d = q.shape[1:]
    inputs = tuple(t.reshape(batch, s, heads, -1).transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    do_b = dout.view(batch, s, heads, -1).transpose(1, 2)

    def run(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        return _autograd(run, inputs, do_b, budget_s)


def unsupported(backend: str, mask: str, d: int, dv: int, gqa: bool = False, short_q: bool = False) -> str | None:
    """Why ``backend`` has no number for this case (None: it runs); ``gqa``: fewer KV heads than query
    heads; ``short_q``: fewer query rows than keys (a CAD-shaped call)."""
    if backend == "torch" and d != dv:
        return "n/a: FlashAttention-2 has no Dv != Dqk"
    if backend == "sdpa" and (mask == "doc" or d != dv or gqa or short_q):
        return "n/a: SDPA's flash kernel takes no documents, nor Dv != Dqk, nor GQA, nor short queries here"
    if backend == "fa3" and _fa3() is None:
        return "n/a: FlashAttention-3 (flash_attn_interface) not installed"
    return None


def cases(seq_lens, masks, dims) -> list[tuple[int, int, int, str]]:
    """``(Dqk, Dv, seq_len, mask)`` in the order they run: per head dim, shortest length first."""
    return [(d, dv, s, mask) for d, dv in dims for s in sorted(seq_lens) for mask in masks]


def head_cases(seq_lens, heads, tokens: int) -> list[tuple[int, int, int, list[int]]]:
    """The head sweep's ``(seq_len, query heads, KV heads, sequences)`` in the order they run (module
    docstring): per length, shortest first, the most heads first; ``max(1, tokens // seq_len)``
    sequences on the most heads, ``max(heads) / H`` times as many (rounded down) on ``H``."""
    if not heads or min(heads) < 1:
        raise ValueError(f"--heads wants query head counts >= 1, got {list(heads)}")
    most = max(heads)
    return [(s, h, max(1, h // KV_GROUP), [s] * max(1, max(1, tokens // s) * most // h))
            for s in sorted(seq_lens) for h in sorted(set(heads), reverse=True)]


def cad_shape(text: str) -> tuple[int, int]:
    """``Q:K`` -> ``(Q, K)``: ``Q`` query rows against ``K`` keys, ``0 < Q <= K``."""
    q, _, k = text.partition(":")
    try:
        q, k = int(q), int(k)
    except ValueError:
        q = k = 0
    if not 0 < q <= k:
        raise argparse.ArgumentTypeError(f"--cad-shapes {text!r}: want Q:K with 0 < Q <= K, e.g. 1282:131072")
    return q, k


TABLE_COLUMNS = ("q_len", "k_len", "heads", "segments", "direction", "backend", "ms")


def table_rows(rows: list[dict]) -> list[dict]:
    """The causal rows with times as kernel-table rows (:func:`distattn.costmodel.tiles.read_table`): one per
    direction, each a call of ``segments`` equal segments of ``q_len`` rows against ``k_len`` keys."""
    out = []
    for r in rows:
        if r["mask"] != "causal" or r.get("segments") is None:
            continue
        for direction, key in (("forward", "fwd_ms"), ("backward", "bwd_ms")):
            if r.get(key):
                out.append({"q_len": r.get("q_len", r["seq_len"]), "k_len": r["seq_len"], "heads": r["heads"],
                            "segments": r["segments"], "direction": direction, "backend": r["backend"],
                            "ms": r[key]})
    return out


def write_table(rows: list[dict], path: str) -> None:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows(table_rows(rows))


def _line(row: dict) -> str:
    nums = "  ".join(f"{c} {row[c]:7.1f}" if row[c] is not None else f"{c}     n/a" for c in ("fwd", "bwd", "fwd_bwd"))
    shape = f"q {row['q_len']:>6} k {row['seq_len']:>6}" if row.get("cad_shape") else f"seq {row['seq_len']:>6}"
    return (f"hd {row['head_dim']:>7}  {shape}  {row['mask']:<6} heads {row['heads']:>3}/"
            f"{row['kv_heads']:<3} {row['backend']:<6} {nums}" + (f"  ({row['note']})" if row["note"] else ""))


def run(seq_lens, dims, dtype, tokens: int, hidden: int, masks=("causal", "full", "doc"), backends=BACKENDS,
        budget_s: float = float("inf"), rep_budget_s: float = 0.3, device: str = "cuda", heads=(),
        heads_seq_lens=(4096, 32768), heads_head_dim: int = 128, cad_shapes=()) -> list[dict]:
    """Every case and backend (module docstring) -> one row each, printed as it is measured (``device``:
    a CPU run only checks the bookkeeping); then, with ``heads``, the head sweep's, and with
    ``cad_shapes``, the CAD-shaped calls'."""
    todo = [(d, dv, s, mask, hidden // dv, hidden // dv, case_lens(s, mask, tokens), "")
            for d, dv, s, mask in cases(seq_lens, masks, dims)]
    if heads:
        todo += [(heads_head_dim, heads_head_dim, s, "causal", h, kv, lens, "heads")
                 for s, h, kv, lens in head_cases(heads_seq_lens, heads, tokens)]
    todo += [(heads_head_dim, heads_head_dim, k, "causal", 32, 32 // KV_GROUP, [q], "cad") for q, k in cad_shapes]
    rows, t0 = [], time.perf_counter()
    for d, dv, s, mask, hq, hkv, lens, kind in todo:
        causal = mask != "full"
        k_lens = [s] if kind == "cad" else lens   # a CAD-shaped call: its query rows against s keys
        flops = 2.0 * float(mask_area(np.array(lens), np.array(k_lens), causal, None).sum()) * hq * (d + dv)
        over = time.perf_counter() - t0 > budget_s
        g = torch.Generator(device=device).manual_seed(0)
        q, kv, dout = (torch.randn(n_rows, n, width, device=device, dtype=dtype, generator=g)
                       for n_rows, n, width in ((sum(lens), hq, d), (sum(k_lens), hkv, d + dv), (sum(lens), hq, dv))
                       ) if not over else (None, None, None)
        for backend in backends:
            row = {"head_dim": str(d) if d == dv else f"{d}/{dv}", "seq_len": s, "q_len": lens[0] if kind else s,
                   "segments": len(lens) if mask != "doc" else None, "mask": mask, "heads": hq, "kv_heads": hkv,
                   "heads_sweep": kind == "heads", "cad_shape": kind == "cad", "backend": backend,
                   **rates(flops, None, None),
                   "note": unsupported(backend, mask, d, dv, hkv != hq, kind == "cad") or ""}
            if over:
                row["note"] = f"skipped: the benchmark passed its {budget_s:.0f} s budget"
            elif not row["note"]:
                k, v = (kv[..., :d], kv[..., d:]) if d != dv else (kv[..., :d].contiguous(), kv[..., d:].contiguous())
                try:
                    if backend in ("triton", "torch"):
                        seg = Varlen.from_geometry(lens, k_lens, causal, None)
                        ms = _ours(backend, q, k, v, dout, seg, rep_budget_s)
                    elif backend == "fa3":
                        ms = _flash3(q, k, v, dout, lens, causal, rep_budget_s, k_lens)
                    else:
                        ms = _sdpa(q, k, v, dout, len(lens), s, causal, rep_budget_s)
                    row.update(rates(flops, *ms, bwd_factor=bwd_flops_factor(d, dv)))
                except (ValueError, RuntimeError, TypeError) as exc:   # a backend refusing the shapes
                    row["note"] = f"n/a: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
            rows.append(row)
            print(_line(row), flush=True)
        del q, kv, dout
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--head-dims", type=head_dims, nargs="+", default=[(64, 64), (128, 128)],
                        help="e.g. 64 128 192/128 (Q/K's/V's head dim: MLA)")
    parser.add_argument("--masks", nargs="+", choices=MASKS, default=list(MASKS))
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per batch (batch = tokens / seq_len, >= 1)")
    parser.add_argument("--hidden", type=int, default=2048, help="heads = hidden / V's head dim")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="skip the cases left once the run has taken this long")
    parser.add_argument("--rep-budget-s", type=float, default=0.3,
                        help="timed calls per measurement: stop once they add up to this (3..30 calls)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--heads", type=int, nargs="+", default=[],
                        help="query heads per call to sweep (e.g. 1 4 32; KV heads H // 4): equal work per call")
    parser.add_argument("--heads-seq-lens", type=int, nargs="+", default=[4096, 32768],
                        help="the head sweep's tokens per sequence (causal)")
    parser.add_argument("--heads-head-dim", type=int, default=128, help="the head sweep's head dim")
    parser.add_argument("--cad-shapes", type=cad_shape, nargs="+", default=[], metavar="Q:K",
                        help="CAD-shaped calls: Q query rows against K keys, causal, 32/8 heads (e.g. 1282:131072)")
    parser.add_argument("--table", default=None, metavar="CSV",
                        help="also write every causal row as a kernel table (distattn cluster kernel-fit TABLE)")
    args = parser.parse_args(argv)
    if args.heads and min(args.heads) < 1:
        parser.error(f"--heads wants query head counts >= 1, got {args.heads}")
    if not torch.cuda.is_available():
        print("distattn kernel benchmark: no GPU on this machine, nothing to measure")
        return 0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print(f"distattn kernel benchmark on {torch.cuda.get_device_name()}: {args.dtype}, {args.tokens} tokens per "
          f"batch, {args.hidden} hidden, TFLOP/s (bwd: 2.5x the forward's FLOPs over the backward's time; "
          f"fwd_bwd: 3.5x over both)", flush=True)
    rows = run(args.seq_lens, args.head_dims, dtype, args.tokens, args.hidden, args.masks, args.backends,
               args.budget_s, args.rep_budget_s, heads=args.heads, heads_seq_lens=args.heads_seq_lens,
               heads_head_dim=args.heads_head_dim, cad_shapes=args.cad_shapes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.table:
        write_table(rows, args.table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
