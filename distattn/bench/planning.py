"""How long planning takes: every scheduler's dry plan and ``stats()`` for thousands of ranks.

    python -m distattn.bench.planning [--doclens ../shared/data/doclens/prolong.json] [--ranks 512 1024 4096]

Packs ``ranks x tokens-per-rank`` tokens (64K by default) from the document-length sample (documents
longer than 64K upsampled x4; a log-normal stand-in without a sample) and prints, per scheduler
and rank count, the seconds of ``distattn.plan(docs, ranks, ...)`` plus ``plan.stats()`` (Llama-3-8B
attention; ``ulysses`` with as many heads as ranks, since it splits heads over them; ``usp``
with Ulysses over 8 ranks, a node). One run each:
the trainer plans every step, so this is the time a step waits for its plan.
"""

from __future__ import annotations

import argparse

from ..runtime.api import plan
from ..planning.doclens import load_doc_lens, pack, upsample_long
from ..schedulers import NAMES, PlanContext, spec
from ..distributed.timing import time_calls


def plan_seconds(name: str, docs, ranks: int) -> float:
    heads = max(32, spec(name).head_split(ranks, PlanContext(32, 8, ulysses_degree=8)))   # a head per rank
    context = PlanContext(heads, heads if heads > 32 else 8, ulysses_degree=8)

    def run():
        plan(docs, ranks, scheduler=name, context=context).stats(heads, context.num_kv_heads, 128)
    return time_calls(run, repeats=1).seconds[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doclens", default=None, help="JSON list of document lengths")
    parser.add_argument("--ranks", type=int, nargs="+", default=[512, 1024, 4096])
    parser.add_argument("--tokens-per-rank", type=int, default=65536)
    parser.add_argument("--schedulers", nargs="+", default=list(NAMES), choices=NAMES)
    args = parser.parse_args(argv)
    pool = upsample_long(load_doc_lens(args.doclens)) if args.doclens else None
    print(f"{'ranks':>6} {'docs':>7} " + " ".join(f"{n:>9}" for n in args.schedulers) + "   (seconds: plan + stats)")
    for ranks in args.ranks:
        docs = pack(ranks * args.tokens_per_rank, pool, seed=0)
        cells = [plan_seconds(name, docs, ranks) for name in args.schedulers]
        print(f"{ranks:>6} {len(docs):>7} " + " ".join(f"{c:>9.2f}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
