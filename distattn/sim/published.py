"""The simulator beside published measurements, setups matched as closely as the model allows.

    python -m distattn.sim.published --doclens-dir ../shared/data/doclens \\
        --network h100 --kernel-table ../shared/data/profiles/attn_latency_h100.csv

**DistCA** (core-attention disaggregation; Zhuang et al. 2025, §6.2, Figure 9 and Table 3): DistCA's
step time over WLB-LLM's ("WLB-ideal": variable-length packing with per-document CP, the DP x CP
split swept, the best kept) on H200s with TP 8 and no pipeline parallelism -- published as ranges
over their setups, 1.05-1.12x on ProLong and 1.07-1.20x on "Pretrain" (per-setup values are bars
in Figure 9 only). Each of Table 3's setups (Llama-3 8B and 34B; MaxDocLen 128K, 256K, 512K; 64,
128, 256 GPUs; its batch of MaxDocLen sequences) is simulated with ``--tp 8 --gpu h200 --sweep``:
``cad`` against ``wlb`` (WLB-LLM as its paper runs it: per-document CP with K/V all-gathered, its
packing with outlier queues, the CP size swept: :mod:`.workload`) and against ``wlb-ideal`` (that
packing with each replica's attention evened and no communication: the bound DistCA names
WLB-ideal), the median of their per-draw ratios beside DistCA's range, over the first 30 steps of
DistCA's batch stream (it "samples 30 batches"; each CP size is scored on all of them, as DistCA
sweeps WLB-ideal's configuration over its whole run), WLB-LLM's token cap 2x a replica's share of
the batch as DistCA's reimplementation has it. DistCA's WLB-ideal is a reimplementation that
leaves out the outlier delay and, by its name, communication; ``agrees`` compares DistCA's range
with ``cad`` against ``wlb`` (a median within 0.10 of it agrees) and ``agrees_ideal`` with ``cad``
against ``wlb-ideal``.

The documents are drawn as DistCA's code draws them (``distca/simulator/optimizers/samples.py`` and
``distca/utils/global_batch_provider.py`` of github.com/hao-ai-lab/DistCA at 2afd219, with its
benchmark scripts' settings; the length files are the same as ``../shared/data/doclens``):

* documents shorter than 64K: the first half of them, in file order; documents of 64K or more: each
  four times;
* Pretrain (``wlbllm.json``): 10,000 drawn without replacement (seed 42), every length multiplied by
  ``MaxDocLen / 64K``;
* ProLong (``prolong.json``): each long copy replaced, with probability 0.3 (seed 42), by a document of
  exactly ``64K * MaxDocLen / 64K``; the long documents first, then the short ones, unshuffled;
* every length rounded up to a multiple of 16, the documents cut into MaxDocLen sequences in order
  (the overflow continuing in the next), step ``d`` taking sequences ``d * batch ...``.

DistCA's published runs differ where the model cannot follow: its pipeline-parallel runs (Table 4)
are not modelled; it skips the optimizer step as the simulator does.

**MagiAttention** and **ring-flash-attention** rows: one plain attention call of ``cad`` (CP 8-64,
8K tokens per GPU, varlen causal: forward and backward TFLOP/s per GPU) and zigzag (per document,
as its varlen zigzag splits them) and ``allgather`` on 8 GPUs of a node, on the document mixes of
ring-flash-attention's own varlen benchmark (throughput as a share of one GPU's), replayed at the
kernel's speed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..costmodel.cost import attention_flops
from ..planning.doclens import load_doc_lens, pack
from ..costmodel.network import network_argument, network_help, profile_of
from ..planning.schedule import AttnShape
from . import sweep
from .kernel import AttentionKernel
from .presets import GPUS, MODELS
from .simulate import SimConfig, attention_kernel, dry_schedule, plan_context, time_call

# Table 3 of DistCA: (model, MaxDocLen) -> {GPUs: batch of MaxDocLen sequences}
DISTCA_3D = {("llama3-8b", 131072): {64: 8, 128: 16, 256: 32}, ("llama3-8b", 262144): {64: 4, 128: 8, 256: 16},
             ("llama3-8b", 524288): {64: 2, 128: 4, 256: 8}, ("llama-34b", 131072): {64: 4, 128: 8, 256: 16},
             ("llama-34b", 262144): {64: 2, 128: 4, 256: 8}, ("llama-34b", 524288): {64: 2, 128: 4, 256: 8}}
DISTCA_PUBLISHED = {"prolong": (1.05, 1.12), "pretrain": (1.07, 1.20)}   # speedup over WLB-ideal, no PP
DATASETS = {"prolong": "prolong.json", "pretrain": "wlbllm.json"}
AGREES = 0.10
BEST_CASE = 1.35   # DistCA's own best case over WLB-ideal ("up to 1.35x", with pipeline parallelism)
WLB_CAP = 2.0      # DistCA's WLB-LLM packs a replica up to 2x its share of the batch (wlb_planner.py)
LONG, SHORT_KEPT, UPSAMPLE, REPLACED, SEED, MULTIPLE, DOCS = 65536, 0.5, 4, 0.3, 42, 16, 10000
MAGI = {8: (459, 360), 16: (426, 371), 32: (315, 333), 64: (237, 264)}   # CP: (fwd, bwd) TFLOP/s per GPU
# ring-flash-attention's varlen benchmark (benchmark/benchmark_varlen_kvpacked_func.py): each rank's
# 8K tokens, documents cycled through these four mixes (global lengths: these times the world size)
RING_FLASH_MIXES = ((8192,), (256, 7392, 544), (4096, 4096), (3104, 3200, 1600, 160, 128))
# label: (our scheduler and layout, document mixes, published share of one GPU); varlen zigzag splits
# every document zigzag (our per-document layout), llama3 splits the packed sequence (``allgather``)
RING_FLASH = {"zigzag, one causal document": ("zigzag", None, ((8192,),), 0.90),
              "zigzag varlen, their four document mixes": ("zigzag", "document", RING_FLASH_MIXES, 0.76),
              "llama3 all-gather varlen, the same mixes": ("allgather", None, RING_FLASH_MIXES, 0.58)}


def distca_documents(dataset: str, lens, seq_len: int) -> list[int]:
    """Document lengths as DistCA's benchmarks draw them for ``dataset`` at MaxDocLen ``seq_len``
    (module docstring)."""
    lens = [int(n) for n in lens]
    elongate = max(1, seq_len // LONG)
    short = [n for n in lens if n < LONG]
    long = [n for n in lens if n >= LONG] * UPSAMPLE
    short = short[:int(len(short) * SHORT_KEPT)]
    rng = np.random.default_rng(SEED)
    if dataset == "pretrain":
        return (rng.choice(short + long, size=DOCS, replace=False) * elongate).tolist()
    return [LONG * elongate if rng.random() < REPLACED else n for n in long] + short


def distca_sequences(docs, seq_len: int) -> list[list[int]]:
    """DistCA's ``batch_documents``: lengths rounded up to multiples of 16, cut into ``seq_len``
    sequences in order, a document's overflow continuing in the next."""
    out, current, room = [], [], seq_len
    for n in docs:
        n = -(-int(n) // MULTIPLE) * MULTIPLE
        while n:
            take = min(n, room)
            current.append(take)
            n, room = n - take, room - take
            if room == 0:
                out.append(current)
                current, room = [], seq_len
    return out + ([current] if current else [])


def _steps(sequences: list[list[int]], batch: int):
    """Draw ``d``: the ``d``-th ``batch`` sequences (wrapping around)."""
    whole = len(sequences) // batch
    return lambda cfg, d: sequences[(d % whole) * batch:(d % whole + 1) * batch]


def distca_setups(quick: bool = False) -> list[tuple[str, int, int, int, str]]:
    """Every matched setup ``(model, MaxDocLen, GPUs, batch, dataset)``; ``quick``: one per dataset."""
    out = [(model, seq, gpus, batch, data) for data in DISTCA_PUBLISHED for (model, seq), by in DISTCA_3D.items()
           for gpus, batch in by.items()]
    return [s for s in out if s[:4] == ("llama3-8b", 131072, 64, 8)] if quick else out


def distca_row(setup, lens: dict, network, kernel_table, draws: int, progress=None) -> dict:
    """One matched setup: ``cad``, ``wlb`` and ``wlb-ideal`` swept over CP at TP 8 on H200s, each CP
    size scored on every draw (DistCA's stream changes along its steps: its ProLong batches are long
    documents first), WLB-LLM's token cap (2x a replica's share), the ratios per draw."""
    model, seq, gpus, batch, dataset = setup
    m, gpu = MODELS[model], GPUS["h200"]
    cfg = SimConfig(m, gpus, seq, 1, gpu=gpu, tp=8, batch=batch, token_cap_factor=WLB_CAP,
                    kernel=AttentionKernel.measured(gpu, m.head_dim, kernel_table))
    batches = _steps(distca_sequences(distca_documents(dataset, lens[dataset], seq), seq), batch)
    got = {r["scheduler"]: r for r in sweep.rows(cfg, network, ["cad", "wlb", "wlb-ideal"], batches, draws, True,
                                                 progress, scored=draws)}
    cad, wlb, ideal = got["cad"], got["wlb"], got["wlb-ideal"]
    lo, hi = DISTCA_PUBLISHED[dataset]
    ratio = cad.get("speedup_vs_wlb")
    vs_ideal = _paired(ideal, cad)
    means = wlb.get("step_time_mean_s"), cad.get("step_time_mean_s")
    row = {"model": model, "max_doc_len": seq, "gpus": gpus, "batch": batch, "dataset": dataset,
           "published": [lo, hi], "speedup_vs_wlb": ratio, "p10": cad.get("speedup_vs_wlb_p10"),
           "p90": cad.get("speedup_vs_wlb_p90"), "speedup_vs_wlb_ideal": vs_ideal, "cad": _brief(cad),
           "wlb": _brief(wlb), "wlb-ideal": _brief(ideal),
           # DistCA's own figure: WLB's mean step time over DistCA's
           "mean_ratio": means[0] / means[1] if None not in means else None}
    row["agrees"] = ratio is not None and lo - AGREES <= ratio <= hi + AGREES
    row["agrees_ideal"] = vs_ideal is not None and lo - AGREES <= vs_ideal <= hi + AGREES
    return row


def _paired(other: dict, mine: dict) -> float | None:
    """The median of ``other``'s step over ``mine``'s, draw by draw (None: either has no time)."""
    a, b = other.get("step_times_s"), mine.get("step_times_s")
    if not a or not b or len(a) != len(b):
        return None
    return float(np.median(np.asarray(a) / np.asarray(b)))


def _brief(r: dict) -> dict:
    keys = ("cp", "dp", "checkpointing", "memory_gib", "step_time_s", "step_time_mean_s", "exposed_comm_s",
            "compute_imbalance", "dp_idle", "fits", "cad_backward")
    return {k: r.get(k) for k in keys}


def _attention(name: str, docs, world: int, network, cfg: SimConfig, layout: str | None = None
               ) -> tuple[dict, float]:
    """(seconds of one plain call of ``name`` on ``layout`` (None: its own): forward, backward, both;
    its forward FLOPs). The per-document layout pads each document to a multiple of ``2 * world``."""
    m = cfg.model
    shape = AttnShape(m.n_heads, m.n_kv_heads, m.head_dim, cfg.elem_bytes)
    options = {}
    if layout == "document":
        docs, options = [-(-int(n) // (2 * world)) * 2 * world for n in docs], {"layout": layout}
    schedule = dry_schedule(name, docs, world, plan_context(cfg, network), comm_dtype=cfg.comm_dtype, **options)
    flops = float(attention_flops(schedule.mask.area(), m.n_heads, m.head_dim))
    return time_call(schedule, shape, network, attention_kernel(cfg)), flops


def kernel_rows(network, pool) -> list[dict]:
    """The MagiAttention and ring-flash-attention rows (module docstring)."""
    return magi_rows(network, pool) + ring_flash_rows(network)


def magi_rows(network, pool) -> list[dict]:
    """One plain ``cad`` call per MagiAttention CP size, 8K tokens per GPU of ``pool``'s documents."""
    out = []
    network = replace(network, gpus_per_node=8)
    m = MODELS["llama3-8b"]
    for cp, (fwd, bwd) in MAGI.items():
        cfg = SimConfig(m, cp, 8192 * cp, cp)
        seconds, flops = _attention("cad", pack(8192 * cp, pool, seed=0), cp, network, cfg)
        out.append({"source": "MagiAttention", "setup": f"H100, CP {cp}, 8K tokens/GPU, varlen causal",
                    "metric": "fwd / bwd TFLOP/s per GPU", "published": f"{fwd} / {bwd}",
                    "simulated": f"{flops / cp / seconds['forward'] / 1e12:.0f} / "
                                 f"{2.5 * flops / cp / seconds['backward'] / 1e12:.0f} (cad)"})
    return out


def ring_flash_rows(network) -> list[dict]:
    """ring-flash-attention's benchmark on 8 GPUs of a node, each row's throughput as a share of one
    GPU's (``share``, and ``simulated`` as a percentage)."""
    out = []
    network = replace(network, gpus_per_node=8)
    cfg = SimConfig(MODELS["llama3-8b"], 8, 8 * 8192, 8)
    kernel, m = attention_kernel(cfg), cfg.model
    for label, (name, layout, mixes, share) in RING_FLASH.items():
        single = both = 0.0   # over the benchmark's cycle of mixes, as its iterations per second are
        for mix in mixes:
            seconds, flops = _attention(name, [8 * n for n in mix], 8, network, cfg, layout)
            lens = np.asarray([8 * n for n in mix], dtype=np.float64)   # one GPU's share of the documents, alone
            alone = sum(kernel.document_seconds(d, lens, m.n_heads).sum() for d in ("forward", "backward"))
            single, both = single + float(alone) / 8, both + seconds["both"]
        out.append({"source": "ring-flash-attention", "setup": f"8 GPUs, 8K tokens/GPU, {label}",
                    "metric": "fwd+bwd vs one GPU", "published": f"{share:.0%}", "simulated": f"{single / both:.0%}",
                    "share": single / both})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doclens-dir", required=True, help="folder holding prolong.json and wlbllm.json")
    parser.add_argument("--network", type=network_argument, default=None, metavar="NAME_OR_PATH",
                        help=network_help("NVLink + IB assumed"))
    parser.add_argument("--kernel-table", default=None, help="attention latency per length (attn_latency_h100.csv)")
    parser.add_argument("--draws", type=int, default=30, help="steps of DistCA's batch stream per setup (default "
                        "30, as DistCA samples 30 batches)")
    parser.add_argument("--quick", action="store_true", help="one setup per dataset (8B, 128K, 64 GPUs)")
    parser.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                        help="every N-th setup from the I-th (0-based): N processes run the table in parallel")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write every row as JSON")
    args = parser.parse_args(argv)
    network = profile_of(args.network)   # None: default_profile()
    lens = {d: load_doc_lens(Path(args.doclens_dir) / f) for d, f in DATASETS.items()}
    print(f"network: {network.source}; kernel table: {args.kernel_table or 'none (flat)'}; {args.draws} draws")
    print(f"{'dataset':<9} {'model':<10} {'doc len':>7} {'GPUs':>5} {'batch':>5} {'cad cp':>6} {'wlb cp':>6} "
          f"{'cad s':>6} {'wlb s':>6} {'ideal s':>7} {'wlb/cad':>8} {'p10-p90':>10} {'wlbi/cad':>8} {'DistCA':>10} "
          f"agrees (vs wlb, vs wlb-ideal)", flush=True)
    rows = []
    first, every = args.shard
    for setup in distca_setups(args.quick)[first::every]:
        row = distca_row(setup, lens, network, args.kernel_table, args.draws,
                         lambda line: print(f"  {line}", file=sys.stderr, flush=True))
        rows.append(row)
        _print(row)
    agree, ideal = sum(r["agrees"] for r in rows), sum(r["agrees_ideal"] for r in rows)
    above = sum((r["speedup_vs_wlb"] or 0) > BEST_CASE for r in rows)
    print(f"{agree} of {len(rows)} setups within {AGREES} of DistCA's published range with cad against wlb "
          f"(WLB-LLM as its paper runs it), {ideal} against wlb-ideal; {above} above DistCA's best case, "
          f"{BEST_CASE}x; DistCA's range compares its runs with its WLB-ideal reimplementation")
    for r in kernel_rows(network, None):
        print(f"{r['source']:<21} {r['setup']:<48} {r['metric']:<26} published {r['published']:<12} "
              f"simulated {r['simulated']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def _shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``."""
    first, _, every = text.partition("/")
    try:
        i, n = int(first), int(every)
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: give I/N with 0 <= I < N, e.g. 0/2 and 1/2")
    return i, n


def _print(r: dict) -> None:
    c, w, i = r["cad"], r["wlb"], r["wlb-ideal"]
    ratio = "-" if r["speedup_vs_wlb"] is None else f"{r['speedup_vs_wlb']:.2f}"
    spread = "-" if r["p10"] is None else f"{r['p10']:.2f}-{r['p90']:.2f}"
    step = (lambda x: "-" if x is None else f"{x:.2f}")
    print(f"{r['dataset']:<9} {r['model']:<10} {r['max_doc_len'] // 1024:>6}K {r['gpus']:>5} {r['batch']:>5} "
          f"{c.get('cp') or '-':>6} {w.get('cp') or '-':>6} {step(c['step_time_s']):>6} {step(w['step_time_s']):>6} "
          f"{step(i['step_time_s']):>7} {ratio:>8} {spread:>10} {step(r['speedup_vs_wlb_ideal']):>8} "
          f"{r['published'][0]:.2f}-{r['published'][1]:.2f} {'yes' if r['agrees'] else 'NO'}, "
          f"{'yes' if r['agrees_ideal'] else 'NO'}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
