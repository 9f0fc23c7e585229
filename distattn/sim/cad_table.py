"""CAD against per-document context parallelism, simulated over a grid of clusters (one table).

    python -m distattn.sim.cad_table --doclens ../shared/data/doclens/prolong.json \\
        ../shared/data/doclens/wlbllm.json [--network nccl_perf_h100.csv] [--quick]

For each document sample, model (llama3-8b, llama-34b), GPU count (64-512), sequence length
(128K-512K) and GPU preset (H100, H200), :func:`distattn.sim.simulate.simulate` runs ``cad``,
``zigzag``, ``wlb-ideal`` and ``ideal`` at the default CP degree and prints the step-time ratios
``cad / ideal`` (at least 1: no placement beats ``ideal``), ``wlb-ideal / cad`` and ``zigzag / cad``
(above 1: CAD is faster), CAD's exposed communication as a share of its step, and CAD's FLOPs
imbalance over all GPUs. Documents longer than 64K are
upsampled x4 (as in the DistCA evaluation). Without ``--doclens``, the log-normal stand-in.
"""

from __future__ import annotations

import argparse
import itertools
import time

from ..doclens import load_doc_lens, upsample_long
from .presets import GPUS, MODELS
from .simulate import SimConfig, default_cp, simulate

GRID = {"models": ("llama3-8b", "llama-34b"), "gpus": (64, 128, 256, 512), "seq_lens": (131072, 262144, 524288),
        "gpu": ("h100", "h200")}
QUICK = {"models": ("llama3-8b",), "gpus": (64,), "seq_lens": (131072,), "gpu": ("h100",)}


def rows(samples: dict, network, grid=GRID, progress=None) -> list[dict]:
    out = []
    for (name, pool), model, gpus, seq, gpu in itertools.product(samples.items(), grid["models"], grid["gpus"],
                                                                 grid["seq_lens"], grid["gpu"]):
        m = MODELS[model]
        cfg = SimConfig(m, gpus, seq, default_cp(m, gpus, seq), gpu=GPUS[gpu])
        got = {r["scheduler"]: r for r in simulate(cfg, network, ("cad", "zigzag", "wlb-ideal", "ideal"), pool)}
        cad = got["cad"]
        row = {"docs": name, "model": model, "gpu": gpu, "gpus": gpus, "seq_len": seq, "cp": cfg.cp,
               "cad_vs_ideal": cad["step_time_s"] / got["ideal"]["step_time_s"],
               "vs_wlb_ideal": got["wlb-ideal"]["step_time_s"] / cad["step_time_s"],
               "vs_zigzag": got["zigzag"]["step_time_s"] / cad["step_time_s"],
               "exposed_share": cad["exposed_comm_s"] / cad["step_time_s"],
               "cad_imbalance": cad["compute_imbalance"], "cad_step_s": cad["step_time_s"]}
        out.append(row)
        if progress is not None:
            progress(row)
    return out


def _print(row: dict) -> None:
    print(f"{row['docs']:<9} {row['model']:<10} {row['gpu']:<5} {row['gpus']:>5} {row['seq_len'] // 1024:>5}K "
          f"{row['cp']:>4} {row['cad_step_s']:>8.2f} {row['cad_vs_ideal']:>9.3f} {row['vs_wlb_ideal']:>8.2f} {row['vs_zigzag']:>8.2f} "
          f"{row['exposed_share']:>8.0%} {row['cad_imbalance']:>6.3f}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doclens", nargs="*", default=[], help="JSON lists of document lengths")
    parser.add_argument("--network", default=None, help="profile JSON or nccl_perf CSV (default: NVLink + IB)")
    parser.add_argument("--quick", action="store_true", help="one configuration per sample")
    args = parser.parse_args(argv)
    from ..network import NetworkProfile, default_profile

    network = NetworkProfile.load(args.network) if args.network else default_profile()
    samples = {path.rsplit("/", 1)[-1].removesuffix(".json"): upsample_long(load_doc_lens(path))
               for path in args.doclens} or {"lognormal": None}
    print(f"network: {network.source}")
    print(f"{'docs':<9} {'model':<10} {'gpu':<5} {'gpus':>5} {'seq':>6} {'cp':>4} {'cad s':>8} {'cad/ideal':>9} {'wlb/cad':>8} "
          f"{'zig/cad':>8} {'exposed':>8} {'imb':>6}")
    start = time.perf_counter()
    table = rows(samples, network, QUICK if args.quick else GRID, _print)
    print(f"{len(table)} configurations in {time.perf_counter() - start:.0f} s; CAD within 1.15x of ideal in "
          f"{sum(r['cad_vs_ideal'] <= 1.15 for r in table)}, >= wlb-ideal in {sum(r['vs_wlb_ideal'] >= 1 for r in table)}, "
          f">= 1.2x zigzag in {sum(r['vs_zigzag'] >= 1.2 for r in table)}, "
          f"exposed <= 10% in {sum(r['exposed_share'] <= 0.10 for r in table)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
