"""What every executor shares: the saved state, device indices, kernel calls and input agreement.

An executor runs one rank's part of a schedule on process groups. It is the live, mutable half of
a plan (the schedule is the frozen half), held by the plan's runtime
(:class:`distattn.runtime.plans.PlanRuntime`), which users don't see: it holds the rank's communicators
(which count the bytes sent), its kernel layouts and indices copied to the device once
(:meth:`Executor.prepare`), and the input shapes its group already agreed on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from ..distributed.comm import Comm, meet_once
from ..kernels import Varlen, prepare, varlen_bwd, varlen_fwd
from ..kernels.merge import acc_dtype, add_sink, merge_, sink_grad
from ..distributed.trace import ATTENTION, MERGE, span
from ..schedulers.blocks import KernelCall
from ..planning.wire import Wire


class Saved(NamedTuple):
    """What a forward keeps for its backward (this rank's tensors)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor


@dataclass(frozen=True)
class ExecOptions:
    """How an executor runs, whatever its pattern (``distattn.plan``'s options of the same names).

    ``deterministic``: bitwise-equal results run to run -- sums over rows that repeat go in a
    fixed order (:meth:`DeviceIndex.add_into`), never through atomics. ``comm_dtype``: the
    encoding of what attention moves (:class:`distattn.planning.wire.Wire`). ``inner`` (set by an outer
    executor for its inner one, not a plan option): the backward returns dK and dV in the
    accumulator dtype, because the outer one sums them further (the heads all-to-all's copies of a
    KV head: rounding each part to bf16 first would be a rounding per part), and leaves the sinks'
    gradient shares to the outer one (:meth:`Executor.sink_share`)."""

    deterministic: bool = False
    comm_dtype: str | None = None   # None | "fp8": how Q, K, V, out and dout travel (distattn.planning.wire)
    inner: bool = False

    def kv_grad_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype dK/dV of inputs of ``dtype`` are returned in."""
        return acc_dtype(dtype) if self.inner else dtype

    @property
    def wire(self) -> Wire:
        return Wire(fp8=self.comm_dtype == "fp8")


@dataclass(frozen=True, eq=False)
class DeviceIndex:
    """A host index array and its copies on devices, each made once."""

    array: np.ndarray
    _copies: dict = field(default_factory=dict, repr=False)

    def on(self, device: torch.device) -> torch.Tensor:
        device = torch.device(device)
        if device not in self._copies:
            self._copies[device] = torch.from_numpy(np.ascontiguousarray(self.array)).to(device)
        return self._copies[device]

    def add_into(self, dst: torch.Tensor, src: torch.Tensor, ordered: bool = False) -> torch.Tensor:
        """``dst[index[i]] += src[i]`` for every row ``i`` (``index_add_``); returns ``dst``.

        ``ordered``: rows adding into the same row of ``dst`` are added in index order, one layer of
        distinct targets at a time. CUDA's ``index_add_`` sums repeated targets with atomics, in an
        order that changes run to run; each layer has one row per target, so nothing races."""
        if not ordered:
            return dst.index_add_(0, self.on(dst.device), src)
        key = ("layers", torch.device(dst.device))
        if key not in self._copies:
            a = np.asarray(self.array, dtype=np.int64)
            order = np.argsort(a, kind="stable")
            nth = np.empty(len(a), dtype=np.int64)   # how many earlier rows add into the same target
            nth[order] = np.arange(len(a)) - np.searchsorted(a[order], a[order], side="left")
            layers = [np.flatnonzero(nth == n) for n in range(int(nth.max(initial=-1)) + 1)]
            self._copies[key] = [(torch.from_numpy(a[rows]).to(dst.device),
                                  None if len(layers) == 1 else torch.from_numpy(rows).to(dst.device))
                                 for rows in layers]
        for targets, rows in self._copies[key]:
            dst.index_add_(0, targets, src if rows is None else src.index_select(0, rows))
        return dst


class Executor:
    """One rank's runner of a schedule (subclassed per communication pattern).

    ``forward(q, k, v, scale, softcap=None, sinks=None) -> (out, saved)`` and
    ``backward(dout, saved, scale, softcap=None, sinks=None) -> (dq, dk, dv, dsinks)``;
    ``device_data()`` lists the kernel layouts and indices they use.

    ``softcap`` goes to every local kernel call. ``sinks`` (``[H]`` logits, H the query heads the
    executor computes) are counted once per row, where the row's *final* out/lse lives
    (:func:`finish_rows`), and ``dsinks`` (accumulator dtype; None without sinks) is this rank's
    share of the gradient (:meth:`sink_grad`): summed over the ranks, the full one.

    A *staged* executor (``staged = True``) also runs each direction as three stages, the points
    at which :mod:`distattn.runtime.pingpong` runs the other nano-batch's layers in between (its program
    puts each instruction in the stage that issues it, :mod:`distattn.planning.program`):

    * ``prefetch(q, k, v) -> pending``: start what the computation needs (``dispatch``);
    * ``compute_forward(pending, scale, softcap, sinks) -> returning``: wait for it, compute, start
      the way back; ``returning.saved``: what this stage keeps for its backward (a pytree of tensors
      and plain values);
    * ``finish_forward(returning, q, k, v) -> (out, owned)``: wait for the way back; ``owned``:
      what this stage keeps (a pytree; q, k, v and out are kept without copies);
    * ``start_backward(dout, owned) -> pending``, ``compute_backward(pending, saved, scale, softcap,
      sinks) -> returning`` (``saved``: the compute stage's; ``returning.dsinks``: as
      ``backward``'s), ``finish_backward(returning) -> (dq, dk, dv)``: the mirror.

    ``forward``/``backward`` run them back to back.
    """

    supports_prefetch = False   # ``plan.prefetch`` (cad)
    staged = False              # the stage methods below exist (distattn.runtime.pingpong runs them apart)

    def __init__(self, schedule, rank: int, comm: Comm, backend: str, options: ExecOptions = ExecOptions()):
        self.schedule, self.rank, self.comm, self.backend, self.options = schedule, rank, comm, backend, options
        self._agreed: set[str] = set()  # input signatures every rank of the group shares

    @property
    def comms(self) -> tuple[Comm, ...]:
        """The communicators attention sends through (their bytes are :attr:`bytes_sent`)."""
        return (self.comm,)

    @property
    def bytes_sent(self) -> int:
        return sum(c.bytes_sent for c in self.comms)

    def wait_seconds(self) -> float:
        return sum(c.wait_seconds() for c in self.comms)

    @property
    def agreement_group(self):
        """The group whose ranks exchange data in attention (and so must agree on shapes)."""
        return self.comm.group

    @property
    def sink_comm(self) -> Comm:
        """The ranks whose dsinks shares add up to the sinks' gradient (:meth:`sink_share`)."""
        return self.comm

    def sink_grad(self, delta: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor | None:
        """``dsinks [H]`` over the rows this rank computed (``delta = rowsum(dout * out)``, ``lse`` with the
        sinks), as :meth:`sink_share` gives it; None without sinks."""
        return None if sinks is None else self.sink_share(sink_grad(delta, lse, sinks), sinks.dtype)

    def sink_share(self, dsinks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """This rank's share of the sinks' gradient (accumulator dtype): the data-parallel reduction
        sums the shares. Autograd rounds each share to the sinks' ``dtype``; for bf16 sinks that is P
        roundings of shares that partly cancel (measured: 1.2-1.3x one rank's error at 64 ranks). So
        the group sums its shares in fp32 first and each rank keeps 1/P of the sum: one rounding,
        exactly one when P is a power of two. One all-reduce of ``[H]`` floats, in the program
        (:meth:`distattn.planning.schedule.Schedule.call_program`); an inner executor leaves it to its outer one."""
        comm = self.sink_comm
        if dtype.itemsize >= 4 or self.options.inner or comm.size == 1:
            return dsinks
        total = dsinks.contiguous()
        comm.all_reduce(total, f"{self.schedule.scheduler} backward: dsinks sum").wait()
        return total / comm.size

    def kernel_args(self, scale: float, softcap: float | None = None) -> dict:
        """Keyword arguments of every ``varlen_fwd``/``varlen_bwd`` call (the mask is in the layouts;
        ``deterministic`` keeps ``backend="auto"``'s backward off kernels that add with atomics)."""
        return dict(scale=scale, softcap=softcap, backend=self.backend, deterministic=self.options.deterministic)

    def device_data(self) -> Iterable[Varlen | DeviceIndex]:
        return ()

    def prepare(self, device: torch.device | str) -> None:
        """Copy the kernel layouts and indices to ``device`` and let the kernel backend precompute
        from them, once: attention then makes no host synchronisation."""
        device = torch.device(device)
        for item in self.device_data():
            if isinstance(item, Varlen):
                try:
                    prepare(item, device, backend=self.backend)
                except ValueError:  # no backend for this device: attention will say so
                    continue
            else:
                item.on(device)

    def forward(self, q, k, v, scale: float, softcap: float | None = None, sinks: torch.Tensor | None = None):
        raise NotImplementedError

    @property
    def structure(self) -> tuple:
        """What the *structure* of :meth:`saved_like` depends on besides the inputs' shapes."""
        return (type(self).__name__,)

    def saved_like(self, q, k, v, out, sinks, size):
        """What :meth:`forward` on these (compute-order) inputs saves, with empty tensors of its
        shapes and dtypes: ``out`` is the output the forward returns; ``size(n)``: the size to use
        for a count ``n`` that changes with the documents (``int``; an unbacked symbolic size when
        compiling, so the next plan reuses the graph: :mod:`distattn.runtime.ops`). Any other count the
        plan decides belongs in :attr:`structure`. This default: q, k, v, out and the fp32 lse
        ``[S_local, Hq]``."""
        return Saved(q, k, v, out, q.new_empty(q.shape[:2], dtype=acc_dtype(q.dtype)))

    def backward(self, dout, saved, scale: float, softcap: float | None = None, sinks: torch.Tensor | None = None):
        raise NotImplementedError

    def check_agreement(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None, *,
                        sinks: bool = False, softcap: float | None = None) -> None:
        """A ``ValueError`` on every rank unless all ranks of the group pass the same heads,
        head_dim and dtype (and all or none pass sinks, with the same softcap). The ranks compare
        through the group's key-value store (:func:`distattn.distributed.comm.meet_once`: host only, no device
        synchronisation; agreed shapes are remembered, so a plan per training step checks on the
        first step only)."""
        dtype = str(q.dtype).removeprefix("torch.")
        shapes = f"Hq={q.shape[1]}, Hkv={k.shape[1]}, head_dim={q.shape[2]}, dtype={dtype}"
        if v is not None and v.shape[2] != q.shape[2]:
            shapes += f", head_dim_v={v.shape[2]}"
        if sinks:
            shapes += ", sinks"
        if softcap is not None:
            shapes += f", softcap={softcap!r}"
        group = self.agreement_group
        if group is None or dist.get_world_size(group) == 1 or shapes in self._agreed:
            return
        theirs = meet_once(group, "attention", shapes, "the check that all ranks pass the same shapes")
        for r, their_shapes in enumerate(theirs or ()):
            if their_shapes != shapes:
                raise ValueError(f"ranks pass different q/k/v to attention: rank {dist.get_rank()} has ({shapes}) "
                                 f"but rank {_global_rank(group, r)} has ({their_shapes}); every rank of the plan's "
                                 f"group must pass the same heads, head_dim and dtype (and sinks, softcap)")
        self._agreed.add(shapes)


class Computed(NamedTuple):
    """Forward, compute -> finish, of an executor whose rows' out is computed where they live: their
    final out and lse; the compute stage keeps nothing."""

    out: torch.Tensor
    lse: torch.Tensor
    saved: None = None


class OwnRows(Executor):
    """A staged executor whose rows' out is computed on the rank that holds them (the ring family,
    ``allgather``): nothing comes back in the forward, and the finish stage keeps the rank's q, k,
    v, out and lse (:class:`Saved`), what its backward starts from. Subclasses write the other
    stages (``compute_forward`` returns :class:`Computed`)."""

    staged = True

    def finish_forward(self, computed: Computed, q, k, v) -> tuple[torch.Tensor, Saved]:
        return computed.out, Saved(q, k, v, computed.out, computed.lse)

    def forward(self, q, k, v, scale, softcap=None, sinks=None):
        return self.finish_forward(self.compute_forward(self.prefetch(q, k, v), scale, softcap, sinks), q, k, v)

    def backward(self, dout, saved: Saved, scale, softcap=None, sinks=None):
        grads = self.compute_backward(self.start_backward(dout, saved), None, scale, softcap, sinks)
        return (*self.finish_backward(grads), grads.dsinks)


def _global_rank(group, rank: int) -> int:
    return rank if group is dist.group.WORLD else dist.get_global_rank(group, rank)


def finish_rows(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor | None, dtype: torch.dtype):
    """Rows' *final* ``(out, lse)`` (every partial result merged): the sinks counted once
    (:func:`distattn.kernels.merge.add_sink`), out cast to ``dtype``. The saved ``lse`` includes the sinks, so
    the kernels' backward, given these out and lse, yields the exact dq, dk, dv."""
    lse = lse.to(acc_dtype(dtype))   # a running lse (merge.LSE_ACC) becomes the kernels' dtype
    if sinks is not None:
        out, lse = add_sink(out, lse, sinks)
    return out.to(dtype), lse


def pack_kv(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """K ``[T, Hkv, Dk]`` and V ``[T, Hkv, Dv]`` side by side as one ``[T, Hkv, Dk + Dv]`` buffer: what
    executors move and slice by rows. V may have its own head dim (MLA: Dk 192, Dv 128)."""
    return torch.cat([k, v], dim=-1)


def unpack_kv(kv: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The K and V halves of a :func:`pack_kv` buffer (or of its gradient), as views; ``head_dim``:
    K's (q's)."""
    return kv[..., :head_dim], kv[..., head_dim:]


def attention_fwd(*args, **kwargs):
    """:func:`distattn.kernels.varlen_fwd`, marked as attention in a profile (:mod:`distattn.distributed.trace`)."""
    with span(ATTENTION):
        return varlen_fwd(*args, **kwargs)


def attention_bwd(*args, **kwargs):
    """:func:`distattn.kernels.varlen_bwd`, marked as attention in a profile."""
    with span(ATTENTION):
        return varlen_bwd(*args, **kwargs)


def call_fwd(call: KernelCall, q, kv, out_acc, lse_acc, **kernel_args) -> None:
    """Attention of one kernel call (``kv``: a :func:`pack_kv` buffer), merged into the fp32
    accumulators ``out_acc [S_local, Hq, Dv]`` / ``lse_acc [S_local, Hq]``. ``kernel_args``:
    :meth:`Executor.kernel_args`. The kernel returns its fp32 partial out (``partial=True``): rounding
    every partial to bf16 before the merge is what makes a ring's error grow with its size."""
    rows, keys = slice(call.q_lo, call.q_hi), slice(call.k_lo, call.k_hi)
    out, lse = attention_fwd(q[rows], *unpack_kv(kv[keys], q.shape[-1]), call.varlen, partial=True, **kernel_args)
    with span(MERGE):
        merge_(out_acc[rows], lse_acc[rows], out, lse)


def call_bwd(call: KernelCall, dout, q, kv, out, lse, delta, dq_acc, dkv_acc, **kernel_args) -> None:
    """Gradients of one kernel call given the final ``out``/``lse`` and ``delta = rowsum(dout * out)``
    (computed once per backward), added to fp32 ``dq_acc`` and ``dkv_acc`` (``kv``'s layout) as the
    kernel's fp32 partials (``partial=True``)."""
    rows, keys = slice(call.q_lo, call.q_hi), slice(call.k_lo, call.k_hi)
    dq, dk, dv = attention_bwd(dout[rows], q[rows], *unpack_kv(kv[keys], q.shape[-1]), out[rows], lse[rows],
                               call.varlen, delta=delta[rows], partial=True, **kernel_args)
    dq_acc[rows] += dq
    dk_acc, dv_acc = unpack_kv(dkv_acc[keys], q.shape[-1])
    dk_acc += dk
    dv_acc += dv


def out_shape(q: torch.Tensor, v: torch.Tensor) -> tuple[int, ...]:
    """The attention output's shape: q's rows and heads, v's head dim."""
    return (*q.shape[:-1], v.shape[-1])
