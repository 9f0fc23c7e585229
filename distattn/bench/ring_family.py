"""Ring-family benchmark and numerics study (real gloo runs on this machine).

    python -m distattn.bench.ring_family                  # timing + numerics tables
    python -m distattn.bench.ring_family --quick          # smaller shapes
    python -m distattn.bench.ring_family --doclens ../shared/data/doclens/prolong.json

Timing: fwd+bwd ms of each scheduler (slowest rank, median of repeats) at 4
ranks, 16K tokens, 8 heads x 64, fp32, for one causal document and a packed
ProLong-like mix. Numerics: relative RMS error vs fp64 (same rounded inputs)
for world sizes 1..8 in fp32 and bf16; the ratio column is error at that world
size over error at world size 1.
"""

from __future__ import annotations

import argparse

from .demo import run_demo
from ..planning.doclens import load_doc_lens, pack
from ..schedulers import REGISTRY

# the schedulers that move only K/V (their error could grow with ring size)
SCHEDULERS = [name for name, s in REGISTRY.items() if s.moves_kv_only]


def timing(world_size: int, seq_len: int, heads: int, head_dim: int, repeats: int, pool=None) -> list[dict]:
    mixes = {"one-doc": [seq_len], "prolong-mix": pack(seq_len, pool, seed=0)}
    rows = []
    for mix, docs in mixes.items():
        print(f"  timing {mix}: {len(docs)} documents ...", flush=True)
        for row in run_demo(world_size=world_size, schedulers=SCHEDULERS, doc_lens=docs, heads=heads,
                            kv_heads=heads, head_dim=head_dim, dtype="fp32", repeats=repeats):
            rows.append({"mix": mix, **row})
    return rows


def numerics(world_sizes, dtypes, seq_len: int, heads: int, kv_heads: int, head_dim: int, pool=None) -> list[dict]:
    docs = pack(seq_len, pool, seed=1)
    rows = []
    for dtype in dtypes:
        for w in world_sizes:
            print(f"  numerics {dtype} world {w} ...", flush=True)
            rows += run_demo(world_size=w, schedulers=["local"] if w == 1 else SCHEDULERS, doc_lens=docs,
                             heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, repeats=1)
    base = {(r["dtype"]): r for r in rows if r["world_size"] == 1}
    for r in rows:
        r["ratio"] = max(r[f"rms_{k}"] / base[r["dtype"]][f"rms_{k}"] for k in ("out", "dq", "dk", "dv"))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4K tokens, world sizes 1, 2, 4, 8")
    parser.add_argument("--doclens", default=None, help="JSON list of real document lengths for the mix")
    args = parser.parse_args(argv)
    pool = load_doc_lens(args.doclens) if args.doclens else None
    seq_len = 4096 if args.quick else 16384
    print(f"timing: 4 ranks, {seq_len} tokens, 8 heads x 64, fp32", flush=True)
    rows = timing(4, seq_len, 8, 64, repeats=3, pool=pool)
    print(f"{'mix':<12} {'scheduler':<10} {'fwd+bwd ms':>10}")
    for r in rows:
        print(f"{r['mix']:<12} {r['scheduler']:<10} {r['ms']:>10.1f}")
    sizes = [1, 2, 4, 8] if args.quick else list(range(1, 9))
    print("numerics: relative RMS error vs fp64, 2048 tokens, 8/2 heads x 64", flush=True)
    rows = numerics(sizes, ["fp32", "bf16"], 2048, 8, 2, 64, pool=pool)
    print(f"{'dtype':<6} {'world':>5} {'scheduler':<10} {'out':>9} {'dq':>9} {'dk':>9} {'dv':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['dtype']:<6} {r['world_size']:>5} {r['scheduler']:<10} {r['rms_out']:>9.2e} {r['rms_dq']:>9.2e} "
              f"{r['rms_dk']:>9.2e} {r['rms_dv']:>9.2e} {r['ratio']:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
