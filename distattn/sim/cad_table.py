"""CAD against WLB-LLM as users run it, simulated over a grid of clusters (one table).

    python -m distattn.sim.cad_table --doclens ../shared/data/doclens/prolong.json \\
        ../shared/data/doclens/wlbllm.json [--network h100] [--quick]

For each document sample, model (llama3-8b, llama-34b), GPU count (64-512), sequence length
(128K-512K) and GPU preset (H100, H200), :func:`distattn.sim.sweep.rows` runs ``cad``, ``wlb``,
``wlb-ideal`` and ``ideal`` over ``--draws`` global batches (16K tokens per GPU), each at its best CP
size (``--sweep``, on by default) with the cheapest activation checkpointing that fits, and prints
the medians of the per-draw ratios ``cad / ideal`` (at least 1: no placement beats ``ideal``),
``wlb / cad`` (above 1: CAD is faster than WLB-LLM) and ``wlb-ideal / cad``, CAD's exposed
communication as a share of its step, and CAD's compute imbalance over all GPUs. Documents longer
than 64K are upsampled x4 (as in the DistCA evaluation). Without ``--doclens``, the log-normal
stand-in.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

from ..planning.doclens import load_doc_lens, upsample_long
from ..costmodel.network import network_argument, network_help, profile_of
from . import sweep
from .kernel import AttentionKernel
from .presets import GPUS, MODELS
from .simulate import SimConfig
from .workload import default_batch

GRID = {"models": ("llama3-8b", "llama-34b"), "gpus": (64, 128, 256, 512), "seq_lens": (131072, 262144, 524288),
        "gpu": ("h100", "h200")}
QUICK = {"models": ("llama3-8b",), "gpus": (16,), "seq_lens": (65536,), "gpu": ("h100",)}
ROWS = ("cad", "wlb", "wlb-ideal", "ideal")


def rows(samples: dict, network, grid=GRID, draws: int = 4, kernel_table=None, progress=None) -> list[dict]:
    out = []
    for (name, pool), model, gpus, seq, gpu in itertools.product(samples.items(), grid["models"], grid["gpus"],
                                                                 grid["seq_lens"], grid["gpu"]):
        m = MODELS[model]
        cfg = SimConfig(m, gpus, seq, 1, gpu=GPUS[gpu], batch=default_batch(gpus, seq),
                        kernel=AttentionKernel.measured(GPUS[gpu], m.head_dim, kernel_table))
        got = {r["scheduler"]: r for r in sweep.rows(cfg, network, ROWS, sweep.pool_batches(pool), draws, True)}
        cad = got["cad"]
        if cad["step_time_s"] is None:
            continue   # fits no GPU of this kind at any CP size
        row = {"docs": name, "model": model, "gpu": gpu, "gpus": gpus, "seq_len": seq, "cp": cad["cp"],
               "cad_vs_ideal": cad["over_ideal"], "vs_wlb": cad.get("speedup_vs_wlb", float("nan")),
               "vs_wlb_ideal": got["wlb-ideal"]["step_time_s"] / cad["step_time_s"]
               if got["wlb-ideal"]["step_time_s"] else float("nan"),
               "exposed_share": cad["exposed_comm_s"] / cad["step_time_s"],
               "cad_imbalance": cad["compute_imbalance"], "cad_step_s": cad["step_time_s"]}
        out.append(row)
        if progress is not None:
            progress(row)
    return out


def _print(row: dict) -> None:
    print(f"{row['docs']:<9} {row['model']:<10} {row['gpu']:<5} {row['gpus']:>5} {row['seq_len'] // 1024:>5}K "
          f"{row['cp']:>4} {row['cad_step_s']:>8.2f} {row['cad_vs_ideal']:>9.3f} {row['vs_wlb']:>8.2f} "
          f"{row['vs_wlb_ideal']:>9.2f} {row['exposed_share']:>8.0%} {row['cad_imbalance']:>6.3f}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doclens", nargs="*", default=[], help="JSON lists of document lengths")
    parser.add_argument("--network", type=network_argument, default=None, metavar="NAME_OR_PATH",
                        help=network_help("NVLink + IB assumed"))
    parser.add_argument("--kernel-table", default=None, help="attention latency per length (attn_latency_h100.csv)")
    parser.add_argument("--draws", type=int, default=4, help="global batches per row (default 4)")
    parser.add_argument("--quick", action="store_true", help="one configuration per sample")
    args = parser.parse_args(argv)
    network = profile_of(args.network)   # None: default_profile()
    samples = {path.rsplit("/", 1)[-1].removesuffix(".json"): upsample_long(load_doc_lens(path))
               for path in args.doclens} or {"lognormal": None}
    print(f"network: {network.source}; {args.draws} draws per row, each row at its best CP size")
    print(f"{'docs':<9} {'model':<10} {'gpu':<5} {'gpus':>5} {'seq':>6} {'cp':>4} {'cad s':>8} {'cad/ideal':>9} "
          f"{'wlb/cad':>8} {'wlbi/cad':>9} {'exposed':>8} {'imb':>6}")
    start = time.perf_counter()
    table = rows(samples, network, QUICK if args.quick else GRID, args.draws, args.kernel_table, _print)
    print(f"{len(table)} configurations in {time.perf_counter() - start:.0f} s; CAD within 1.15x of ideal in "
          f"{sum(r['cad_vs_ideal'] <= 1.15 for r in table)}, faster than wlb in {sum(r['vs_wlb'] > 1 for r in table)}, "
          f"exposed <= 10% in {sum(r['exposed_share'] <= 0.10 for r in table)}", file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
