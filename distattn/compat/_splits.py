"""ring-flash-attention's token splits as distattn layouts, and the one call every compat function
ends in: :mod:`~distattn.compat.ring_flash_attn`'s families and :mod:`~distattn.compat._llama3`
share it, so it lives below both."""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch.distributed as dist

from ..layout import Layout
from ..varlen import attend, plan_for, resolve_group

def _per_document(lens: tuple[int, ...], p: int, pick: Callable[[int, int], np.ndarray]) -> Layout:
    """Rank ``r`` holds ``pick(r, n)`` (offsets inside a document of ``n`` tokens) of every
    document, documents in order."""
    starts = np.cumsum(lens) - np.asarray(lens)
    return Layout.from_indices([np.concatenate([s + pick(r, n) for s, n in zip(starts.tolist(), lens)])
                                for r in range(p)])


def strided_plan_args(lens: tuple[int, ...], p: int, causal: bool, window_size) -> dict:
    """``distattn.plan``'s arguments for the stripe split as one kernel call per (query rank, key rank,
    document): Striped Attention's structure (Brandon et al., 2023). Rank ``r`` holds positions ``r, r + p,
    ...`` of each document, so position ``r + i p`` against ``s + j p`` is ``k - q = (j - i) p + (s - r)``:
    any band ``L <= k - q <= R`` (flash_attn's window; causal: ``R = 0``) is the band
    ``ceil((L - (s - r)) / p) <= j - i <= floor((R - (s - r)) / p)`` in the ranks' own indices -- causal
    with the diagonal where ``s <= r``, one diagonal further in where ``s > r``. The plan runs on the
    sequence in the ranks' order (rank 0's tokens, then rank 1's; each rank's block one contiguous run,
    the tokens it holds in order) with that band per block as a :class:`~distattn.masks.SliceMask`, so a
    kernel never sees a segment per token (each was one, and the forward at 3,824 tokens did not end in
    15 minutes)."""
    from ..masks import UNBOUNDED, SliceMask
    from ..varlen import window_bounds

    left, right = window_bounds(window_size)
    lower = -UNBOUNDED if left is None else -left
    upper = 0 if causal else (UNBOUNDED if right is None else right)
    n = np.asarray(lens, dtype=np.int64)
    ranks = np.arange(p)
    counts = np.maximum(0, (n[None, :] - ranks[:, None] + p - 1) // p)    # [rank, document]: tokens held
    block = counts.sum(axis=1)
    starts = np.cumsum(counts.reshape(-1)) - counts.reshape(-1)           # each (rank, document) run, in order
    starts = starts.reshape(p, len(n))
    r, s, d = (a.reshape(-1) for a in np.meshgrid(ranks, ranks, np.arange(len(n)), indexing="ij"))
    q0, k0 = starts[r, d], starts[s, d]
    delta = s - r
    lo = np.where(lower <= -UNBOUNDED, -UNBOUNDED, -((delta - lower) // p)) + (k0 - q0)   # (ceil by floor)
    hi = np.where(upper >= UNBOUNDED, UNBOUNDED, (upper - delta) // p) + (k0 - q0)
    mask = SliceMask.from_bands(q0, q0 + counts[r, d], k0, k0 + counts[s, d], lo, hi, check=False)
    first = np.cumsum(block) - block
    layout = Layout.from_indices([np.arange(a, a + b) for a, b in zip(first.tolist(), block.tolist())])
    return {"layout": layout, "mask": mask, "causal": False, "window": None}


class Split(NamedTuple):
    """How a family of functions holds the tokens: its distattn layout for ``(doc_lens, P)``, and
    whether it halves each rank's share of a document (zigzag: local lengths must be even)."""

    layout: Callable[[tuple[int, ...], int], str | Layout]
    halves: bool = False


SPLITS: dict[str, Split] = {
    "ring": Split(lambda lens, p: _per_document(lens, p, lambda r, n: np.arange(r * n // p, (r + 1) * n // p))),
    "stripe": Split(lambda lens, p: _per_document(lens, p, lambda r, n: np.arange(r, n, p))),
    "zigzag": Split(lambda lens, p: "document", halves=True),
    "llama3": Split(lambda lens, p: "contiguous"),
}


def _refuse(dropout_p, alibi_slopes) -> None:
    if dropout_p:
        raise ValueError(f"dropout_p={dropout_p!r}: distattn has no attention dropout; pass dropout_p=0.0")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes is not supported by distattn's kernels; pass alibi_slopes=None")


def _attention(q, k, v, lens: tuple[int, ...], split: str, group, *, scheduler: str, causal: bool, window_size,
               softmax_scale, return_lse: bool, backend: str, softcap: float | None = None, options=None):
    """This rank's attention over documents ``lens`` held the ``split`` way."""
    group = resolve_group(group)
    p = dist.get_world_size(group)
    if split == "stripe":   # the sequence in the ranks' order, a band per block: no per-token segments
        plan = plan_for((sum(lens),), group, scheduler=scheduler, layout_key=(split, p, lens), layout=None,
                        causal=causal, window_size=window_size, backend=backend, options=options,
                        arguments=lambda: strided_plan_args(lens, p, causal, window_size))
    else:
        plan = plan_for(lens, group, scheduler=scheduler, layout_key=(split, p),
                        layout=lambda: SPLITS[split].layout(lens, p), causal=causal, window_size=window_size,
                        backend=backend, options=options)
    return attend(q, k, v, plan, softmax_scale, softcap, return_lse)


def _even(split: str, name: str, lens, what: str, p: int) -> None:
    bad = [n for n in lens if n % 2] if SPLITS[split].halves else []
    if bad:
        raise ValueError(f"{name}: zigzag cuts every {what} into 2 * world_size = {2 * p} chunks, so its local length "
                         f"must be even (global length a multiple of {2 * p}); got local length {bad[0]}: pad it")

