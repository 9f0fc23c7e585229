"""Schedules are data: the phases say exactly which bytes move when (forward and backward, step by step,
checked against what the executors send), dry and live plans share one schedule, and the simulator
charges what the phases say is exposed."""

from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed as dist

import distattn
from conftest import rand_qkv
from distattn.comm import Comm
from distattn.schedule import AttnShape, Phase
from distattn.spawn import run_distributed

DOCS = [40, 3, 1, 70, 9, 21]
CASES = [("ring", {}), ("zigzag", {}), ("zigzag", {"layout": "document"}), ("allgather", {}),
         ("allgather", {"heads_per_step": 1}), ("ulysses", {}), ("usp", {"ulysses_degree": 2}), ("cad", {})]


def _sent_by_call():
    """Patch Comm so that every call records (what, bytes it counted)."""
    calls = []

    def recording(name):
        real = getattr(Comm, name)

        def method(self, *args, **kwargs):
            before = self.bytes_sent
            pending = real(self, *args, **kwargs)
            calls.append((args[-1] if isinstance(args[-1], str) else kwargs.get("what"), self.bytes_sent - before))
            return pending
        return method

    patches = [mock.patch.object(Comm, name, recording(name))
               for name in ("exchange", "all_gather", "reduce_scatter", "all_to_all")]
    return calls, patches


def _phase_worker(cases):
    out = []
    rank = dist.get_rank()
    for scheduler, options in cases:
        docs = [d * 8 for d in DOCS] if options.get("layout") == "document" else DOCS  # multiples of 2 * cp
        q, k, v = rand_qkv(sum(docs), sum(docs), 4, 2, 8, dtype=torch.float32)
        plan = distattn.plan(docs, dist.group.WORLD, scheduler=scheduler, **options)
        mine = [plan.shard(t).requires_grad_() for t in (q, k, v)]
        calls, patches = _sent_by_call()
        for p in patches:
            p.start()
        try:
            o = distattn.attention(*mine, plan)
            forward = list(calls)
            o.backward(torch.ones_like(o))
            backward = calls[len(forward):]
        finally:
            for p in patches:
                p.stop()
        phases = plan.phases(4, 2, 8, dtype_bytes=4)
        want = {d: sum(int(ph.total(plan.schedule.stat_ranks)[rank]) for ph in phases
                       if ph.is_comm and ph.direction == d) for d in ("forward", "backward")}
        got = {"forward": sum(b for _, b in forward), "backward": sum(b for _, b in backward)}
        steps = None
        if scheduler in ("ring", "zigzag"):  # step by step: "<name> forward step t (rank r)"
            steps = {}
            for what, b in forward + backward:
                direction, t = what.split()[1], int(what.split()[3])
                steps[(direction, t)] = steps.get((direction, t), 0) + b
            planned = {}
            for ph in phases:
                if ph.is_comm:
                    for r, t, a in zip(ph.rank.tolist(), ph.steps.tolist(), ph.amount.tolist()):
                        if r == rank:
                            planned[(ph.direction, t)] = planned.get((ph.direction, t), 0) + a
            steps = ({k: v for k, v in steps.items() if v}, planned)
        out.append((scheduler, options, got, want, steps))
    return out


def test_phases_are_the_bytes_each_rank_sends_forward_and_backward():
    for rank_results in run_distributed(_phase_worker, 4, CASES, timeout=600):
        for scheduler, options, got, want, steps in rank_results:
            assert got == want, (scheduler, options, got, want)
            if steps is not None:
                assert steps[0] == steps[1], (scheduler, options, steps)


def _dry_live_worker():
    out = []
    for scheduler, options in CASES:
        docs = [d * 8 for d in DOCS] if options.get("layout") == "document" else DOCS
        live = distattn.plan(docs, dist.group.WORLD, scheduler=scheduler, **options)
        dry = distattn.plan(docs, 4, scheduler=scheduler, **options)
        same_phases = all(
            (a.direction, a.op, a.what, a.span, a.overlaps) == (b.direction, b.op, b.what, b.span, b.overlaps)
            and np.array_equal(a.rank, b.rank) and np.array_equal(a.amount, b.amount)
            and np.array_equal(a.steps, b.steps)
            for a, b in zip(live.phases(8, 2, 16), dry.phases(8, 2, 16), strict=True))
        out.append((scheduler, type(live.schedule) is type(dry.schedule) and live.owned == dry.owned and same_phases,
                    dry.executor is None and live.executor is not None))
    return out


def test_dry_and_live_plans_share_one_schedule():
    for rank_results in run_distributed(_dry_live_worker, 4, timeout=300):
        for scheduler, same, executors in rank_results:
            assert same and executors, scheduler


def test_stats_are_the_forward_phases():
    plan = distattn.plan([300, 17, 1, 500], 8, scheduler="zigzag")
    phases, st = plan.phases(8, 2, 64), plan.stats(8, 2, 64)
    fwd = [ph for ph in phases if ph.direction == "forward"]
    assert st["flops"] == sum(ph.total(8) for ph in fwd if not ph.is_comm).tolist()
    assert st["send_bytes"] == sum(ph.total(8) for ph in fwd if ph.is_comm).tolist()
    assert {ph.overlaps for ph in fwd if ph.is_comm} == {"attention"}  # the K/V ring runs under each step


def test_simulator_charges_what_the_phases_leave_exposed():
    """One rank, one step of 1 s of attention (at 1 FLOP/s): a transfer under it is hidden up to that
    second; one overlapping nothing is exposed whole; one under the layers hides behind the linear time."""
    from distattn.sim.simulate import layer_times

    class Net:  # seconds = bytes
        @staticmethod
        def time(op, n, size):
            return np.asarray(size, dtype=np.float64) * (1 if op == "send_recv" else (n - 1) / n)

    one = np.ones(1, dtype=np.int64)

    def phase(op, amount, step=0, overlaps=None, direction="forward"):
        return Phase(direction, op, op, 2, np.zeros(1, dtype=np.int64), amount * one, step * one, overlaps)

    attention = [phase("attention", 1), phase("attention", 2, step=1)]
    cases = [([phase("send_recv", 1.5, overlaps="attention")], 0.5),                # 1.5 s under 1 s
             ([phase("send_recv", 1.5, step=1, overlaps="attention")], 0.0),        # under step 1's 2 s
             ([phase("send_recv", 0.7)], 0.7),                                      # exposed
             ([phase("all_to_all", 5, overlaps="layers")], 5 - 3 - 1),              # 3 s of attention, 1 s linear
             ([phase("send_recv", 0.5, step=2, overlaps="attention")], 0.5)]        # a step with no attention
    for comm, exposed in cases:
        t = layer_times(attention + comm, 1, Net, 1.0, np.array([3.0]))
        assert t["attention"][0] == pytest.approx(3) and t["exposed"][0] == pytest.approx(max(exposed, 0)), comm


def test_attn_shape_validates():
    with pytest.raises(ValueError, match="num_heads \\(6\\) must be a multiple of num_kv_heads \\(4\\)"):
        AttnShape(6, 4, 8)
    with pytest.raises(ValueError, match="dtype_bytes must be a positive int"):
        AttnShape(8, 2, 8, 0)
