"""What the model runs on: this rank's share of a micro-batch, as one object whatever the nano-batches.

A micro-batch is cut into ``parallel.nano_batches`` nano-batches of whole documents, one plan each
(:func:`distattn.runtime.pingpong.nano_batches`); one nano-batch is the plain case. :class:`LocalBatch` keeps
each nano-batch's local tokens beside its plan from the shard to the loss, so nothing is joined only
to be split again by token counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...planning.labels import next_token_labels
from ...runtime.plans import Plan


@dataclass(frozen=True)
class LocalBatch:
    """Nano-batch ``i`` of this rank: planned by ``plans[i]``, holding ``tokens[i]``, ``pos[i]`` (each
    token's position inside its document) and ``labels[i]`` (the next token, -100: none), each
    ``[S_local_i]`` in ``plans[i]``'s shard order. ``labels`` is None for logits only."""
    plans: tuple[Plan, ...]
    tokens: tuple[torch.Tensor, ...]
    pos: tuple[torch.Tensor, ...]
    labels: tuple[torch.Tensor, ...] | None = None

    @classmethod
    def one(cls, tokens: torch.Tensor, pos: torch.Tensor, plan: Plan,
            labels: torch.Tensor | None = None) -> LocalBatch:
        """One nano-batch: ``tokens``, ``pos`` (and ``labels``) ``[S_local]``, already this rank's shard."""
        return cls((plan,), (tokens,), (pos,), None if labels is None else (labels,))

    @classmethod
    def shard(cls, tokens_S: torch.Tensor, doc_lens, parts, plans) -> LocalBatch:
        """This rank's share of a micro-batch ``tokens_S [S]`` of documents ``doc_lens``, cut into
        nano-batches ``parts`` (``(doc_lens, start, end)`` each) with one plan each."""
        labels_S = next_token_labels(tokens_S, doc_lens)
        spans = [(a, b) for _, a, b in parts]
        return cls(tuple(plans), tuple(plan.shard(tokens_S[a:b]) for plan, (a, b) in zip(plans, spans)),
                   tuple(plan.position_ids(tokens_S.device) for plan in plans),
                   tuple(plan.shard(labels_S[a:b]) for plan, (a, b) in zip(plans, spans)))

    def __len__(self) -> int:
        return len(self.plans)

    def labelled(self) -> torch.Tensor:
        """How many of this rank's tokens have a label (a 0-d int64 tensor)."""
        assert self.labels is not None
        return sum((labels != -100).sum() for labels in self.labels)
