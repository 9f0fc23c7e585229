"""What attention keeps from forward to backward, per layer, measured on gloo ranks beside the memory
model's figure (:meth:`distattn.planning.schedule.Schedule.saved_bytes`, what ``distattn train --dry-run`` and
``distattn simulate`` count per layer under ``selective`` checkpointing).

    python -m distattn.bench.memory --saved [--world-size 8] [--seq-len 16384] [--doclens prolong.json]

Each scheduler plans one packed sequence on ``--world-size`` gloo ranks: documents drawn from a
length sample at ``--draw-len`` tokens a sequence (ProLong's 512K by default, DistCA's setting) and
scaled down to ``--seq-len`` (every length shrunk alike, at least one token: the same mix of long and
short documents, sized for this machine); documents over 64K are drawn 4x as often, as the simulator's
``--doclens`` and DistCA's evaluation skew a sample. Every rank runs one attention forward with gradients
enabled under :func:`torch.autograd.graph.saved_tensors_hooks` and counts the bytes of the distinct
storages autograd saves -- q, k, v, out and lse where the rank keeps its own rows (the ring family,
``cad`` with ``backward="resend"``), the received task rows where a ``cad`` worker keeps them
(``backward="keep"``). The table gives the busiest rank's measured bytes, the model's for it, their
ratio, and each row over ``zigzag``'s.

Without a document-length sample (``--doclens``, default ``../shared/data/doclens/prolong.json`` when
it is there) the draw is the simulator's log-normal stand-in (:func:`distattn.planning.doclens.pack`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import distattn

from ..planning.doclens import load_doc_lens, pack, upsample_long
from ..planning.schedule import AttnShape
from ..distributed.spawn import run_distributed

# (row name, scheduler, plan options)
ROWS = (("ring", "ring", {}), ("zigzag", "zigzag", {}), ("allgather", "allgather", {}), ("ulysses", "ulysses", {}),
        ("usp", "usp", {"ulysses_degree": 2}), ("cad resend", "cad", {"backward": "resend"}),
        ("cad keep", "cad", {"backward": "keep"}))
REFERENCE = 1   # the row the others are compared with: zigzag's (a ring scheduler's saved q, k, v, out, lse)
HEADS, KV_HEADS, HEAD_DIM = 16, 8, 64
SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "doclens" / "prolong.json"


def scaled_draw(seq_len: int, draw_len: int, pool, seed: int = 0) -> list[int]:
    """One sequence of ``draw_len`` tokens drawn from ``pool`` (None: the log-normal stand-in), every
    document scaled by ``seq_len / draw_len`` (at least one token), the last one trimmed or grown so
    the lengths sum to ``seq_len``."""
    drawn = np.asarray(pack(draw_len, pool, seed=seed), dtype=np.float64)
    lens = np.maximum(1, np.round(drawn * seq_len / draw_len)).astype(np.int64)
    while lens.sum() > seq_len:   # rounding up short documents: trim from the end
        over = int(lens.sum() - seq_len)
        if lens[-1] > over:
            lens[-1] -= over
        else:
            lens = lens[:-1]
    lens[-1] += seq_len - lens.sum()
    return lens.tolist()


def _saved_bytes(plan, q, k, v) -> int:
    """Bytes of the distinct storages autograd saves in one attention forward of this rank."""
    storages: dict[int, int] = {}

    def pack_hook(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        distattn.attention(q, k, v, plan)
    return sum(storages.values())


def _rank(docs: list[int], rows) -> list[tuple[int, int]]:
    """Per row: (this rank's measured saved bytes, the model's for this rank)."""
    out = []
    total = sum(docs)
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(total, h, HEAD_DIM, generator=g) for h in (HEADS, KV_HEADS, KV_HEADS)]
    for _, scheduler, options in rows:
        plan = distattn.plan(docs, dist.group.WORLD, scheduler=scheduler, backend="torch", **options)
        q, k, v = (plan.shard(t).requires_grad_() for t in full)
        measured = _saved_bytes(plan, q, k, v)
        model = plan.schedule.saved_bytes(AttnShape(HEADS, KV_HEADS, HEAD_DIM, 4))[plan.slot]
        out.append((measured, int(model)))
    return out


def measure(world_size: int, docs: list[int], rows=ROWS) -> list[dict]:
    """Per row, the busiest rank's measured saved bytes and the model's (see module docstring)."""
    per_rank = run_distributed(_rank, world_size, docs, rows, timeout=600)
    results = []
    for i, (name, _, _) in enumerate(rows):
        measured = [r[i][0] for r in per_rank]
        model = [r[i][1] for r in per_rank]
        results.append({"row": name, "measured": max(measured), "model": max(model),
                        "measured_mean": float(np.mean(measured))})
    zig = results[REFERENCE]["measured"]
    for r in results:
        r["model_over_measured"] = r["model"] / r["measured"]
        r["over_zigzag"] = r["measured"] / zig
    return results


def print_table(results: list[dict], docs: list[int], world_size: int) -> None:
    print(f"saved bytes per layer, {world_size} gloo ranks, {sum(docs):,} tokens in {len(docs)} documents "
          f"(longest {max(docs):,}), {HEADS}/{KV_HEADS} heads x {HEAD_DIM}, fp32")
    print(f"{'row':<11} {'measured MiB':>12} {'model MiB':>10} {'model/meas':>10} {'/zigzag':>8}")
    for r in results:
        print(f"{r['row']:<11} {r['measured'] / 2**20:>12.2f} {r['model'] / 2**20:>10.2f} "
              f"{r['model_over_measured']:>10.3f} {r['over_zigzag']:>8.2f}")
    print("measured: the busiest rank's distinct saved storages in one attention forward; model: "
          "Schedule.saved_bytes of that plan, busiest rank")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--saved: attention's saved bytes per layer, measured beside the model")
    group.add_argument("--saved", action="store_true", help="measure saved bytes per layer instead of the search")
    group.add_argument("--world-size", type=int, default=8, help="--saved: gloo ranks (default 8)")
    group.add_argument("--seq-len", type=int, default=16384, help="--saved: tokens of the sequence (default 16384)")
    group.add_argument("--draw-len", type=int, default=524288,
                       help="--saved: the sequence length the documents are drawn at, then scaled (default 512K)")
    group.add_argument("--doclens", type=Path, default=None,
                       help="--saved: a JSON list of document lengths (default: ProLong's sample when present, "
                            "else a log-normal stand-in)")
    group.add_argument("--seed", type=int, default=0, help="--saved: the draw")


def run(args: argparse.Namespace) -> list[dict]:
    for name in ("world_size", "seq_len", "draw_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seq_len < args.world_size:
        raise ValueError(f"--seq-len {args.seq_len} is shorter than --world-size {args.world_size}")
    path = args.doclens if args.doclens is not None else (SAMPLE if SAMPLE.is_file() else None)
    pool = None if path is None else upsample_long(load_doc_lens(path))   # as the simulator's --doclens
    docs = scaled_draw(args.seq_len, args.draw_len, pool, args.seed)
    print(f"distattn.bench.memory --saved: documents from {path or 'the log-normal stand-in'}, drawn at "
          f"{args.draw_len:,} tokens, scaled to {args.seq_len:,}", flush=True)
    results = measure(args.world_size, docs)
    print_table(results, docs, args.world_size)
    return results
