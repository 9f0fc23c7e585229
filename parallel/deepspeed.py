"""DeepSpeed: a drop-in for ``deepspeed.sequence.layer.DistributedAttention`` and the ``mpu=`` object.

    from distattn.parallel.deepspeed import DistAttnDistributedAttention, SequenceParallelMPU
    mpu = SequenceParallelMPU.from_world(sp_size=2)                 # collective: every rank calls it
    attn = DistAttnDistributedAttention(None, mpu.get_sequence_parallel_group(), scheduler="ulysses")
    out = attn(q, k, v, batch_dim_idx=1, doc_lens=[700, 300])       # [s/P, b, h, d] in and out
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, mpu=mpu)

Same call signature as DeepSpeed's class; the sequence shards are DeepSpeed's
(contiguous, ``s/P`` tokens per rank), and every scheduler runs on them
(``layout="contiguous"``: ``ulysses`` by default, ``ring``, ``zigzag``,
``allgather``, ``usp`` with the KV heads of the first call, ``cad``). Our kernels
compute attention -- with document masks, windows and GQA, and with any head
count -- so the mask is what ``causal=`` (default True) and ``window=`` say, not
what a ``local_attention`` module would have done: passing one warns once,
naming what replaces it. ``doc_lens=`` (one list for every batch element, or a
list per element) describes packed documents; by default each sequence is one
document.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from ..extras import require

require("deepspeed", "deepspeed", "distattn.parallel.deepspeed")

from ..runtime.api import attention, plan as make_plan
from ..runtime.plan_cache import PlanCache
from ..schedulers import NAMES, PlanContext

# plans a module keeps: the last batch's (every layer has a module of its own, so more would be kept
# once per layer; recomputation reuses it)
PLANS_KEPT = 1


class DistAttnDistributedAttention(torch.nn.Module):
    """Drop-in for ``deepspeed.sequence.layer.DistributedAttention`` (see module docstring).

    The mask is ``causal`` (causal within each document, the default, for decoder LMs; ``False``:
    bidirectional within each document) and ``window``; ``local_attention`` is not called -- it is
    accepted for DeepSpeed's signature, and passing one warns once, at construction, naming what
    replaces it, since a bidirectional one would otherwise silently become causal.
    """

    def __init__(self, local_attention=None, sequence_process_group=None, scatter_idx: int = 2, gather_idx: int = 0,
                 sp_stream=None, num_kv_heads: int | None = None, *, scheduler: str = "ulysses", causal: bool = True,
                 window: int | None = None, backend: str = "auto"):
        super().__init__()
        if sequence_process_group is None:
            raise ValueError("sequence_process_group is required (e.g. mpu.get_sequence_parallel_group())")
        if scheduler not in NAMES:
            raise ValueError(f"scheduler={scheduler!r} is unknown; choose one of {list(NAMES)}")
        if (scatter_idx, gather_idx) != (2, 0):
            raise ValueError("only DeepSpeed's default head/sequence layout (scatter_idx=2, gather_idx=0) is supported")
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be True (causal within each document) or False (bidirectional), "
                             f"got {causal!r}")
        self.local_attn = local_attention  # kept for signature compatibility; our kernels compute attention
        if local_attention is not None:
            # DeepSpeed users pass their own (often bidirectional) attention here: say what runs instead
            name = getattr(local_attention, "__qualname__", None) or type(local_attention).__name__
            warnings.warn(f"distattn's {scheduler} attention (causal={causal}, window={window}) replaces "
                          f"local_attention={name}, which is not called; pass causal=False for bidirectional "
                          f"attention, and local_attention=None to silence this", UserWarning, stacklevel=2)
        self.spg = sequence_process_group
        self.scheduler, self.causal, self.window, self.backend = scheduler, causal, window, backend
        self.plans = PlanCache(PLANS_KEPT)

    def _plan(self, doc_lens: tuple[int, ...], query: torch.Tensor, kv_heads: int):
        """The plan of documents ``doc_lens`` (a tuple per row for a batch) for ``query``'s heads (dim 2),
        head dim and dtype, and ``kv_heads`` KV heads."""
        heads = query.shape[2]
        def make():
            # DeepSpeed's shards: contiguous, whatever the scheduler's own layout
            return make_plan(list(doc_lens), self.spg, scheduler=self.scheduler, causal=self.causal,
                             window=self.window, backend=self.backend, layout="contiguous",
                             context=PlanContext(heads, kv_heads, head_dim=query.shape[-1],
                                                 dtype_bytes=query.element_size()))
        return self.plans.get((doc_lens, heads, kv_heads, query.shape[-1], query.dtype), make)

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
        for row in per_row:
            if sum(row) != total:
                raise ValueError(f"doc_lens sum to {sum(row)}, but {s_local} local tokens x "
                                 f"{dist.get_world_size(self.spg)} ranks = {total}")
        rows = tuple(tuple(row) for row in per_row)
        if batch == 1:
            plan = self._plan(rows[0], query, key.shape[2])
            return attention(*(t.select(batch_dim_idx, 0) for t in (query, key, value)), plan).unsqueeze(batch_dim_idx)
        # a batched plan: every row in one call (its [b, s, h, d] are views of [s, b, h, d])
        plan = self._plan(rows, query, key.shape[2])
        out = attention(*(t.movedim(batch_dim_idx, 0) for t in (query, key, value)), plan)
        return out.movedim(0, batch_dim_idx).contiguous()


class SequenceParallelMPU:
    """The ``mpu=`` object for ``deepspeed.initialize`` with sequence parallelism: ZeRO shards and
    averages gradients over the sequence-data-parallel group (all dp x sp ranks)."""

    def __init__(self, sp_group, dp_group, sp_dp_group, mp_group):
        self._sp, self._dp, self._spdp, self._mp = sp_group, dp_group, sp_dp_group, mp_group

    @staticmethod
    def from_world(sp_size: int) -> "SequenceParallelMPU":
        """Sequence-parallel groups of ``sp_size`` consecutive ranks, data parallel across them:
        the ``("dp", "cp")`` mesh of :class:`distattn.parallel.ParallelDims`. Collective over the
        default group: every rank must call it; calling it again makes no new process group."""
        world, rank = dist.get_world_size(), dist.get_rank()
        if isinstance(sp_size, bool) or not isinstance(sp_size, int) or sp_size < 1 or world % sp_size:
            raise ValueError(f"sp_size must divide the world size {world}, got {sp_size!r}")
        from ..distributed.comm import subgroups
        from ..distributed.mesh import ParallelDims, group_device

        # the job's one mesh (a second call, or the trainer's mesh of the same shape, finds its groups)
        mesh = ParallelDims(dp=world // sp_size, cp=sp_size).build(group_device(dist.group.WORLD).type)
        # no tensor parallelism: each rank is its own model-parallel group (found again the same way)
        (mp,) = subgroups(dist.group.WORLD, [[rank]], "model-parallel groups of one rank",
                          "SequenceParallelMPU.from_world") if world > 1 else (dist.group.WORLD,)
        return SequenceParallelMPU(mesh["cp"].get_group(), mesh["dp"].get_group(), dist.group.WORLD, mp)

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
