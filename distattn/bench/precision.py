"""Precision drift: does the bf16 / fp32 error of context-parallel attention grow with the CP degree?

    python -m distattn.bench.precision                           # the default tables (~20 min, ~15 GB)
    python -m distattn.bench.precision --tokens 2048 --world-sizes 1 8 64 --schedulers ring cad --dtypes bf16
    python -m distattn.bench.precision --comm-dtype fp8 --out precision.csv   # the table with FP8 transfers

One packed sequence of real documents (sampled from ``../shared/data/doclens/prolong.json`` when it
exists, documents over 64K upsampled x4; else the log-normal stand-in), causal, GQA 32 query / 8 KV
heads of 128, attention sinks on, once without and once with a sliding window (``--window``, default
tokens / 8). Every scheduler runs forward and backward on virtual ranks (:mod:`distattn.distributed.virtual`,
every world size, 1 included, ``backend="auto"``) and is compared with the fp64 oracle
(:func:`distattn.reference_attention`, computed once per case and shared by every run).

Metric: relative RMS error ``||x - ref|| / ||ref||`` over the whole tensor (out, dq, dk, dv: the
ranks' squared sums added up; dsinks: the ranks' shares summed first). The inputs are rounded to
bf16 once, so the bf16 and fp32 runs and the oracle see the same values: an error measures the
computation alone. ``ratio`` = error at the largest CP / error at CP 1; the goal is <= 1.2.

``ring (naive bf16 merge)`` is a foil computed here in one process with the local kernels: the ring
over P contiguous blocks, but every running sum (out and lse across steps; dq, dK and dV across
steps) kept in the input dtype instead of fp32, as ring implementations that merge in bf16 do.

Default: 4096 tokens, CP 1-64, about 20 minutes on a shared 2-core machine; the memory peak (~15 GB)
is ``allgather`` at CP 64, where each of 64 virtual ranks holds the whole K/V and its gradient.

By default a second table follows: at CP 8, bf16, causal, every scheduler's error with transfers
in their own dtype vs ``comm_dtype="fp8"``, and the bytes each plan sent (all ranks, fwd + bwd).
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..planning.doclens import load_doc_lens, pack, upsample_long
from ..kernels import available_backends
from ..schedulers import NAMES, PlanContext, spec

TENSORS = ("out", "dq", "dk", "dv", "dsinks")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
WORLD_SIZES = (1, 2, 4, 8, 16, 32, 64)
NAIVE = "ring (naive bf16 merge)"
DOCLENS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "doclens" / "prolong.json"
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
GOAL = 1.2


@dataclass(frozen=True)
class Case:
    """One mask over the shared inputs: its documents, window and fp64 oracle."""

    name: str
    docs: tuple[int, ...]
    window: int | None
    ref: dict   # TENSORS -> fp64 reference


@dataclass(frozen=True)
class Inputs:
    """q, k, v, dout [S, H, D] and sinks [Hq]: fp64 tensors holding bf16-representable values."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    sinks: torch.Tensor


def make_inputs(tokens: int, heads: int, kv_heads: int, head_dim: int, seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(torch.bfloat16).double()
    return Inputs(draw(tokens, heads, head_dim), draw(tokens, kv_heads, head_dim), draw(tokens, kv_heads, head_dim),
                  draw(tokens, heads, head_dim), draw(heads))


def oracle(inputs: Inputs, docs: tuple[int, ...], window: int | None) -> dict:
    """fp64 out, dq, dk, dv, dsinks of the whole sequence, one query head at a time: the dense
    per-document score matrix of all heads at once would not fit in memory at long documents."""
    from ..runtime.oracle import reference_attention

    heads, kv_heads = inputs.q.shape[1], inputs.k.shape[1]
    ref = {"out": torch.empty_like(inputs.q), "dq": torch.empty_like(inputs.q), "dk": torch.zeros_like(inputs.k),
           "dv": torch.zeros_like(inputs.v), "dsinks": torch.empty_like(inputs.sinks)}
    for h in range(heads):
        g = h // (heads // kv_heads)
        q, k, v, s = (t.clone().requires_grad_() for t in (inputs.q[:, h:h + 1], inputs.k[:, g:g + 1],
                                                          inputs.v[:, g:g + 1], inputs.sinks[h:h + 1]))
        out = reference_attention(q, k, v, list(docs), causal=True, window=window, sinks=s)
        out.backward(inputs.dout[:, h:h + 1])
        ref["out"][:, h:h + 1], ref["dq"][:, h:h + 1], ref["dsinks"][h:h + 1] = out.detach(), q.grad, s.grad
        ref["dk"][:, g:g + 1] += k.grad
        ref["dv"][:, g:g + 1] += v.grad
    return ref


def _rank(name: str, context: PlanContext, case: Case, inputs: Inputs, dtype: torch.dtype, comm_dtype: str | None,
          backend: str, device: str):
    """One virtual rank: squared error and squared reference sums of its shards, its dsinks share, bytes sent."""
    import torch.distributed as dist

    from ..runtime.api import attention, plan

    p = plan(list(case.docs), dist.group.WORLD, scheduler=name, backend=backend, causal=True, window=case.window,
             comm_dtype=comm_dtype, context=context)
    q, k, v = (p.shard(t).to(device, dtype).requires_grad_() for t in (inputs.q, inputs.k, inputs.v))
    sinks = inputs.sinks.to(device, dtype).requires_grad_()
    out = attention(q, k, v, p, sinks=sinks)
    out.backward(p.shard(inputs.dout).to(device, dtype))
    sums = {}
    for key, got in zip(TENSORS, (out.detach(), q.grad, k.grad, v.grad)):
        want = p.shard(case.ref[key])
        sums[key] = (float(((got.cpu().double() - want) ** 2).sum()), float((want ** 2).sum()))
    return sums, sinks.grad.cpu().double(), p.bytes_sent()


def rel_rms(diff_sq: float, ref_sq: float) -> float:
    return math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else math.sqrt(diff_sq)


def not_runnable(name: str, world: int, heads: int, kv_heads: int) -> str | None:
    """Why ``name`` cannot run at ``world`` ranks with ``heads`` query heads (None: it can)."""
    degree = spec(name).head_split(world, _context(heads, kv_heads, world))
    if degree > heads:
        return f"n/a ({heads} query heads < {degree} ranks)"
    if heads % degree:
        return f"n/a ({heads} query heads not a multiple of {degree} ranks)"
    return None


def _context(heads: int, kv_heads: int, world: int, head_dim: int = 128) -> PlanContext:
    """The job each scheduler plans: usp splits heads over up to a node of 8."""
    return PlanContext(heads, kv_heads, head_dim=head_dim, ulysses_degree=min(world, 8))


def measure(name: str, world: int, case: Case, inputs: Inputs, dtype: str, comm_dtype: str | None = None,
            timeout: float = 3600.0, backend: str = "auto", device: str = "cpu") -> dict:
    """Errors (TENSORS -> relative RMS) and bytes sent of one scheduler at one world size; ``backend``:
    the local kernel (``"reference"`` computes in fp64 and rounds its results, as a GPU kernel
    rounds its fp32 accumulators); ``device``: where the ranks compute (``"cuda"``: every virtual rank
    on the one GPU)."""
    from ..distributed.virtual import run_virtual

    context = _context(inputs.q.shape[1], inputs.k.shape[1], world, inputs.q.shape[-1])
    results = run_virtual(_rank, world, name, context, case, inputs, DTYPES[dtype], comm_dtype, backend, device,
                          timeout=timeout, collective_timeout=timeout)
    row = {key: rel_rms(sum(r[0][key][0] for r in results), sum(r[0][key][1] for r in results))
           for key in TENSORS[:4]}
    dsinks = sum(r[1] for r in results)
    row["dsinks"] = float((dsinks - case.ref["dsinks"]).norm() / case.ref["dsinks"].norm())
    row["bytes_sent"] = sum(r[2] for r in results)
    return row


def naive_ring(case: Case, inputs: Inputs, world: int, dtype: str, backend: str = "auto") -> dict:
    """The ring over ``world`` contiguous blocks in one process, every running sum in ``dtype``:
    out and lse merged step by step and rounded after each, dq/dK/dV added up in ``dtype``."""
    from ..kernels import Varlen, varlen_bwd, varlen_fwd
    from ..kernels.merge import add_sink, merge, row_delta, sink_grad

    dt = DTYPES[dtype]
    q, k, v, dout, sinks = (t.to(dt) for t in (inputs.q, inputs.k, inputs.v, inputs.dout, inputs.sinks))
    total, scale = q.shape[0], q.shape[-1] ** -0.5
    cuts = np.linspace(0, total, world + 1).astype(np.int64)
    ends = np.cumsum(case.docs)
    starts = ends - np.asarray(case.docs)

    def step(s: int):
        """Ring step ``s``: every rank r >= s attends to the key block of rank r - s. The pairs share no
        query and no key rows, so one kernel call does them all, rounding exactly as one call each."""
        qs, ks, ql, kl, offs = [], [], [], [], []
        for r in range(s, world):
            j = r - s
            for ds, de in zip(starts, ends):
                qa, qb = max(ds, cuts[r]), min(de, cuts[r + 1])
                ka, kb = max(ds, cuts[j]), min(de, cuts[j + 1])
                if qa >= qb or ka >= kb or (case.window is not None and qa - (kb - 1) >= case.window):
                    continue
                qs.append(torch.arange(qa, qb))
                ks.append(torch.arange(ka, kb))
                ql.append(qb - qa)
                kl.append(kb - ka)
                offs.append(qb - kb)   # bottom-right alignment shifted to the blocks' true positions
        if not qs:
            return None
        return torch.cat(qs), torch.cat(ks), Varlen.from_geometry(ql, kl, True, case.window, np.asarray(offs))

    steps = [x for x in map(step, range(world)) if x is not None]
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], float("-inf"))
    for qi, ki, seg in steps:
        o, l = varlen_fwd(q[qi], k[ki], v[ki], seg, scale=scale, backend=backend)
        first = torch.isneginf(lse[qi])
        merged_o, merged_l = merge(out[qi], lse[qi], o, l)
        # a row's first block is stored as the kernel gave it (CP 1 is then the kernel alone); every
        # later merge rounds the running out and lse to the input dtype
        out[qi] = merged_o.to(dt)
        lse[qi] = torch.where(first, l, merged_l.to(dt).float())
    out, lse = add_sink(out, lse, sinks)
    delta = row_delta(dout, out)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for qi, ki, seg in steps:
        gq, gk, gv = varlen_bwd(dout[qi], q[qi], k[ki], v[ki], out[qi], lse[qi], seg, scale=scale, delta=delta[qi],
                                backend=backend)
        dq.index_add_(0, qi, gq)   # into a tensor of the input dtype: rounded at every step
        dk.index_add_(0, ki, gk)
        dv.index_add_(0, ki, gv)
    got = {"out": out, "dq": dq, "dk": dk, "dv": dv, "dsinks": sink_grad(delta, lse, sinks).to(dt)}
    return {key: float((got[key].double() - case.ref[key]).norm() / case.ref[key].norm()) for key in TENSORS}


def problem(tokens: int, windows: list[int | None], doclens: str | None, seed: int = 0,
            heads: int = HEADS, kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM) -> tuple[Inputs, list[Case]]:
    """The shared inputs and one :class:`Case` (documents, window, fp64 oracle) per window."""
    pool = upsample_long(load_doc_lens(doclens)) if doclens else None
    docs = tuple(pack(tokens, pool, seed=seed))
    inputs = make_inputs(tokens, heads, kv_heads, head_dim, seed)
    cases = []
    for window in windows:
        name = "causal" if window is None else f"causal, window {window}"
        t0 = time.perf_counter()
        print(f"  fp64 oracle, {name} ...", end=" ", flush=True)
        cases.append(Case(name, docs, window, oracle(inputs, docs, window)))
        print(f"{time.perf_counter() - t0:.0f} s", flush=True)
    return inputs, cases


def drift_table(inputs: Inputs, cases: list[Case], schedulers: list[str], world_sizes: list[int], dtypes: list[str],
                comm_dtype: str | None = None, naive: bool = True, backend: str = "auto") -> list[dict]:
    """One row per (case, dtype, scheduler, tensor): the error at every world size and the ratio."""
    heads, kv_heads = inputs.q.shape[1], inputs.k.shape[1]
    rows = []
    for case in cases:
        for dtype in dtypes:
            names = [*schedulers, *([NAIVE] if naive and dtype == "bf16" else [])]
            single = None   # on one rank every scheduler is the same local plan: measured once
            for name in names:
                errs, skipped = {}, {}
                for world in world_sizes:
                    why = None if name == NAIVE else not_runnable(name, world, heads, kv_heads)
                    if why:
                        skipped[world] = why
                        continue
                    t0 = time.perf_counter()
                    if name == NAIVE:
                        errs[world] = naive_ring(case, inputs, world, dtype, backend)
                    elif world == 1:
                        single = errs[world] = single or measure(name, 1, case, inputs, dtype, comm_dtype,
                                                                 backend=backend)
                    else:
                        errs[world] = measure(name, world, case, inputs, dtype, comm_dtype, backend=backend)
                    print(f"  {case.name}, {dtype}, {name}, CP {world}: out {errs[world]['out']:.2e} "
                          f"({time.perf_counter() - t0:.1f} s)", flush=True)
                ran = sorted(errs)
                for key in TENSORS:
                    row = {"case": case.name, "dtype": dtype, "comm_dtype": comm_dtype or "", "scheduler": name,
                           "tensor": key, "skipped": skipped,
                           **{f"cp{w}": errs[w][key] if w in errs else None for w in world_sizes}}
                    row["ratio"] = errs[ran[-1]][key] / errs[ran[0]][key] if len(ran) > 1 else None
                    row["ratio_of"] = (ran[0], ran[-1]) if ran else None
                    rows.append(row)
    return rows


def fp8_table(inputs: Inputs, case: Case, schedulers: list[str], world: int = 8) -> list[dict]:
    """At ``world`` ranks, bf16: each scheduler's errors and bytes sent with transfers in bf16 vs FP8."""
    rows = []
    heads, kv_heads = inputs.q.shape[1], inputs.k.shape[1]
    for name in schedulers:
        if not_runnable(name, world, heads, kv_heads):
            continue
        for comm in (None, "fp8"):
            row = measure(name, world, case, inputs, "bf16", comm)
            rows.append({"scheduler": name, "comm_dtype": comm or "bf16", **row})
            print(f"  CP {world}, {name}, transfers {comm or 'bf16'}: out {row['out']:.2e}", flush=True)
    return rows


def print_drift(rows: list[dict], world_sizes: list[int]) -> list[str]:
    """Print the drift table; return the cells that miss the goal (ratio > GOAL)."""
    misses = []
    head = f"{'scheduler':<24} {'tensor':<6} " + " ".join(f"{'CP ' + str(w):>8}" for w in world_sizes) + "   ratio"
    block = None
    for r in rows:
        if (r["case"], r["dtype"]) != block:
            block = (r["case"], r["dtype"])
            comm = f", transfers {r['comm_dtype']} (none at CP 1)" if r["comm_dtype"] else ""
            print(f"\n{r['case']}, {r['dtype']}{comm}: relative RMS error ||x - ref|| / ||ref|| vs fp64; "
                  f"ratio = largest CP / CP 1 (goal <= {GOAL})")
            print(head)
        cells = " ".join(f"{r[f'cp{w}']:>8.2e}" if r[f"cp{w}"] is not None else f"{'n/a':>8}" for w in world_sizes)
        ratio = r["ratio"]
        mark = ""
        if ratio is not None and ratio > GOAL:
            mark = "  <-- misses"
            lo, hi = r["ratio_of"]
            misses.append(f"{r['case']}, {r['dtype']}, {r['scheduler']}, {r['tensor']}: ratio {ratio:.2f} "
                          f"(CP {hi}: {r[f'cp{hi}']:.2e}, CP {lo}: {r[f'cp{lo}']:.2e})")
        print(f"{r['scheduler']:<24} {r['tensor']:<6} {cells} {ratio:>7.2f}{mark}" if ratio is not None
              else f"{r['scheduler']:<24} {r['tensor']:<6} {cells}")
    notes = {(r["scheduler"], w, why) for r in rows for w, why in r["skipped"].items()}
    for name, w, why in sorted(notes):
        print(f"{name} at CP {w}: {why}; its ratio is over the largest CP it runs at")
    return misses


def print_fp8(rows: list[dict], world: int) -> None:
    print(f"\nCP {world}, bf16, causal: transfers in bf16 vs fp8 (relative RMS error vs fp64; MiB sent, all ranks)")
    print(f"{'scheduler':<10} {'transfers':<9} " + " ".join(f"{k:>8}" for k in TENSORS[:4]) + f" {'MiB sent':>9}")
    for r in rows:
        print(f"{r['scheduler']:<10} {r['comm_dtype']:<9} " + " ".join(f"{r[k]:>8.2e}" for k in TENSORS[:4])
              + f" {r['bytes_sent'] / 2 ** 20:>9.1f}")


def write_csv(path: str, drift: list[dict], fp8: list[dict], world_sizes: list[int]) -> None:
    columns = ["table", "case", "dtype", "comm_dtype", "scheduler", "tensor", *[f"cp{w}" for w in world_sizes],
               "ratio", "bytes_sent"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in drift:
            writer.writerow({"table": "drift", **r})
        for r in fp8:
            for key in TENSORS[:4]:
                writer.writerow({"table": "fp8", "case": "causal", "dtype": "bf16", "comm_dtype": r["comm_dtype"],
                                 "scheduler": r["scheduler"], "tensor": key, "cp8": r[key],
                                 "bytes_sent": r["bytes_sent"]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="total tokens of the packed sequence")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=list(WORLD_SIZES))
    parser.add_argument("--schedulers", nargs="+", default=list(NAMES), choices=NAMES)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--window", type=int, default=None, help="the sliding-window case's window (default "
                        "tokens / 8; 0: no window case)")
    parser.add_argument("--comm-dtype", choices=("fp8",), default=None,
                        help="the drift table with Q, K, V, out and dout travelling as FP8")
    parser.add_argument("--no-fp8-table", action="store_true", help="skip the CP-8 bf16-vs-fp8 transfers table")
    parser.add_argument("--doclens", default=str(DOCLENS) if DOCLENS.exists() else None,
                        help="JSON list of document lengths (default: the shared ProLong sample when present, "
                             "else a log-normal stand-in; '' for the stand-in)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heads", type=int, nargs=3, default=[HEADS, KV_HEADS, HEAD_DIM],
                        metavar=("HQ", "HKV", "D"), help="query heads, KV heads, head dim")
    parser.add_argument("--backend", default="auto", choices=["auto", *available_backends()],
                        help="the local kernel; 'reference' rounds its results as a GPU kernel does")
    parser.add_argument("--out", default=None, help="write every cell to this CSV")
    args = parser.parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    world_sizes = sorted(set(args.world_sizes))
    if world_sizes[0] < 1:
        raise ValueError(f"--world-sizes must be >= 1, got {args.world_sizes}")
    if args.tokens < 2 * world_sizes[-1]:
        raise ValueError(f"--tokens {args.tokens} must be at least 2 x the largest world size ({world_sizes[-1]})")
    heads, kv_heads, head_dim = args.heads
    if min(args.heads) < 1 or heads % kv_heads:
        raise ValueError(f"--heads {args.heads}: need positive counts and HKV dividing HQ")
    window = max(1, args.tokens // 8) if args.window is None else args.window
    if window < 0:
        raise ValueError(f"--window must be >= 0 (0: no window case), got {window}")
    t0 = time.perf_counter()
    source = f"documents of {Path(args.doclens).name}" if args.doclens else "log-normal documents"
    print(f"precision drift: {args.tokens} tokens ({source}), {heads}/{kv_heads} heads x {head_dim}, sinks on, "
          f"backend {args.backend}, CP {', '.join(map(str, world_sizes))}", flush=True)
    inputs, cases = problem(args.tokens, [None, *([window] if window else [])], args.doclens, args.seed,
                            heads, kv_heads, head_dim)
    print(f"  {len(cases[0].docs)} documents: {', '.join(map(str, cases[0].docs))}", flush=True)
    # the foil moves nothing: beside FP8 transfers it would compare unlike things
    drift = drift_table(inputs, cases, args.schedulers, world_sizes, args.dtypes, args.comm_dtype,
                        naive=args.comm_dtype is None, backend=args.backend)
    fp8 = [] if args.no_fp8_table or args.comm_dtype else fp8_table(inputs, cases[0], args.schedulers)
    misses = print_drift(drift, world_sizes)
    if fp8:
        print_fp8(fp8, 8)
    ours = [m for m in misses if NAIVE not in m]
    print(f"\n{len(ours)} cell(s) miss the goal (ratio <= {GOAL})" + (":" if ours else ""))
    for m in ours:
        print(f"  {m}")
    if args.out:
        write_csv(args.out, drift, fp8, world_sizes)
        print(f"wrote {args.out}")
    print(f"{time.perf_counter() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
