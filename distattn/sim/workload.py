"""What a simulated step trains: one draw of a global batch, and how each row packs it.

**A global batch** is ``batch`` sequences of ``seq_len`` tokens (DistCA's "batch size" of MaxDocLen
chunks), filled as the trainer's stream fills them: documents drawn from a length sample in a row,
each cut where a sequence ends and continued in the next (:func:`draw_chunks`). A draw is a function
of its seed alone, so every row of a draw trains the very same documents (ratios between rows are
paired) whatever its CP size.

**Packing** (:func:`assign`) deals the batch to ``dp`` replicas x ``micro_batches`` micro-batches:

* ``stream``: sequence ``k`` is micro-batch ``k % m`` of replica ``k // m``, as the trainer's
  ``data.packing: stream`` does;
* ``balanced``: the stream's pieces repacked over every replica's micro-batches by
  :func:`distattn.pack_balanced` under a token cap of ``token_cap_factor * seq_len``, balancing what
  the row's scheduler does not balance itself: tokens plus ``pair_weight`` per attention pair, or
  tokens alone -- under at most the trainer's default cap, 1.25 sequences, which their even tokens
  never need more than -- for a scheduler that spreads attention over every GPU (``cad``'s pool,
  ``ideal``).
  Pieces no micro-batch has room for would wait for the next step (``held``): the step is timed
  without them and the row reports their share.

**Rows** (:data:`ROWS`): every scheduler of the registry on its default layout, and

* ``wlb``: WLB-LLM as its paper runs it (Wang et al., OSDI '25) -- per-document CP: each document
  cut into ``2 * cp`` chunks, a pair to each rank (our per-document layout), K/V all-gathered as Llama
  3's CP does (``allgather``); its packing (:func:`assign_wlb`); the CP size swept like every row;
* ``wlb-ideal``: its bound (DistCA's WLB-ideal): the same packing with each replica's attention
  evened over its ranks and no communication;
* ``ideal``: all attention of all replicas evened over all GPUs, no communication.

**WLB-LLM's packing** (:func:`assign_wlb`, their Algorithm 1): documents of at least
:data:`WLB_OUTLIERS` of a sequence are *outliers*, each queued by its size class; once a queue holds
as many as there are micro-batches in the global batch, they are released together, one for each;
the rest of the step's documents, the ones an earlier step could not place first, are packed by
workload (:func:`distattn.pack_balanced`: tokens plus attention pairs, each to the lightest
micro-batch with room under the token cap; what fits nowhere waits for the next step). The paper
tunes its thresholds offline and publishes none: :data:`WLB_OUTLIERS` are ours. A draw's queues
hold what the :data:`WLB_WARMUP` steps of the stream before it left there. A step trains the
documents its queues release, more or less work than its global batch: its time is scaled to the
global batch's (``wlb_work_share``: the seconds one GPU would spend on the documents it trained --
linear layers, and attention with each document whole -- over the global batch's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..planning.doclens import pack
from ..planning.packing import default_token_cap, imbalance, pack_balanced, workload
from .presets import PACKINGS

TOKENS_PER_GPU = 16384        # the default global batch: 16K tokens per GPU (DistCA's settings, Table 3)


WLB_OUTLIERS = (0.25, 0.5)     # WLB-LLM's outlier queues: documents of at least these shares of a sequence
WLB_WARMUP = 8                 # steps of the stream before a draw that fill WLB-LLM's queues


@dataclass(frozen=True)
class Row:
    """A simulated row: the registry entry it plans with, its layout (None: the entry's), the bound
    it stands for (None: a real schedule; ``"replica"``: attention evened per replica; ``"all"``: over
    every GPU), and its packing (None: the config's; ``"wlb"``: WLB-LLM's, :func:`assign_wlb`)."""

    entry: str
    layout: str | None = None
    bound: str | None = None
    packing: str | None = None


ROWS = {"wlb": Row("allgather", "document", packing="wlb"),
        "wlb-ideal": Row("allgather", "document", "replica", packing="wlb"),
        "ideal": Row("zigzag", "document", "all")}


def row_of(name: str) -> Row:
    return ROWS.get(name, Row(name))


def default_batch(gpus: int, seq_len: int) -> int:
    """Sequences of ``seq_len`` per global batch: :data:`TOKENS_PER_GPU` per GPU, at least one."""
    return max(1, gpus * TOKENS_PER_GPU // seq_len)


def draw_chunks(batch: int, seq_len: int, pool, seed: int) -> list[list[int]]:
    """``batch`` sequences of ``seq_len`` tokens filled from one stream of documents (module docstring)."""
    cuts = np.arange(1, batch) * seq_len
    ends = np.cumsum(pack(batch * seq_len, pool, seed=seed))
    bounds = np.union1d(np.concatenate([[0], ends]), cuts)
    pieces = np.diff(bounds)
    which = np.searchsorted(cuts, bounds[:-1], side="right")   # the sequence each piece starts in
    return [pieces[which == k].tolist() for k in range(batch)]


@dataclass(frozen=True, eq=False)
class Assignment:
    """``micro[j][r]``: the documents of micro-batch ``j`` of replica ``r``; ``held_tokens``: tokens no
    micro-batch had room for; ``imbalance``: max/mean over replicas of their workload."""

    micro: list
    held_tokens: int
    imbalance: float


def assign(chunks: list[list[int]], dp: int, micro_batches: int, packing: str, pair_weight: float,
           balance_weight: float, token_cap: int | None = None, seed: int = 0) -> Assignment:
    """Deal ``chunks`` (:func:`draw_chunks`) to ``dp`` replicas x ``micro_batches`` (module docstring):
    ``balance_weight`` is the pair weight the packer balances with, ``pair_weight`` the model's (what
    ``imbalance`` measures); ``token_cap``: most tokens of a micro-batch (default: 1.25 sequences)."""
    m = micro_batches
    assert len(chunks) == dp * m, (len(chunks), dp, m)
    if packing == "stream":
        micro = [[list(chunks[r * m + j]) for r in range(dp)] for j in range(m)]
        held = 0
    else:
        lens = [n for chunk in chunks for n in chunk]
        cap = token_cap or default_token_cap(max(sum(c) for c in chunks))
        packed = pack_balanced(lens, dp, m, cap, balance_weight, seed=seed)
        micro = [[[lens[i] for i in packed[r][j]] for r in range(dp)] for j in range(m)]
        held = sum(lens[i] for i in packed.held)
    work = np.zeros(dp)
    for j in range(m):
        for r in range(dp):
            work[r] += workload(micro[j][r], pair_weight).sum() if micro[j][r] else 0.0
    return Assignment(micro, held, imbalance(work))


def assign_wlb(steps: list[list[list[int]]], dp: int, micro_batches: int, pair_weight: float, token_cap: int,
               seq_len: int, seed: int = 0) -> Assignment:
    """WLB-LLM's packing (module docstring) of the last of ``steps`` (each a step's sequences, as
    :func:`draw_chunks` gives them) over ``dp`` replicas x ``micro_batches``; the steps before it fill
    the outlier queues and carry what they could not place. ``held_tokens``: what the step leaves
    for the next (placed first there); ``imbalance``: as :func:`assign`'s."""
    n = dp * micro_batches
    bounds = [share * seq_len for share in WLB_OUTLIERS]
    queues: list[list[int]] = [[] for _ in bounds]
    remained: list[int] = []
    for k, chunks in enumerate(steps):
        new = []
        for length in (int(x) for chunk in chunks for x in chunk):
            size = sum(length >= b for b in bounds)
            (queues[size - 1] if size else new).append(length)
        released = []
        for queue in queues:
            while len(queue) >= n:
                released += queue[:n]
                del queue[:n]
        docs = remained + released + new
        packed = pack_balanced(docs, dp, micro_batches, token_cap, pair_weight, seed=seed + k,
                               first=range(len(remained)))
        remained = [docs[i] for i in packed.held]
    micro = [[[docs[i] for i in packed[r][j]] for r in range(dp)] for j in range(micro_batches)]
    return Assignment(micro, sum(remained), packed.imbalance)


__all__ = ["PACKINGS", "TOKENS_PER_GPU", "WLB_OUTLIERS", "WLB_WARMUP", "Row", "ROWS", "row_of", "default_batch",
           "draw_chunks", "Assignment", "assign", "assign_wlb"]
