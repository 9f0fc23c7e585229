"""CAD balance on real document lengths, beside zigzag and ring (dry plans, no processes).

    python -m distattn.bench.cad_balance --doclens ../shared/data/doclens/prolong.json
    python -m distattn.bench.cad_balance --masks --ranks 8 64 256   # CAD vs zigzag on slice masks
    python -m distattn.bench.cad_balance --pool 4x8 16x8 --layout zigzag   # pooled over DP vs per replica

Packs ``ranks x tokens-per-rank`` tokens from the document-length sample (documents
longer than 64K upsampled x4, as in the DistCA evaluation; a log-normal stand-in
without a sample; ``--seed`` the packing's) and prints per scheduler: FLOPs and token imbalance
(max/mean), mean and max forward bytes sent per rank, max/mean of the bytes a rank sends over
forward and backward, and for CAD (whose all-to-alls say which bytes cross nodes; 8 ranks a node)
the mean and max/mean per rank of the inter-node and of the intra-node bytes, forward and
backward, each phase counting the larger of what the rank sends and receives on that kind of link
(Llama-3-8B attention: 32 query / 8 KV heads of 128, bf16), and the planning time.

For CAD also the busiest node's export lower bound (``LB``, per rank, forward and backward:
:func:`~distattn.schedulers.cad.bound.node_bound`, the fewest inter-node bytes that shed a node's
pairs above 8 x 1.05 x the mean per rank) and ``rho`` = the busiest rank's inter-node bytes (the
``inter`` column's bytes: summed over the phases, the larger of sent and received in each) / LB;
and a tighter bound ``LB*`` (the keys of documents going on at the next node counted, the longest
runs priced exactly, and what the nodes with room can take in:
:func:`~distattn.schedulers.cad.bound.tight_bound`) with ``rho*``. A rank's inter-node bytes are
at least its node's mean, and a node's at least what it sends out (or receives), so rho >= 1.

``--pool DPxCP``: ``dp`` replicas, each with its own packed sequence of ``cp x tokens-per-rank``
tokens split over its ``cp`` ranks on ``--layout`` (Megatron's: ``zigzag`` for sbhd, ``document``
for thd; documents padded to a multiple of ``2 cp``), and the attention FLOPs imbalance over all
``dp x cp`` ranks of: zigzag per replica, CAD inside each replica, and CAD pooled over the replicas
(``cad_pool``, DistCA) -- the step waits for the slowest rank of any replica.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import replace

import numpy as np

from ..runtime.api import dry_plan
from ..planning.doclens import SLICE_CASES, load_doc_lens, mask_case, pack, upsample_long
from ..planning.layout import Layout
from ..planning.masks import SliceMask
from ..distributed.mesh import MeshInfo
from ..costmodel.model_shape import MODELS
from ..costmodel.network import network_argument, network_help, profile_of
from ..planning.schedule import AttnShape, imbalance
from ..schedulers import PlanContext, cad
from ..schedulers.cad.bound import node_bound, tight_bound
from ..distributed.timing import time_calls


MODEL = MODELS["llama3-8b"]
HEADS = (MODEL.n_heads, MODEL.n_kv_heads, MODEL.head_dim)
SHAPE = AttnShape(*HEADS, 2)


def job(network=None) -> PlanContext:
    """The job every scheduler plans -- Llama-3-8B attention in bf16 on H100s on ``network``
    (default: NVLink + IB) -- as the trainer and ``distattn simulate`` describe it."""
    return PlanContext(MODEL.n_heads, MODEL.n_kv_heads, head_dim=MODEL.head_dim, dtype_bytes=2, network=network)


def table(ranks_list, tokens_per_rank: int, pool, seed: int = 0, network=None,
          comm_dtype: str | None = None) -> list[dict]:
    """``comm_dtype="fp8"``: Q, K, V, out and dout travel as FP8 (plans, bytes and bounds alike)."""
    rows, shape = [], replace(SHAPE, comm_fp8=comm_dtype == "fp8")
    for ranks in ranks_list:
        docs = pack(ranks * tokens_per_rank, pool, seed=seed)
        bounds = None
        for name, options in (("cad", {}), ("cad", {"epsilon": 0.02}), ("zigzag", {}), ("ring", {})):
            timing = time_calls(lambda: dry_plan(docs, ranks, scheduler=name, comm_dtype=comm_dtype,
                                                 context=job(network), **options), repeats=1)
            p, planned = timing.result, timing.seconds[0]
            st = p.stats(*HEADS, 2)
            comm = [ph for ph in p.schedule.phases(shape) if ph.is_comm]
            sent = sum(ph.total(st["world_size"]) for ph in comm)
            links = {}
            if all(ph.inter is not None for ph in comm):   # per rank, max(sent, received) on each kind of link
                links = {kind: sum(np.bincount(ph.rank, getattr(ph, kind), st["world_size"]) for ph in comm)
                         for kind in ("intra", "inter")}
            bound = {}
            if links:
                if bounds is None:   # they depend on the documents and the nodes, not on the plan
                    sched = p.schedule
                    resend = sched.backward == "resend"
                    bounds = (node_bound(docs, sched.slots, sched.nodes.dense, shape, resend=resend).max(),
                              tight_bound(docs, sched.slots, sched.nodes.dense, shape, resend=resend))
                busiest = float(links["inter"].max())
                bound = {"lb_mb": bounds[0] / 2**20, "rho": busiest / max(bounds[0], 1),
                         "lb_tight_mb": bounds[1] / 2**20, "rho_tight": busiest / max(bounds[1], 1)}
            rows.append({"ranks": ranks, "docs": len(docs), "scheduler": name + (f" eps={options['epsilon']}"
                                                                               if options else ""),
                         "flops_imbalance": st["flops_imbalance"], "token_imbalance": st["token_imbalance"],
                         "mean_send_mb": float(np.mean(st["send_bytes"])) / 2**20,
                         "max_send_mb": max(st["send_bytes"]) / 2**20,
                         "bytes_max_mean": float(np.max(sent) / max(np.mean(sent), 1)), "plan_ms": planned * 1e3,
                         **bound,
                         **{f"{kind}_max_mean": float(v.max() / max(v.mean(), 1)) for kind, v in links.items()},
                         **{f"{kind}_mean_mb": float(v.mean()) / 2**20 for kind, v in links.items()}})
    return rows


def mask_table(ranks_list, tokens_per_rank: int, pool, masks=SLICE_CASES) -> list[dict]:
    """CAD vs zigzag on slice masks (dry plans): FLOPs imbalance and bytes per rank."""
    rows = []
    for ranks, mask in itertools.product(ranks_list, masks):
        case = mask_case(mask, ranks * tokens_per_rank, pool, seed=0)
        for name in ("cad", "zigzag"):
            p = dry_plan(case.docs, ranks, scheduler=name, **case.plan_kwargs())
            st = p.stats(*HEADS, 2)
            rows.append({"ranks": ranks, "mask": mask, "scheduler": name, "flops_imbalance": st["flops_imbalance"],
                         "max_send_mb": max(st["send_bytes"]) / 2**20})
    return rows


def pool_table(shapes, tokens_per_rank: int, pool, layout: str = "zigzag") -> list[dict]:
    """FLOPs imbalance over all dp x cp ranks (dry plans): zigzag and CAD per replica, CAD pooled."""
    rows = []
    for dp, cp in shapes:
        replicas = [pack(cp * tokens_per_rank, pool, seed=i) for i in range(dp)]
        if layout == "document":  # Megatron pads thd documents to a multiple of 2 cp
            replicas = [[-(-n // (2 * cp)) * 2 * cp for n in docs] for docs in replicas]
        flops = {}
        for name in ("zigzag", "cad"):
            flops[name] = [f for docs in replicas
                           for f in dry_plan(docs, cp, scheduler=name, layout=layout).stats(*HEADS)["flops"]]
        groups = [(docs, Layout(layout).shards(docs, cp)) for docs in replicas]
        docs0 = replicas[0]
        timing = time_calls(lambda: cad.build(docs0, MeshInfo(cp, None), causal=True, window=None,
                                              mask=SliceMask.documents(docs0, True, None), shards=groups[0][1],
                                              pool=cad.Pool.of(groups)), repeats=1)
        flops["cad pooled"] = timing.result.stats(*HEADS)["flops"]
        for name, values in flops.items():
            rows.append({"dp": dp, "cp": cp, "scheduler": name, "flops_imbalance": imbalance(values),
                         "plan_ms": timing.seconds[0] * 1e3 if name == "cad pooled" else None})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doclens", default=None, help="JSON list of document lengths")
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--tokens-per-rank", type=int, default=65536)
    parser.add_argument("--masks", action="store_true", help="CAD vs zigzag on LongCA-bench's slice masks instead")
    parser.add_argument("--pool", nargs="+", metavar="DPxCP", default=None,
                        help="CAD pooled over dp replicas vs per replica (e.g. 4x8)")
    parser.add_argument("--layout", default="zigzag", choices=["contiguous", "zigzag", "document"],
                        help="each replica's token layout with --pool (Megatron: zigzag for sbhd, document for thd)")
    parser.add_argument("--seed", type=int, default=0, help="the packing's seed")
    parser.add_argument("--network", type=network_argument, default=None, metavar="NAME_OR_PATH",
                        help="the network CAD plans on, as `distattn simulate --network` reads it: "
                             + network_help("NVLink + IB"))
    parser.add_argument("--comm-dtype", choices=("fp8",), default=None,
                        help="Q, K, V, out and dout travel as FP8 (distattn.plan(comm_dtype='fp8'))")
    args = parser.parse_args(argv)
    pool = None
    if args.doclens:
        pool = upsample_long(load_doc_lens(args.doclens))
    if args.pool:
        try:
            shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.pool]
        except ValueError:
            parser.error(f"--pool takes DPxCP, e.g. 4x8, got {args.pool}")
        print(f"{'dp':>3} {'cp':>3} {'scheduler':<11} {'FLOPs imb (all dp x cp ranks)':>30} {'plan ms':>8}")
        for r in pool_table(shapes, args.tokens_per_rank, pool, args.layout):
            ms = f"{r['plan_ms']:>8.0f}" if r["plan_ms"] is not None else ""
            print(f"{r['dp']:>3} {r['cp']:>3} {r['scheduler']:<11} {r['flops_imbalance']:>30.3f} {ms}", flush=True)
        return 0
    if args.masks:
        print(f"{'ranks':>5} {'mask':<17} {'scheduler':<9} {'FLOPs imb':>9} {'max MiB':>9}")
        for r in mask_table(args.ranks, args.tokens_per_rank, pool):
            print(f"{r['ranks']:>5} {r['mask']:<17} {r['scheduler']:<9} {r['flops_imbalance']:>9.3f} "
                  f"{r['max_send_mb']:>9.1f}", flush=True)
        return 0
    print(f"{'ranks':>5} {'docs':>6} {'scheduler':<14} {'FLOPs imb':>9} {'tok imb':>7} {'mean MiB':>9} "
          f"{'max MiB':>9} {'max/mean':>8} {'inter MiB':>9} {'max/mean':>8} {'intra MiB':>9} {'max/mean':>8} "
          f"{'plan ms':>8} {'LB MiB':>8} {'rho':>6} {'LB* MiB':>8} {'rho*':>6}")
    network = profile_of(args.network) if args.network else None   # None: the planner's default_profile()
    for r in table(args.ranks, args.tokens_per_rank, pool, args.seed, network, args.comm_dtype):
        links = "".join(f" {r[f'{kind}_mean_mb']:>9.1f} {r[f'{kind}_max_mean']:>8.2f}" if f"{kind}_mean_mb" in r
                        else f" {'-':>9} {'-':>8}" for kind in ("inter", "intra"))
        bound = "".join(f" {r[mb]:>8.1f} {r[rho]:>6.3f}" if mb in r else f" {'-':>8} {'-':>6}"
                        for mb, rho in (("lb_mb", "rho"), ("lb_tight_mb", "rho_tight")))
        print(f"{r['ranks']:>5} {r['docs']:>6} {r['scheduler']:<14} {r['flops_imbalance']:>9.3f} "
              f"{r['token_imbalance']:>7.3f} {r['mean_send_mb']:>9.1f} {r['max_send_mb']:>9.1f} {r['bytes_max_mean']:>8.2f}"
              f"{links} {r['plan_ms']:>8.0f}{bound}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
