"""DeepSpeed: a drop-in for ``deepspeed.sequence.layer.DistributedAttention`` and the ``mpu=`` object.

    from distattn.parallel.deepspeed import DistAttnDistributedAttention, SequenceParallelMPU
    mpu = SequenceParallelMPU.from_world(sp_size=2)                 # collective: every rank calls it
    attn = DistAttnDistributedAttention(None, mpu.get_sequence_parallel_group(), scheduler="ulysses")
    out = attn(q, k, v, batch_dim_idx=1, doc_lens=[700, 300])       # [s/P, b, h, d] in and out
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, mpu=mpu)

Same call signature as DeepSpeed's class; the sequence shards are DeepSpeed's
(contiguous, ``s/P`` tokens per rank), so the schedulers whose layout is
contiguous apply: ``ulysses`` (default), ``ring`` and ``cad``. The
``local_attention`` argument is accepted for compatibility but our kernels
compute attention (causal by default) -- with document masks, windows and GQA,
and with any head count. ``doc_lens=`` (one list for every batch element, or a
list per element) describes packed documents; by default each sequence is one
document.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..api import attention, plan as make_plan

CONTIGUOUS = ("ulysses", "ring", "cad")


class DistAttnDistributedAttention(torch.nn.Module):
    """Drop-in for ``deepspeed.sequence.layer.DistributedAttention`` (see module docstring)."""

    def __init__(self, local_attention=None, sequence_process_group=None, scatter_idx: int = 2, gather_idx: int = 0,
                 sp_stream=None, num_kv_heads: int | None = None, *, scheduler: str = "ulysses", causal: bool = True,
                 window: int | None = None, backend: str = "auto"):
        super().__init__()
        if sequence_process_group is None:
            raise ValueError("sequence_process_group is required (e.g. mpu.get_sequence_parallel_group())")
        if scheduler not in CONTIGUOUS:
            raise ValueError(f"scheduler={scheduler!r} shards tokens non-contiguously; DeepSpeed's sequence shards "
                             f"are contiguous: use one of {CONTIGUOUS}")
        if (scatter_idx, gather_idx) != (2, 0):
            raise ValueError("only DeepSpeed's default head/sequence layout (scatter_idx=2, gather_idx=0) is supported")
        self.local_attn = local_attention  # kept for signature compatibility; our kernels compute attention
        self.spg = sequence_process_group
        self.scheduler, self.causal, self.window, self.backend = scheduler, causal, window, backend
        self._plans: dict = {}

    def _plan(self, doc_lens: tuple[int, ...]):
        if doc_lens not in self._plans:  # plans are per batch in general; reuse them for a repeated layout
            self._plans = {doc_lens: make_plan(list(doc_lens), self.spg, scheduler=self.scheduler, causal=self.causal,
                                               window=self.window, backend=self.backend)}
        return self._plans[doc_lens]

    def forward(self, query, key, value, batch_dim_idx: int, rotary_pos_emb=None, *args, doc_lens=None, **kwargs):
        if rotary_pos_emb is not None:
            raise ValueError("apply rotary embeddings before attention (positions: plan.position_ids()); "
                             "rotary_pos_emb is not supported")
        if batch_dim_idx not in (0, 1):
            raise ValueError(f"batch_dim_idx must be 0 ([b, s, h, d]) or 1 ([s, b, h, d]), got {batch_dim_idx}")
        seq_dim = 1 - batch_dim_idx
        batch, s_local = query.shape[batch_dim_idx], query.shape[seq_dim]
        total = s_local * dist.get_world_size(self.spg)
        per_row = doc_lens if doc_lens and isinstance(doc_lens[0], (list, tuple)) else [doc_lens or [total]] * batch
        if len(per_row) != batch:
            raise ValueError(f"doc_lens has {len(per_row)} lists for a batch of {batch}")
        outs = []
        for i in range(batch):
            plan = self._plan(tuple(per_row[i]))
            if plan.num_local_tokens != s_local:
                raise ValueError(f"doc_lens sum to {sum(per_row[i])}, but {s_local} local tokens x "
                                 f"{dist.get_world_size(self.spg)} ranks = {total}")
            q, k, v = (t.select(batch_dim_idx, i) for t in (query, key, value))
            outs.append(attention(q.contiguous(), k.contiguous(), v.contiguous(), plan))
        return torch.stack(outs, dim=batch_dim_idx)


class SequenceParallelMPU:
    """The ``mpu=`` object for ``deepspeed.initialize`` with sequence parallelism: ZeRO shards and
    averages gradients over the sequence-data-parallel group (all dp x sp ranks)."""

    def __init__(self, sp_group, dp_group, sp_dp_group, mp_group):
        self._sp, self._dp, self._spdp, self._mp = sp_group, dp_group, sp_dp_group, mp_group

    @staticmethod
    def from_world(sp_size: int) -> "SequenceParallelMPU":
        """Sequence-parallel groups of ``sp_size`` consecutive ranks, data parallel across them.
        Collective over the default group: every rank must call it."""
        world, rank = dist.get_world_size(), dist.get_rank()
        if isinstance(sp_size, bool) or not isinstance(sp_size, int) or sp_size < 1 or world % sp_size:
            raise ValueError(f"sp_size must divide the world size {world}, got {sp_size!r}")
        sp = dp = mp = None
        for start in range(0, world, sp_size):
            g = dist.new_group(list(range(start, start + sp_size)))
            sp = g if start <= rank < start + sp_size else sp
        for offset in range(sp_size):
            g = dist.new_group(list(range(offset, world, sp_size)))
            dp = g if rank % sp_size == offset else dp
        for r in range(world):
            g = dist.new_group([r])
            mp = g if r == rank else mp
        return SequenceParallelMPU(sp, dp, dist.group.WORLD, mp)

    def get_sequence_parallel_group(self):
        return self._sp

    def get_sequence_parallel_world_size(self):
        return dist.get_world_size(self._sp)

    def get_sequence_parallel_rank(self):
        return dist.get_rank(self._sp)

    def get_sequence_data_parallel_group(self):
        return self._spdp

    def get_sequence_data_parallel_world_size(self):
        return dist.get_world_size(self._spdp)

    def get_sequence_data_parallel_rank(self):
        return dist.get_rank(self._spdp)

    def get_data_parallel_group(self):
        return self._dp

    def get_data_parallel_world_size(self):
        return dist.get_world_size(self._dp)

    def get_data_parallel_rank(self):
        return dist.get_rank(self._dp)

    def get_model_parallel_group(self):
        return self._mp

    def get_model_parallel_world_size(self):
        return 1

    def get_model_parallel_rank(self):
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank
