"""Next-token labels of a packed sequence: what the trainer's loss and the Hugging Face adapter's
(:func:`distattn.parallel.hf.causal_lm_loss`) are computed against."""

from __future__ import annotations

import torch


def next_token_labels(tokens: torch.Tensor, doc_lens) -> torch.Tensor:
    """``[S]`` labels: the next token of the same document, -100 on each document's last token
    (the loss never crosses a document boundary)."""
    labels = torch.full_like(tokens, -100)
    labels[:-1] = tokens[1:]
    ends = torch.tensor(doc_lens, device=tokens.device).cumsum(0) - 1
    labels[ends] = -100
    return labels
