"""Balanced packing (WLB-LLM style): the documents of a global batch spread over every data-parallel
rank's micro-batches so that each holds the same *workload*, not the same number of tokens.

A micro-batch's step time is its linear layers (proportional to its tokens) plus its attention
(proportional to the query-key pairs its documents' masks leave visible). Packing whole documents
into equal token counts, as a stream packer does, leaves one rank with a 300K-token document and
another with a hundred 3K ones: the same tokens, ten times the attention, and every other rank
waits for it at the gradient all-reduce. :func:`pack_balanced` weighs each document by::

    workload = tokens + pair_weight * visible pairs

(``pair_weight``: a pair's forward + backward attention FLOPs over a token's linear FLOPs,
:meth:`distattn.costmodel.model_shape.ModelShape.pair_weight`; the default is Llama-3 8B's), and deals the
documents out heaviest first, each to the micro-batch with the least workload so far that has room
for it under ``token_cap`` (LPT, longest-processing-time-first: within 4/3 of the optimum, and
within one document of it when documents are many). A document that fits no micro-batch is *held*:
returned apart, for the caller to place first in the next global batch (``first=``), as WLB-LLM
delays its outliers. It is the caller's to bound how long documents wait: the trainer puts every
held document first the next step, where an empty micro-batch always takes it.

In a data loader of a trainer we don't own (Megatron, Hugging Face), per global batch::

    held = []                                         # documents (token arrays) carried over
    for step, new in enumerate(global_batches):       # each: the next global batch's documents
        docs = held + new                             # the held ones first: first= names them
        packing = distattn.pack_balanced([len(d) for d in docs], dp_size=world // cp,
                                         micro_batches=grad_accum, token_cap=max_tokens,
                                         pair_weight=MODELS["llama3-8b"].pair_weight(),
                                         first=range(len(held)), seed=step)
        mine = packing[dp_rank]                       # [micro_batch] -> document indices
        # every micro-batch runs, an empty one too: ranks must run as many as each other, or their
        # gradient collectives stop lining up
        batches = [np.concatenate([docs[i] for i in mb] or [np.zeros(0, np.int64)]) for mb in mine]
        held = [docs[i] for i in packing.held]        # placed first next time

(``MODELS``: :data:`distattn.costmodel.model_shape.MODELS`, or your model's
:class:`~distattn.costmodel.model_shape.ModelShape`.) ``packing.held`` are indices into *this* call's
``doc_lens``: carry the documents, not the indices. A micro-batch is empty when there are fewer
documents than micro-batches in all. ``distattn train`` does the same with ``data.packing:
balanced`` (one micro-batch per rank, ``token_cap``: ``data.token_cap``, default
:data:`DEFAULT_CAP_FACTOR` x ``data.seq_len``; :mod:`distattn.train.data.global_batch`).

Every rank computes the same packing (it is a pure function of its arguments), so no rank needs
to ask another which documents it got.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from .masks import as_doc_lens, mask_area
from ..costmodel.model_shape import MODELS

# Llama-3 8B's: a pair's forward + backward attention FLOPs over a token's linear FLOPs (~4.4e-5)
DEFAULT_PAIR_WEIGHT = MODELS["llama3-8b"].pair_weight()
# the default token cap over the stream's sequence length: room for a rank to take a quarter more
# tokens than an even split (light documents) while its memory estimate stays within 1.25x
DEFAULT_CAP_FACTOR = 1.25


def default_token_cap(seq_len: int, factor: float = DEFAULT_CAP_FACTOR) -> int:
    """``ceil(factor * seq_len)``: the trainer's and the simulator's token cap (``DEFAULT_CAP_FACTOR``
    when none is set)."""
    return math.ceil(factor * seq_len)


class Packing(list):
    """``packing[dp_rank][micro_batch]``: the indices (into the ``doc_lens`` given) of the documents
    of that micro-batch, in their order in ``doc_lens``. Also:

    * ``held``: the indices placed nowhere (no micro-batch had room under ``token_cap``);
    * ``tokens`` and ``workloads``: ``[dp_size, micro_batches]`` arrays of each micro-batch's sums;
    * ``imbalance``: max / mean workload over the data-parallel ranks (their micro-batches summed):
      how long the slowest rank's step is against a perfect split (1.0: perfect)."""

    def __init__(self, ranks, held=(), tokens=None, workloads=None):
        super().__init__(ranks)
        self.held = list(held)
        shape = (len(self), len(self[0]) if len(self) else 0)
        self.tokens = np.zeros(shape, dtype=np.int64) if tokens is None else np.asarray(tokens)
        self.workloads = np.zeros(shape) if workloads is None else np.asarray(workloads, dtype=np.float64)

    @property
    def imbalance(self) -> float:
        return imbalance(self.workloads.sum(axis=1))


def imbalance(values) -> float:
    """max / mean of ``values`` (1.0 when they are all zero)."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean()) if values.size else 0.0
    return float(values.max() / mean) if mean > 0 else 1.0


def workload(doc_lens, pair_weight: float = DEFAULT_PAIR_WEIGHT, causal: bool = True,
             window: int | None = None) -> np.ndarray:
    """Each document's ``tokens + pair_weight * visible pairs`` (module docstring), float64."""
    lens = np.asarray(doc_lens, dtype=np.int64)
    return lens + pair_weight * mask_area(lens, lens, causal, window).astype(np.float64)


def pack_balanced(doc_lens, dp_size: int, micro_batches: int = 1, token_cap: int | None = None,
                  pair_weight: float = DEFAULT_PAIR_WEIGHT, seed: int = 0, *, causal: bool = True,
                  window: int | None = None, first=()) -> Packing:
    """The documents ``doc_lens`` (lengths, in tokens) dealt out to ``dp_size`` ranks x
    ``micro_batches`` micro-batches with even workloads (module docstring).

    Args:
        doc_lens: lengths of the global batch's documents (a list or 1-D array of ints >= 1).
        dp_size, micro_batches: the data-parallel ranks and each one's micro-batches.
        token_cap: most tokens a micro-batch may hold (what fits in memory); None: no cap.
        pair_weight: workload of a visible query-key pair, in tokens (module docstring).
        seed: breaks ties between documents of equal workload, reproducibly.
        causal, window: the documents' mask (window: each query sees the ``window`` keys before it).
        first: indices of documents to place before all others, in this order (those held by the
            previous global batch).

    Returns:
        a :class:`Packing`: ``packing[dp_rank][micro_batch] -> document indices``, with ``held``,
        ``tokens``, ``workloads`` and ``imbalance``. Every document is in exactly one micro-batch or
        in ``held``.

    Raises:
        ValueError: a bad argument, or a document longer than ``token_cap`` (no micro-batch could
        ever take it: raise the cap or cut the document).
    """
    empty = isinstance(doc_lens, (list, tuple)) and not doc_lens
    lens = np.asarray(() if empty else as_doc_lens(doc_lens), dtype=np.int64)
    for name, value, low in (("dp_size", dp_size, 1), ("micro_batches", micro_batches, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be a {'positive' if low else 'non-negative'} int, got {value!r}")
    if token_cap is not None and (isinstance(token_cap, bool) or not isinstance(token_cap, (int, np.integer))
                                  or token_cap < 1):
        raise ValueError(f"token_cap must be a positive int (tokens) or None, got {token_cap!r}")
    if isinstance(pair_weight, bool) or not isinstance(pair_weight, (int, float)) or \
            not (math.isfinite(pair_weight) and pair_weight >= 0):
        raise ValueError(f"pair_weight must be a finite number >= 0, got {pair_weight!r}")
    first = list(first)
    if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in first) or \
            len(set(first)) != len(first) or any(not 0 <= i < len(lens) for i in first):
        raise ValueError(f"first must name distinct documents, int indices in [0, {len(lens)}), got {first}")
    first = [int(i) for i in first]
    if token_cap is not None and len(lens) and int(lens.max()) > token_cap:
        i = int(np.argmax(lens))
        raise ValueError(f"document {i} has {int(lens[i]):,} tokens, more than token_cap={token_cap:,}: no "
                         f"micro-batch can take it; raise token_cap or cut the document")
    work = workload(lens, pair_weight, causal, window)
    ties = np.random.default_rng(seed).permutation(len(lens))
    taken = np.zeros(len(lens), dtype=bool)
    taken[first] = True
    rest = [i for i in np.lexsort((ties, -work)).tolist() if not taken[i]]   # heaviest first
    bins = dp_size * micro_batches
    tokens, loads = np.zeros(bins, dtype=np.int64), np.zeros(bins)
    members: list[list[int]] = [[] for _ in range(bins)]
    heap = [(0.0, b) for b in range(bins)]        # (workload, bin): the lightest bin on top
    held = []
    for i in first + rest:
        skipped, placed = [], None
        while heap:
            load, b = heapq.heappop(heap)
            if token_cap is None or tokens[b] + lens[i] <= token_cap:
                placed = b
                break
            skipped.append((load, b))
        if placed is None:
            held.append(i)
        else:
            members[placed].append(i)
            tokens[placed] += lens[i]
            loads[placed] += work[i]
            heapq.heappush(heap, (float(loads[placed]), placed))
        for item in skipped:
            heapq.heappush(heap, item)
    return Packing([[sorted(members[r * micro_batches + m]) for m in range(micro_batches)] for r in range(dp_size)],
                   sorted(held), tokens.reshape(dp_size, micro_batches), loads.reshape(dp_size, micro_batches))


__all__ = ["pack_balanced", "Packing", "workload", "imbalance", "default_token_cap", "DEFAULT_PAIR_WEIGHT",
           "DEFAULT_CAP_FACTOR"]
