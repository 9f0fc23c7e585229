"""Thin, version-tolerant wrappers over torch.distributed collectives.

torch 2.13 renamed ``all_gather_into_tensor`` to ``all_gather_single`` (the old
name warns); we accept torch >= 2.5, so pick whichever exists.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_single(output: torch.Tensor, input: torch.Tensor, group=None, async_op: bool = False):
    """Gather equal-sized ``input`` from every rank into ``output`` (concatenated along dim 0)."""
    return _all_gather_single(output, input, group=group, async_op=async_op)

