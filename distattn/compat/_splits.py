"""ring-flash-attention's token splits as distattn layouts, and the one call every compat function
ends in: :mod:`~distattn.compat.ring_flash_attn`'s families and :mod:`~distattn.compat._llama3`
share it, so it lives below both."""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch.distributed as dist

from ..planning.layout import Layout
from ..runtime.varlen import attend, plan_for, resolve_group

def _per_document(lens: tuple[int, ...], p: int, pick: Callable[[int, int], np.ndarray]) -> Layout:
    """Rank ``r`` holds ``pick(r, n)`` (offsets inside a document of ``n`` tokens) of every
    document, documents in order."""
    starts = np.cumsum(lens) - np.asarray(lens)
    return Layout.from_indices([np.concatenate([s + pick(r, n) for s, n in zip(starts.tolist(), lens)])
                                for r in range(p)])


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
    # (stripe: distattn.plan runs it in the ranks' order, a band per class pair -- distattn.planning.strided)
    plan = plan_for(lens, group, scheduler=scheduler, layout_key=(split, p),
                    layout=lambda: SPLITS[split].layout(lens, p), causal=causal, window_size=window_size,
                    backend=backend, options=options)
    return attend(q, k, v, plan, softmax_scale, softcap, return_lse)


def _even(split: str, name: str, lens, what: str, p: int) -> None:
    bad = [n for n in lens if n % 2] if SPLITS[split].halves else []
    if bad:
        raise ValueError(f"{name}: zigzag cuts every {what} into 2 * world_size = {2 * p} chunks, so its local length "
                         f"must be even (global length a multiple of {2 * p}); got local length {bad[0]}: pad it")

