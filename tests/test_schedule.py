"""Schedules are data: the phases say exactly which bytes move when (forward and backward, step by step,
checked against what the executors send), dry and live plans share one schedule, and the simulator
hides a transfer only behind what the program computes between its start and its wait."""

from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed as dist

import distattn
from conftest import rand_qkv
from distattn.distributed.comm import Comm
from distattn.planning.schedule import AttnShape, Phase
from distattn.distributed.spawn import run_distributed

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
        phases = plan.schedule.phases(AttnShape(4, 2, 8, dtype_bytes=4))
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
            (a.direction, a.op, a.what, a.span) == (b.direction, b.op, b.what, b.span)
            and np.array_equal(a.rank, b.rank) and np.array_equal(a.amount, b.amount)
            and np.array_equal(a.steps, b.steps)
            for a, b in zip(live.schedule.phases(AttnShape(8, 2, 16)), dry.schedule.phases(AttnShape(8, 2, 16)),
                            strict=True))
        out.append((scheduler, type(live.schedule) is type(dry.schedule) and live.layout.owned == dry.layout.owned
                    and same_phases, dry.rank is None and live.rank == dist.get_rank()))
    return out


def test_dry_and_live_plans_share_one_schedule():
    for rank_results in run_distributed(_dry_live_worker, 4, timeout=300):
        for scheduler, same, executors in rank_results:
            assert same and executors, scheduler


def test_stats_are_the_forward_phases():
    plan = distattn.plan([300, 17, 1, 500], 8, scheduler="zigzag")
    phases, st = plan.schedule.phases(AttnShape(8, 2, 64)), plan.stats(8, 2, 64)
    fwd = [ph for ph in phases if ph.direction == "forward"]
    assert st["flops"] == sum(ph.total(8) for ph in fwd if not ph.is_comm).tolist()
    assert st["send_bytes"] == sum(ph.total(8) for ph in fwd if ph.is_comm).tolist()
    # the K/V ring runs under each step: start, the step's attention, wait -- step 0's start at dispatch
    program = plan.schedule.program(AttnShape(8, 2, 64))
    assert [(i.op, i.step) for i in program.stage("dispatch")] == [("start", 0)]
    calls = [(i.op, i.step) for i in program.direction("forward")]
    assert calls == [(op, t) for t in range(8) for op in ("start", "run", "wait")]


def test_replay_hides_a_transfer_only_behind_what_runs_before_its_wait():
    """Two ranks: a transfer hides behind the computation between its start and its wait, no more;
    one waited for at once is exposed whole; a collective begins when its group has issued it; a
    chained hop waits for the one before on a side stream (GPU) or in the process (CPU)."""
    from distattn.planning.program import CHAIN, RUN, START, WAIT
    from distattn.sim.replay import Op, replay

    def ops(*items):
        return [Op(op, np.asarray(sec, dtype=np.float64), key, span=2, after=after)
                for op, sec, key, after in items]
    hidden = ops((START, [1.5, 0.5], "t", None), (RUN, [1.0, 1.0], None, None), (WAIT, [0, 0], "t", None))
    r = replay(hidden, 2)
    assert r.end.tolist() == [1.5, 1.0] and r.stalled.tolist() == [0.5, 0.0] and r.compute.tolist() == [1.0, 1.0]
    exposed = ops((RUN, [1.0, 0.0], None, None), (START, [0.7, 0.7], "t", None), (WAIT, [0, 0], "t", None))
    r = replay(exposed, 2)    # rank 1 issues at 0 but its group's rank 0 only at 1: both end at 1.7
    assert r.end.tolist() == pytest.approx([1.7, 1.7]) and replay(exposed, 2, comm=False).end.tolist() == [1.0, 1.0]
    chained = ops((START, [1.0, 1.0], "h1", None), (CHAIN, [1.0, 1.0], "h2", "h1"), (RUN, [3.0, 3.0], None, None),
                  (WAIT, [0, 0], "h2", None))
    assert replay(chained, 2).end.tolist() == [3.0, 3.0]                  # both hops behind the 3 s
    assert replay(chained, 2, streams=False).end.tolist() == [4.0, 4.0]   # hop 1 waited for, hop 2 behind the 3 s


def test_cpu_replay_shares_the_cores_among_the_ranks_computing():
    """``simulate --calibrate``'s CPU model: ranks computing at once share the cores (one core, two
    ranks of 1 s each: both end at 2 s); a rank waiting for a transfer leaves its share to the others
    (rank 1's 1 s alone once rank 0 waits); gloo's wait blocks the process."""
    from distattn.planning.program import RUN, START, WAIT
    from distattn.sim.calibrate import replay_shared
    from distattn.sim.replay import Op

    def ops(*items):
        return [Op(op, np.asarray(sec, dtype=np.float64), key, span=2) for op, sec, key in items]
    end, stalled = replay_shared(ops((RUN, [1.0, 1.0], None)), 2, cores=1)
    assert end.tolist() == pytest.approx([2.0, 2.0]) and stalled.tolist() == [0, 0]
    end, stalled = replay_shared(ops((RUN, [1.0, 1.0], None)), 2, cores=2)
    assert end.tolist() == pytest.approx([1.0, 1.0])
    # rank 0 computes 0.5 s then waits for a 0.25 s transfer its group starts when rank 1 issues it
    waiting = ops((RUN, [0.5, 2.0], None), (START, [0.25, 0.25], "t"), (WAIT, [0, 0], "t"))
    end, stalled = replay_shared(waiting, 2, cores=1)
    # both at half a core until 1 s (rank 0 done), rank 1 alone: its 1.5 s left end at 2.5 s; transfer 2.5-2.75
    assert end.tolist() == pytest.approx([2.75, 2.75]) and stalled.tolist() == pytest.approx([1.75, 0.25])


def test_attn_shape_validates():
    with pytest.raises(ValueError, match="num_heads \\(6\\) must be a multiple of num_kv_heads \\(4\\)"):
        AttnShape(6, 4, 8)
    with pytest.raises(ValueError, match="dtype_bytes must be a positive int"):
        AttnShape(8, 2, 8, 0)
