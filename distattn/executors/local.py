"""Attention of the whole sequence against itself, no communication: the executor of ``local``
(world size 1) and the inner attention of ``ulysses`` (on its head shard). One kernel call for
a document mask; a mask whose slices share query rows takes one call per group of slices, merged
by log-sum-exp as a ring merges its blocks."""

from __future__ import annotations

import torch

from ..kernels import varlen_bwd, varlen_fwd
from ..kernels.merge import LSE_ACC, acc_dtype, row_delta
from ..distributed.trace import ATTENTION, span
from .base import ExecOptions, Executor, Saved, call_bwd, call_fwd, finish_rows, out_shape, pack_kv, unpack_kv


class LocalExecutor(Executor):
    def __init__(self, schedule, rank: int, comm, backend: str, options: ExecOptions = ExecOptions()):
        super().__init__(schedule, rank, comm, backend, options)
        self.calls = schedule.local_calls
        total = schedule.total_tokens
        whole = len(self.calls) == 1 and (self.calls[0].q_lo, self.calls[0].q_hi, self.calls[0].k_lo,
                                          self.calls[0].k_hi) == (0, total, 0, total)
        self.varlen = self.calls[0].varlen if whole else None  # one call over all rows: no merging

    def device_data(self):
        return [call.varlen for call in self.calls]

    def forward(self, q, k, v, scale, softcap=None, sinks=None):
        kw = self.kernel_args(scale, softcap)
        if self.varlen is not None:
            # sinks rescale the rows once more: keep the kernel's fp32 out until then, so it rounds once
            with span(ATTENTION):
                out, lse = varlen_fwd(q, k, v, self.varlen, partial=sinks is not None, **kw)
        else:
            out = torch.zeros(out_shape(q, v), dtype=acc_dtype(q.dtype), device=q.device)
            lse = torch.full(q.shape[:2], float("-inf"), dtype=LSE_ACC, device=q.device)
            kv = pack_kv(k, v)
            for call in self.calls:
                call_fwd(call, q, kv, out, lse, **kw)
        out, lse = finish_rows(out, lse, sinks, q.dtype)  # a row's whole result: count the sinks here
        return out, Saved(q, k, v, out, lse)

    def backward(self, dout, saved: Saved, scale, softcap=None, sinks=None):
        q, k, v, out, lse = saved
        kw = self.kernel_args(scale, softcap)
        if self.varlen is not None:
            delta = None if sinks is None else row_delta(dout, out)
            with span(ATTENTION):
                dq, dk, dv = varlen_bwd(dout, q, k, v, out, lse, self.varlen, delta=delta, partial=self.options.inner,
                                        **kw)
            return dq.to(q.dtype), dk, dv, self.sink_grad(delta, lse, sinks)
        dtype = acc_dtype(q.dtype)
        delta = row_delta(dout, out)
        dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
        kv = pack_kv(k, v)
        dkv = torch.zeros(kv.shape, dtype=dtype, device=q.device)
        for call in self.calls:
            call_bwd(call, dout, q, kv, out, lse, delta, dq, dkv, **kw)
        dk, dv = unpack_kv(dkv.to(self.options.kv_grad_dtype(k.dtype)), k.shape[-1])
        return dq.to(q.dtype), dk, dv, self.sink_grad(delta, lse, sinks)
