"""The hot path makes no host synchronisation: once a plan is made, a forward and backward of every
scheduler calls no ``Tensor.item``/``tolist``/``int(tensor)``/``bool(tensor)``, builds no index
tensor from host data (``torch.from_numpy``/``torch.tensor``/``torch.as_tensor``) and moves no
integer tensor (``.to``/``.cuda``/``.copy_``). Host code inside the local kernel is the kernel's
business (on a GPU it is the launch), so the probe backend lifts the ban while it runs."""

import contextlib

import pytest
import torch
import torch.distributed as dist

import distattn
from conftest import rand_qkv
from distattn.kernels import Backend, Varlen, register_backend, resolve_backend
from distattn.distributed.spawn import run_distributed

DOCS = [30, 3, 1, 50, 7, 2, 19]


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def no_host_sync(log: list, state: dict):
    """Patch the calls that synchronise with (or copy indices to) a device to raise, unless
    ``state["in_kernel"]``."""

    def guard(owner, name, is_bad=lambda *a, **k: True):
        original = getattr(owner, name)

        def patched(*args, **kwargs):
            if not state["in_kernel"] and is_bad(*args, **kwargs):
                log.append(name)
                raise HostSync(f"{name} called on the hot path")
            return original(*args, **kwargs)
        return owner, name, original, patched

    def int_tensor(t, *a, **k):
        return isinstance(t, torch.Tensor) and not t.dtype.is_floating_point and t.dtype != torch.bool

    def copies_int(dst, src, *a, **k):
        return int_tensor(src)

    patches = [guard(torch.Tensor, n) for n in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")]
    patches += [guard(torch, n) for n in ("from_numpy", "tensor", "as_tensor")]
    patches += [guard(torch.Tensor, "to", int_tensor), guard(torch.Tensor, "cuda", int_tensor),
                guard(torch.Tensor, "copy_", copies_int)]
    for owner, name, _, patched in patches:
        setattr(owner, name, patched)
    try:
        yield
    finally:
        for owner, name, original, _ in patches:
            setattr(owner, name, original)


def _probe_backend(state):
    """The CPU flash kernel, with the ban lifted while it runs. Like a GPU backend, it first takes
    the layout's device tensors (under the ban: they must have been prepared with the plan)."""
    inner = resolve_backend("torch", torch.device("cpu"))

    def lifted(fn):
        def run(*args):
            seg = next(a for a in args if isinstance(a, Varlen))
            seg.tensors(args[0].device)
            state["in_kernel"] = True
            try:
                return fn(*args)
            finally:
                state["in_kernel"] = False
        return run
    return Backend("sync-probe", lifted(inner.fwd), lifted(inner.bwd), devices=frozenset({"cpu"}))


def _worker(scheduler, options):
    log: list = []
    q, k, v = rand_qkv(sum(DOCS), sum(DOCS), 4, 2, 8, dtype=torch.float32)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    state = {"in_kernel": False}
    register_backend(_probe_backend(state))
    plan = distattn.plan(DOCS, dist.group.WORLD, scheduler=scheduler, window=None, backend="sync-probe",
                         **options)
    mine = [plan.shard(t).requires_grad_() for t in (q, k, v)]
    grad = plan.shard(dout)
    with no_host_sync(log, state):
        for _ in range(2):  # a second step reuses the same prepared plan
            out = distattn.attention(*mine, plan)
            out.backward(grad)
    # the ban was live: the same calls outside the kernel do raise
    with no_host_sync([], state), pytest.raises(HostSync):
        torch.ones(2, dtype=torch.int64).tolist()
    return log


@pytest.mark.parametrize("scheduler,options", [("ring", {}), ("zigzag", {}), ("allgather", {}),
                                               ("allgather", {"heads_per_step": 1}), ("ulysses", {}),
                                               ("usp", {"ulysses_degree": 2}), ("cad", {})])
def test_attention_makes_no_host_sync(scheduler, options):
    logs = run_distributed(_worker, 4, scheduler, options, timeout=240)
    assert logs == [[]] * 4
