"""The program is what the executor runs: on gloo ranks, every transfer each executor issues, every wait
and every kernel call, recorded where the code makes them (``Comm``, ``Pending.wait``, the kernel
entry points), is its schedule's program, instruction by instruction, forward and backward -- so the
simulator, which times the program, times what the code runs (``distattn/planning/program.py``)."""

import dataclasses
from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed as dist

import distattn
from conftest import rand_qkv
from distattn.distributed.comm import Comm, Pending
from distattn.executors import base, local, task_a2a
from distattn.costmodel.network import default_profile
from distattn.planning.program import CHAIN, RUN, START, WAIT, layer_order
from distattn.planning.schedule import AttnShape
from distattn.distributed.spawn import run_distributed

DOCS = [40, 3, 1, 70, 9, 21]
TWO_NODES = {"network": dataclasses.replace(default_profile(), gpus_per_node=2), "epsilon": 0.01}
CASES = [("ring", {}), ("zigzag", {}), ("zigzag", {"layout": "document"}), ("allgather", {}),
         ("allgather", {"heads_per_step": 1}), ("ulysses", {}), ("ulysses", {"head_groups": 2}),
         ("usp", {"ulysses_degree": 2}), ("usp", {"ulysses_degree": 2, "head_groups": 2}), ("cad", {}),
         ("cad", TWO_NODES), ("cad", {"layout": "zigzag", **TWO_NODES}), ("cad", {"backward": "keep", **TWO_NODES})]
SLICES = distattn.planning.masks.shared_question(40, [50, 30, 24])   # slices sharing query rows and keys


class Recorder:
    """Patches the places the executors issue transfers, wait for them and call kernels; ``events``
    lists ``("start" | "wait" | "run")`` in order (a pending waited twice counts once; consecutive
    kernel calls are one ``run``)."""

    def __init__(self):
        self.events: list[str] = []
        self._patches = []
        for name in ("exchange", "all_gather", "reduce_scatter", "all_to_all", "all_reduce"):
            self._patches.append(mock.patch.object(Comm, name, self._starting(getattr(Comm, name))))
        self._patches.append(mock.patch.object(Pending, "wait", self._waiting(Pending.wait)))
        for module in (base, local, task_a2a):
            for name in ("varlen_fwd", "varlen_bwd"):
                self._patches.append(mock.patch.object(module, name, self._running(getattr(module, name))))

    def _starting(self, real):
        def method(comm, *args, **kwargs):
            self.events.append(START)
            return real(comm, *args, **kwargs)
        return method

    def _waiting(self, real):
        def method(pending, **kwargs):
            if not getattr(pending, "recorded", False):
                pending.recorded = True
                self.events.append(WAIT)
            return real(pending, **kwargs)
        return method

    def _running(self, real):
        def fn(*args, **kwargs):
            if not self.events or self.events[-1] != RUN:
                self.events.append(RUN)
            return real(*args, **kwargs)
        return fn

    def __enter__(self):
        for p in self._patches:
            p.start()
        return self

    def __exit__(self, *exc):
        for p in self._patches:
            p.stop()


def _expected(program, direction: str, rank: int) -> list[tuple[str, bool]]:
    """The program's instructions on ``rank``: ``(op, optional)``; a computation with no FLOPs there
    may or may not call a kernel (cad runs an empty call on a slot without tasks); a chained hop is,
    on CPU, a wait for the hop before and a start."""
    out = []
    for ins in program.direction(direction):
        ph = program.phases[ins.phase]
        if ins.op == CHAIN:
            out += [(WAIT, False), (START, False)]
            continue
        zero = ins.op == RUN and not np.asarray(ph.amount)[(ph.rank == rank) & (ph.steps == ins.step)].any()
        out.append((ins.op, zero))
    return out


def _matches(expected, events) -> bool:
    i = 0
    for op, optional in expected:
        if i < len(events) and events[i] == op:
            i += 1
        elif not optional:
            return False
    return i == len(events)


def _worker(cases):
    out = []
    rank = dist.get_rank()
    for scheduler, options in cases:
        mask = options.pop("mask", None)
        sinks = options.pop("sinks", None)   # a dtype: bf16 sinks add the fp32 sum of their gradient
        docs = [d * 8 for d in DOCS] if options.get("layout") == "document" else DOCS
        plan = distattn.plan(docs, dist.group.WORLD, scheduler=scheduler, mask=mask, **options)
        q, k, v = (plan.shard(t).requires_grad_() for t in rand_qkv(sum(docs), sum(docs), 8, 2, 8))
        s = None if sinks is None else torch.zeros(8, dtype=sinks, requires_grad=True)
        with Recorder() as rec:
            o = distattn.attention(q, k, v, plan, sinks=s)
            forward = list(rec.events)
            o.backward(torch.ones_like(o))
            backward = rec.events[len(forward):]
        program = plan.schedule.call_program(AttnShape(8, 2, 8, 8, narrow_sinks=sinks == torch.bfloat16))
        slot = plan.slot
        out.append((scheduler, str(options), mask is not None,
                    _matches(_expected(program, "forward", slot), forward), forward,
                    _matches(_expected(program, "backward", slot), backward), backward,
                    [i.op for i in program.direction("forward")]))
    return out


def test_every_executor_runs_its_program():
    sinks = [(name, {**options, "sinks": dtype}) for name, options in (CASES[i] for i in (0, 3, 5, 7, 9))
             for dtype in (torch.bfloat16, torch.float32)]
    cases = CASES + [("cad", {"mask": SLICES}), ("ring", {"mask": SLICES}), ("ulysses", {"mask": SLICES}), *sinks]
    for results in run_distributed(_worker, 4, cases, timeout=600):
        for scheduler, options, mask, fwd_ok, fwd, bwd_ok, bwd, program in results:
            assert fwd_ok, (scheduler, options, mask, fwd, program)
            assert bwd_ok, (scheduler, options, mask, bwd)


PIECES = ("pre", "dispatch", "compute", "finish", "post")


def test_layer_order_one_nano_batch_and_ping_pong():
    assert layer_order(2, 1) == tuple((p, 0, layer) for layer in (0, 1) for p in PIECES)
    order = layer_order(3, 2)
    # every piece of every nano-batch and layer exactly once, and each nano-batch's pieces in order
    assert sorted(order) == sorted((p, n, layer) for layer in range(3) for n in (0, 1) for p in PIECES)
    for n in (0, 1):
        assert [(layer, p) for p, m, layer in order if m == n] == [(layer, p) for layer in range(3) for p in PIECES]
    # B's MLP of the layer before runs while A's Q/K/V are in flight, A's MLP while B's out is
    i = order.index(("dispatch", 0, 1))
    assert order[i + 1:i + 3] == (("finish", 1, 0), ("post", 1, 0))
    j = order.index(("compute", 1, 1))
    assert order[j + 1:j + 3] == (("finish", 0, 1), ("post", 0, 1)) and order[-2:] == (("finish", 1, 2), ("post", 1, 2))
    inside = layer_order(1, 2, across_layers=False)
    assert [p for p, _, _ in inside] == ["pre", "dispatch", "pre", "dispatch", "compute", "compute", "finish", "post",
                                         "finish", "post"]


def test_layer_shares_tile_the_order():
    """A framework running its layers one at a time (Megatron) runs each layer's share: together the
    whole order; layer 1's share holds nano-batch B's post of layer 0."""
    from distattn.planning.program import layer_share

    shares = [layer_share(3, i) for i in range(3)]
    assert sum(shares, ()) == layer_order(3, 2)
    assert shares[1][:4] == (("pre", 0, 1), ("dispatch", 0, 1), ("finish", 1, 0), ("post", 1, 0))
    assert shares[2][-2:] == (("finish", 1, 2), ("post", 1, 2))


@pytest.mark.parametrize("nano", [1, 2, 3])
def test_layer_order_covers_each_piece_once(nano):
    order = layer_order(4, nano)
    assert len(order) == len(set(order)) == 4 * nano * len(PIECES)
