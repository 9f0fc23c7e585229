"""ZeRO stage 1 (``parallel.dp_mode: zero1``): whole parameters on every rank, the optimizer sharded.

What Megatron's distributed optimizer does, and DistCA trains with. Every rank keeps the model's
parameters whole, in the training dtype, and runs its forward and backward as DDP would; the fp32
master weights and AdamW's two moments exist once over the ``N`` ranks of the world, each rank
holding a ``1/N`` share of every parameter: its rows ``[r * c, (r + 1) * c)``, ``c = ceil(rows / N)``,
which is ``DTensor``'s ``Shard(0)`` (and FSDP2's), so a checkpoint is the same per-parameter
``DTensor`` state FSDP2 saves and resumes under any mode (DCP reshards).

A step's collectives (:class:`Zero1`):

* **Gradients, reduce-scattered once** (fp32, summed then divided by ``N``: the mean DDP takes) in
  buckets of whole parameters, filled in the order the backward produces them: a bucket is sent the
  moment its last gradient is accumulated, so the reduction of the later blocks runs behind the
  backward of the earlier ones. At most :data:`IN_FLIGHT` buckets' send buffers exist at once, and a
  parameter's own gradient is freed as soon as its bucket holds it.
* **Parameters, all-gathered once** after the optimizer step, bucket by bucket in forward order,
  :data:`IN_FLIGHT` ahead: each block waits for its bucket just before it runs in the next forward
  (the embedding's before the model starts, the final norm's and the head's before the norm), which
  sends the next, so the gathers of the later blocks run behind the forward of the earlier ones and
  at most :data:`IN_FLIGHT` receive buffers exist at once.

One reduce-scatter and one all-gather per bucket per step, whatever the layers or nano-batches; the
buckets hold up to :data:`BUCKET_ELEMENTS` parameters (Megatron's 40M), so a small model is one of each.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..distributed.comm import all_gather_single, reduce_scatter_single
from ..distributed.trace import WAIT, dp, span

BUCKET_ELEMENTS = 40_000_000   # parameters per bucket (Megatron's default bucket size)
IN_FLIGHT = 2                  # buckets sent and not yet waited for, at most (gradients; parameters)


@dataclass(frozen=True)
class _Slot:
    """A parameter's place in its bucket: ``rows`` split into ``chunk``-row shares, each ``width`` wide,
    at ``offset`` in every rank's share of the bucket."""

    name: str
    param: nn.Parameter
    rows: int
    width: int
    chunk: int
    offset: int

    @property
    def size(self) -> int:
        return self.chunk * self.width

    def own_rows(self, rank: int) -> tuple[int, int]:
        lo = min(rank * self.chunk, self.rows)
        return lo, min(lo + self.chunk, self.rows)


class _Bucket:
    def __init__(self, slots: list[_Slot], shard: int):
        self.slots, self.shard = slots, shard
        self.ready = 0                    # gradients accumulated this backward
        self.sent = None                  # (work, send buffer) of the reduce-scatter; (None, None) once received
        self.grad = None                  # this rank's share of the reduced gradients (fp32, [shard])
        self.gather = None                # (work, receive buffer) of the all-gather in flight


class Zero1:
    """The sharded optimizer of ``model`` over ``mesh`` (1-D, every rank of the job): AdamW on this
    rank's fp32 shares, stepped by :meth:`step`, its gradients from the hooks it sets on ``model``.
    Used where a ``torch.optim`` optimizer is (``param_groups``, ``step``, ``zero_grad``) plus
    :meth:`clip_grad_norm_` (the norm over every rank's shares) and :meth:`state_dicts` /
    :meth:`load_state_dicts` for checkpoints (FSDP2's per-parameter ``DTensor`` layout)."""

    def __init__(self, model: nn.Module, mesh, dtype: torch.dtype | None = None, *, lr: float,
                 betas: tuple[float, float], weight_decay: float, bucket_elements: int | None = None):
        self.model, self.mesh, self.group = model, mesh, mesh.get_group()
        self.world, self.rank = self.group.size(), dist.get_rank(self.group)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.buckets = self._fill(named[::-1], bucket_elements or BUCKET_ELEMENTS)   # backward order: the head's first
        # the masters (and the reduction) in fp32, or the parameters' own dtype where that is wider; taken
        # before the model is cast to the training dtype ``dtype`` (None: as it is)
        self.dtype = torch.promote_types(named[0][1].dtype, torch.float32)
        self.slots = {s.name: s for bucket in self.buckets for s in bucket.slots}
        self.masters = {}
        for s in self.slots.values():
            lo, hi = s.own_rows(self.rank)
            self.masters[s.name] = s.param.detach().reshape(s.rows, s.width)[lo:hi].to(self.dtype) \
                .reshape(hi - lo, *s.param.shape[1:]).clone()
        if dtype is not None:
            model.to(dtype)
        self.optimizer = torch.optim.AdamW(list(self.masters.values()), lr=lr, betas=betas, weight_decay=weight_decay)
        self.queued: list[_Bucket] = []   # all-gathers not sent yet, in forward order
        self._hooks(model)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def _fill(self, named, limit: int) -> list[_Bucket]:
        buckets, slots, offset = [], [], 0
        for name, p in named:
            assert p.dim() >= 1, f"{name}: a 0-d parameter has no rows to shard"
            rows = p.shape[0]
            width = p.numel() // max(rows, 1)
            chunk = math.ceil(rows / self.world)
            if slots and offset + chunk * width > math.ceil(limit / self.world):
                buckets.append(_Bucket(slots, offset))
                slots, offset = [], 0
            slots.append(_Slot(name, p, rows, width, chunk, offset))
            offset += chunk * width
        return buckets + [_Bucket(slots, offset)]

    def _hooks(self, model: nn.Module) -> None:
        of = {s.param: b for b in self.buckets for s in b.slots}
        for bucket in self.buckets:
            for s in bucket.slots:
                s.param.register_post_accumulate_grad_hook(functools.partial(self._accumulated, bucket))

        def waits(params):
            mine = [b for b in self.buckets if any(of.get(p) is b for p in params)]
            return lambda *_: self._arrive(mine)
        # where the next forward first uses each parameter (Transformer.forward's order: the embedding,
        # the blocks -- their forward or the pieces nano-batches call -- then the norm and the head)
        blocks = set()
        for layer in model.layers:
            blocks |= set(layer.parameters())
            wait = waits(list(layer.parameters()))
            layer.register_forward_pre_hook(wait)
            for method in type(layer).FORWARD_METHODS:
                setattr(layer, method, _after(wait, getattr(layer, method)))
        model.register_forward_pre_hook(waits(list(model.embed.parameters())))
        model.norm.register_forward_pre_hook(waits([p for p in model.parameters() if p not in blocks]))
        model.register_forward_hook(self._check_arrived)

    # -- gradients ------------------------------------------------------------------------------
    def _accumulated(self, bucket: _Bucket, param) -> None:
        # autograd accumulates a leaf's gradient once per backward (its uses summed first); a second
        # would arrive after its bucket left and be lost
        assert bucket.sent is None, "a second gradient for a parameter of a bucket already sent"
        bucket.ready += 1
        # every rank sends the buckets in one order, whatever order its gradients came in: a bucket
        # waits for the ones before it (a parameter without a gradient holds them back until _reduced)
        for earlier in self.buckets:
            if earlier.sent is None:
                if earlier.ready < len(earlier.slots):
                    break
                self._send(earlier)

    def _send(self, bucket: _Bucket) -> None:
        """Reduce-scatter ``bucket``'s gradients: rank ``r``'s row of the send buffer holds every
        parameter's rows of rank ``r`` (zero where a parameter has none, or no gradient)."""
        in_flight = [b for b in self.buckets if b.sent is not None and b.sent[1] is not None]
        if len(in_flight) >= IN_FLIGHT:
            self._received(in_flight[0])
        send = torch.zeros(self.world, bucket.shard, dtype=self.dtype, device=bucket.slots[0].param.device)
        for s in bucket.slots:
            grad, s.param.grad = s.param.grad, None
            if grad is None:
                continue
            grad = grad.reshape(s.rows, s.width).to(self.dtype)
            if s.rows < self.world * s.chunk:
                grad = torch.cat([grad, grad.new_zeros(self.world * s.chunk - s.rows, s.width)])
            send[:, s.offset:s.offset + s.size].view(self.world, s.chunk, s.width).copy_(
                grad.view(self.world, s.chunk, s.width))
        bucket.grad = torch.empty(bucket.shard, dtype=self.dtype, device=send.device)
        with span(dp("reduce_scatter")):
            bucket.sent = (reduce_scatter_single(bucket.grad, send.view(-1), group=self.group, async_op=True), send)

    def _received(self, bucket: _Bucket) -> None:
        work, send = bucket.sent
        if send is not None:
            with span(WAIT):
                work.wait()
            bucket.grad.div_(self.world)
            bucket.sent = (None, None)

    def _reduced(self) -> None:
        """Every bucket's gradients reduced and handed to the masters (a bucket the backward left
        incomplete -- a parameter without a gradient -- is sent now)."""
        for bucket in self.buckets:
            if bucket.sent is None:
                self._send(bucket)
        for bucket in self.buckets:
            self._received(bucket)
            for s in bucket.slots:
                master = self.masters[s.name]
                master.grad = bucket.grad[s.offset:s.offset + master.numel()].view_as(master)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Reduce the gradients (waiting for the buckets in flight), then scale them so that their norm
        over every rank is at most ``max_norm`` (``torch.nn.utils.clip_grad_norm_``'s rule); returns
        the norm before clipping."""
        self._reduced()
        squares = torch.stack([b.grad.double().square().sum() for b in self.buckets]).sum()
        dist.all_reduce(squares, group=self.group)
        norm = squares.sqrt().to(self.dtype)
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for bucket in self.buckets:
            bucket.grad.mul_(scale)
        return norm

    # -- step and parameters ---------------------------------------------------------------------
    def step(self) -> None:
        """AdamW on this rank's shares, then the updated parameters' all-gathers sent (:meth:`_gather`)."""
        self._reduced()
        self.optimizer.step()
        self._gather()

    def _gather(self) -> None:
        """Queue every bucket's all-gather of the masters in forward order and send the first
        :data:`IN_FLIGHT`; each block waits for its own (:meth:`_arrive`) in the next forward, which
        sends the next, so at most that many receive buffers exist at once."""
        self.queued = list(reversed(self.buckets))
        self._send_gathers()

    def _send_gathers(self, upto: _Bucket | None = None) -> None:
        """Send queued all-gathers, in order, until :data:`IN_FLIGHT` are out, or up to ``upto``."""
        while self.queued and (upto in self.queued or sum(b.gather is not None for b in self.buckets) < IN_FLIGHT):
            bucket = self.queued.pop(0)
            param = bucket.slots[0].param
            send = torch.zeros(bucket.shard, dtype=param.dtype, device=param.device)
            for s in bucket.slots:
                master = self.masters[s.name]
                send[s.offset:s.offset + master.numel()].copy_(master.reshape(-1))
            out = torch.empty(self.world * bucket.shard, dtype=send.dtype, device=send.device)
            with span(dp("all_gather")):
                bucket.gather = (all_gather_single(out, send, group=self.group, async_op=True), out)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for bucket in self.buckets:
            bucket.ready, bucket.sent = 0, None
            for s in bucket.slots:
                s.param.grad = None
        for master in self.masters.values():
            master.grad = None

    def _arrive(self, buckets: list[_Bucket]) -> None:
        """Wait for ``buckets``' all-gathers (sending them first if still queued: every rank sends in
        one order) and copy each parameter's rows into place; then send the next queued."""
        for bucket in buckets:
            self._send_gathers(upto=bucket)
            if bucket.gather is None:
                continue
            work, out = bucket.gather
            with span(WAIT):
                work.wait()
            out = out.view(self.world, bucket.shard)
            with torch.no_grad():
                for s in bucket.slots:
                    rows = out[:, s.offset:s.offset + s.size].reshape(self.world * s.chunk, s.width)[:s.rows]
                    s.param.view(s.rows, s.width).copy_(rows)
            bucket.gather = None
            self._send_gathers()

    def _check_arrived(self, *_) -> None:
        assert not self.queued and all(b.gather is None for b in self.buckets), \
            "a parameter was used before its all-gather arrived"

    def synchronize(self) -> None:
        """Every parameter in place (before a checkpoint, or code that reads the model outside a forward)."""
        self._arrive(self.buckets[::-1])

    # -- checkpoints -----------------------------------------------------------------------------
    def _dtensor(self, name: str, local: torch.Tensor):
        from torch.distributed.tensor import DTensor, Shard

        p = self.slots[name].param
        return DTensor.from_local(local, self.mesh, [Shard(0)], run_check=False, shape=p.shape, stride=p.stride())

    def state_dicts(self) -> tuple[dict, dict]:
        """``(model, optimizer)`` state as ``get_state_dict`` gives FSDP2's: the fp32 masters and AdamW's
        state per parameter name, each a ``Shard(0)`` ``DTensor`` over the world (views: DCP loads into them)."""
        if not self.optimizer.state:   # (a load before any step) AdamW makes its state on its first step
            for master in self.masters.values():
                master.grad = torch.zeros_like(master)
            lrs = [g["lr"] for g in self.optimizer.param_groups]
            for g in self.optimizer.param_groups:
                g["lr"] = 0.0
            self.optimizer.step()
            for g, lr in zip(self.optimizer.param_groups, lrs):
                g["lr"] = lr
            for master in self.masters.values():
                master.grad = None
        model = {name: self._dtensor(name, m) for name, m in self.masters.items()}
        state = {}
        for name, m in self.masters.items():
            state[name] = {k: self._dtensor(name, v) if torch.is_tensor(v) and v.dim() else v
                           for k, v in self.optimizer.state[m].items()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(self.masters)}
                  for g in self.optimizer.param_groups]
        return model, {"state": state, "param_groups": groups}

    def load_state_dicts(self, optim: dict) -> None:
        """After DCP loaded into :meth:`state_dicts`' tensors (in place): the optimizer's settings as
        saved, and every rank's parameters gathered from the loaded masters."""
        for group, saved in zip(self.optimizer.param_groups, optim["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self._gather()
        self.synchronize()


def _after(wait, method):
    @functools.wraps(method)
    def waited(*args, **kwargs):
        wait()
        return method(*args, **kwargs)
    return waited
