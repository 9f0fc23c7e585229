"""cad's executor overlaps what the schedule says it overlaps: ping_pong of nano-batches hides every
all-to-all behind the other nano-batch's compute in forward and backward (exact vs the sequential
run, gradients of inputs and parameters included), transfers are issued before the computation that
hides them and waited for after it, and the backward sends what the workers lack -- dout (``keep``),
or Q, out, dout, lse and K/V again (``resend``) -- and dQ, dK/dV back."""

import dataclasses

import pytest
import torch
import torch.distributed as dist

import distattn
from conftest import BackwardMark, max_err
from distattn.executors import task_a2a
from distattn.costmodel.network import default_profile
from distattn.runtime.pingpong import ping_pong
from distattn.distributed.spawn import run_distributed

HQ, HKV, D, HIDDEN = 4, 2, 8, 16
NANO_DOCS = [[40, 7, 3], [90, 1], [12, 60, 2]]


def _layer(seed=2, dtype=torch.float64, log=None):
    """A toy layer with parameters: QKV projection (weight and bias) before, output projection and
    residual after. ``log``: records ("pre"|"post", i) calls and, in backward, when the gradient
    reaches post's output ("post' start"), post's attention input ("post' end") and pre's input
    ("pre' end")."""
    g = torch.Generator().manual_seed(seed)
    w_qkv = (torch.randn(HIDDEN, (HQ + 2 * HKV) * D, generator=g, dtype=torch.float64) / 4).to(dtype)
    b_qkv = torch.randn((HQ + 2 * HKV) * D, generator=g, dtype=torch.float64).to(dtype)
    w_out = (torch.randn(HQ * D, HIDDEN, generator=g, dtype=torch.float64) / 6).to(dtype)
    params = [w.requires_grad_() for w in (w_qkv, b_qkv, w_out)]
    names: dict[int, int] = {}

    def mark(t, event, i):
        return BackwardMark.apply(t, log, (event, i)) if log is not None else t

    def pre(x):
        i = names.setdefault(id(x), len(names))
        if log is not None:
            log.append(("pre", i))
        y = mark(x, "pre' end", i) @ w_qkv + b_qkv
        q, k, v = y.split([HQ * D, HKV * D, HKV * D], dim=-1)
        return q.reshape(-1, HQ, D), k.reshape(-1, HKV, D), v.reshape(-1, HKV, D)

    def post(o, x):
        i = names[id(x)]
        if log is not None:
            log.append(("post", i))
        y = x + torch.tanh(mark(o, "post' end", i).reshape(o.shape[0], -1) @ w_out)
        return mark(y, "post' start", i)

    return pre, post, params


def _inputs(nano_docs, dtype=torch.float64, backend="reference", gpus_per_node=None, backward="resend"):
    """One cad plan per nano-batch (``gpus_per_node``: nodes of that many ranks, so that rows take
    several hops: distattn/schedulers/cad/cast.py)."""
    nodes = {} if gpus_per_node is None else {
        "network": dataclasses.replace(default_profile(), gpus_per_node=gpus_per_node), "epsilon": 0.01}
    plans = [distattn.plan(d, dist.group.WORLD, scheduler="cad", backend=backend, backward=backward, **nodes)
             for d in nano_docs]
    g = torch.Generator().manual_seed(0)
    xs = [p.shard(torch.randn(sum(d), HIDDEN, generator=g, dtype=torch.float64)).to(dtype)
          for p, d in zip(plans, nano_docs)]
    return plans, xs


def _run(mode, pre, post, xs, plans, params):
    xs = [x.clone().requires_grad_() for x in xs]
    for p in params:
        p.grad = None
    if mode == "sequential":
        ys = [post(distattn.attention(*pre(x), p), x) for x, p in zip(xs, plans)]
    else:
        ys = ping_pong(pre, post, xs, plans)
    loss = sum(((y * (j + 1)) ** 2).sum() for j, y in enumerate(ys))
    loss.backward()
    return [y.detach() for y in ys] + [x.grad for x in xs] + [p.grad.clone() for p in params]


def _exact_worker(n_nano, gpus_per_node=None, backward="resend"):
    nano_docs = NANO_DOCS[:n_nano]
    plans, xs = _inputs(nano_docs, gpus_per_node=gpus_per_node, backward=backward)
    pre, post, params = _layer()
    seq = _run("sequential", pre, post, xs, plans, params)
    pp = _run("ping_pong", pre, post, xs, plans, params)
    errs = [max_err(a, b) for a, b in zip(seq, pp)]
    # functional gradients (torch.autograd.grad) see the parameters too, and no-grad forward works
    xs_g = [x.clone().requires_grad_() for x in xs]
    ys = ping_pong(pre, post, xs_g, plans)
    loss = sum(((y * (j + 1)) ** 2).sum() for j, y in enumerate(ys))
    grads = torch.autograd.grad(loss, xs_g + params)
    errs += [max_err(a, b) for a, b in zip(grads, seq[n_nano:], strict=True)]
    with torch.no_grad():
        ys = ping_pong(pre, post, xs, plans)
        errs += [max_err(a, b) for a, b in zip(ys, seq[:n_nano])]
        # attention(prefetch=): the forward dispatch started early by hand
        qkv = [pre(x) for x in xs]
        started = [p.prefetch(*t) for p, t in zip(plans, qkv)]
        ys = [post(distattn.attention(*t, p, prefetch=s), x) for t, p, s, x in zip(qkv, plans, started, xs)]
        errs += [max_err(a, b) for a, b in zip(ys, seq[:n_nano])]
    return max(errs), len(seq), max(max(p.schedule.hops) for p in plans)


@pytest.mark.parametrize("world_size,n_nano,gpus_per_node,backward", [
    (2, 2, None, "resend"), (4, 2, None, "resend"), (4, 3, None, "resend"), (4, 2, 2, "resend"), (4, 2, 2, "keep")])
def test_ping_pong_is_exact_with_all_gradients(world_size, n_nano, gpus_per_node, backward):
    for err, count, hops in run_distributed(_exact_worker, world_size, n_nano, gpus_per_node, backward, timeout=300):
        assert count == 2 * n_nano + 3
        assert (hops > 1) == (gpus_per_node is not None)   # several nodes: rows relayed
        assert err <= 1e-12


def _order_worker(backward):
    plans, xs = _inputs(NANO_DOCS[:2], backward=backward)
    log: list = []
    pre, post, params = _layer(log=log)
    comms = {id(p._runtime.executor.pool_comm) for p in plans}
    assert len(comms) == 2  # one communicator per plan: transfers are told apart by it

    def logged_comm(plan, i):
        comm = plan._runtime.executor.pool_comm
        original = comm.all_to_all

        def all_to_all(output, input, output_splits, input_splits, what):
            pending = original(output, input, output_splits, input_splits, what)
            name = what.split(": ")[1].split(" to ")[0]
            log.append(("issue " + name, i))
            wait = pending.wait

            def logged_wait(**kwargs):
                wait(**kwargs)
                log.append(("wait " + name, i))
            pending.wait = logged_wait
            return pending
        comm.all_to_all = all_to_all

    for i, p in enumerate(plans):
        logged_comm(p, i)
    varlens = {id(call[0]): i for i, p in enumerate(plans) for call in p._runtime.executor.calls}
    fwd, bwd = task_a2a.varlen_fwd, task_a2a.varlen_bwd

    def logged_fwd(q, k, v, seg, **kw):
        log.append(("attention", varlens[id(seg)]))
        return fwd(q, k, v, seg, **kw)

    def logged_bwd(dout, q, k, v, out, lse, seg, **kw):
        log.append(("attention'", varlens[id(seg)]))
        return bwd(dout, q, k, v, out, lse, seg, **kw)

    task_a2a.varlen_fwd, task_a2a.varlen_bwd = logged_fwd, logged_bwd
    try:
        xs = [x.clone().requires_grad_() for x in xs]
        ys = ping_pong(pre, post, xs, plans)
        forward = list(log)
        log.clear()
        sum((y ** 2).sum() for y in ys).backward()
        backward = list(log)
    finally:
        task_a2a.varlen_fwd, task_a2a.varlen_bwd = fwd, bwd
    return forward, backward


FORWARD = [("pre", 0), ("issue Q", 0), ("issue K/V", 0),
           ("pre", 1), ("issue Q", 1), ("issue K/V", 1),
           ("wait Q", 0), ("wait K/V", 0), ("attention", 0), ("issue out", 0),
           ("wait Q", 1), ("wait K/V", 1), ("attention", 1), ("issue out", 1),
           ("wait out", 0), ("post", 0),
           ("wait out", 1), ("post", 1)]
BACKWARD = [("post' start", 1), ("post' end", 1), ("issue dout", 1),
            ("post' start", 0), ("post' end", 0), ("issue dout", 0),
            ("wait dout", 1), ("attention'", 1), ("issue dQ", 1), ("issue dK/dV", 1),
            ("wait dout", 0), ("attention'", 0), ("issue dQ", 0), ("issue dK/dV", 0),
            ("wait dQ", 1), ("wait dK/dV", 1), ("pre' end", 1),
            ("wait dQ", 0), ("wait dK/dV", 0), ("pre' end", 0)]
ROWS = "Q, out, dout, lse"   # what resend's backward sends the workers (K/V apart)


def _resend(events):
    """``keep``'s order as ``resend`` runs it: lse back beside out, the rows and K/V in place of dout."""
    swap = {"issue out": ["issue out", "issue lse"], "wait out": ["wait out", "wait lse"],
            "issue dout": [f"issue {ROWS}", "issue K/V"], "wait dout": [f"wait {ROWS}", "wait K/V"]}
    return [(e, i) for event, i in events for e in swap.get(event, [event])]


def _hidden(events, transfer, i, behind):
    """``transfer`` of nano-batch ``i`` is issued before the events ``behind`` and waited after them."""
    issue, wait = events.index(("issue " + transfer, i)), events.index(("wait " + transfer, i))
    spots = [events.index(e) for e in behind]
    return issue < min(spots) and wait > max(spots)


@pytest.mark.parametrize("backward", ["resend", "keep"])
def test_transfers_issued_before_the_compute_that_hides_them(backward):
    resend = backward == "resend"
    to_workers = [ROWS, "K/V"] if resend else ["dout"]
    for forward, backward in run_distributed(_order_worker, 2, backward, timeout=300):
        assert forward == (_resend(FORWARD) if resend else FORWARD)
        assert backward == (_resend(BACKWARD) if resend else BACKWARD)
        # forward: Q, K/V 0 behind pre 1; Q, K/V 1 behind attention 0; out 0 behind attention 1; out 1 behind post 0
        assert _hidden(forward, "Q", 0, [("pre", 1)]) and _hidden(forward, "K/V", 0, [("pre", 1)])
        assert _hidden(forward, "Q", 1, [("attention", 0)]) and _hidden(forward, "K/V", 1, [("attention", 0)])
        assert _hidden(forward, "out", 0, [("attention", 1)])
        assert _hidden(forward, "out", 1, [("post", 0)])
        # backward: dout (resend: the rows and K/V) 1 behind post 0'; 0 behind attention 1'; dQ, dK/dV 1
        # behind attention 0'; dQ, dK/dV 0 behind pre 1'
        for name in to_workers:
            assert _hidden(backward, name, 1, [("post' start", 0), ("post' end", 0)])
            assert _hidden(backward, name, 0, [("attention'", 1)])
        assert _hidden(backward, "dQ", 1, [("attention'", 0)]) and _hidden(backward, "dK/dV", 1, [("attention'", 0)])
        assert _hidden(backward, "dQ", 0, [("pre' end", 1)]) and _hidden(backward, "dK/dV", 0, [("pre' end", 1)])


def _bytes_worker(dtype, backward):
    docs = [300, 12, 5, 40, 1, 70]
    plan = distattn.plan(docs, dist.group.WORLD, scheduler="cad", backend="reference", backward=backward)
    g = torch.Generator().manual_seed(0)
    q, k, v = (plan.shard(torch.randn(sum(docs), h, D, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
               for h in (HQ, HKV, HKV))
    sent: list = []
    comm = plan._runtime.executor.pool_comm
    original = comm.all_to_all

    def all_to_all(output, input, output_splits, input_splits, what):
        sent.append((what, input.dtype, (sum(input_splits) - input_splits[comm.rank]) * input.element_size()))
        return original(output, input, output_splits, input_splits, what)
    comm.all_to_all = all_to_all

    before = plan.bytes_sent()
    out = distattn.attention(q, k, v, plan)
    forward = plan.bytes_sent() - before
    fwd_calls = list(sent)
    sent.clear()
    out.backward(torch.ones_like(out))
    backward_bytes = plan.bytes_sent() - before - forward

    tr, me = plan.schedule.traffic(), plan._runtime.executor.slot
    out, into = (tr.owner == me) & (tr.comp != me), (tr.comp == me) & (tr.owner != me)
    q_out, kv_out = tr.q[out].sum(), tr.kv[out].sum()   # my Q rows computed elsewhere, my K/V rows sent
    q_in, kv_in = tr.q[into].sum(), tr.kv[into].sum()   # others' Q rows I compute, their K/V rows I receive
    size, acc = torch.empty(0, dtype=dtype).element_size(), torch.empty(0, dtype=torch.float32).element_size()
    acc = max(acc, size)
    q_b, kv_b, lse_b = HQ * D * size, 2 * HKV * D * size, HQ * acc
    back = q_in * q_b + kv_in * 2 * HKV * D * acc   # dQ and dK/dV to their owners
    if backward == "resend":   # lse back beside out; Q, out, dout, lse and K/V again
        want_fwd = q_out * q_b + kv_out * kv_b + q_in * (q_b + lse_b)
        want_bwd = q_out * (3 * q_b + lse_b) + kv_out * kv_b + back
    else:
        want_fwd = q_out * q_b + kv_out * kv_b + q_in * q_b
        want_bwd = q_out * q_b + back
    return ([w for w, _, _ in fwd_calls], [(w, t) for w, t, _ in sent], int(forward), int(want_fwd),
            int(backward_bytes), int(want_bwd), sum(b for _, _, b in sent))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("backward", ["resend", "keep"])
def test_backward_sends_what_the_workers_lack(dtype, backward):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    fwd_want = ["cad forward: Q to workers", "cad forward: K/V to workers", "cad forward: out to owners"]
    bwd_want = [("cad backward: dout to workers", dtype)]
    if backward == "resend":
        fwd_want.append("cad forward: lse to owners")
        bwd_want = [("cad backward: Q, out, dout, lse to workers", dtype), ("cad backward: K/V to workers", dtype)]
    bwd_want += [("cad backward: dQ to owners", dtype), ("cad backward: dK/dV to owners", acc)]
    for fwd_calls, bwd_calls, fwd, want_fwd, bwd, want_bwd, counted in run_distributed(_bytes_worker, 4, dtype,
                                                                                       backward, timeout=300):
        assert fwd_calls == fwd_want
        assert bwd_calls == bwd_want
        assert fwd == want_fwd and bwd == want_bwd == counted


def _sync_free_worker():
    from test_sync_free import _probe_backend, no_host_sync

    log: list = []
    state = {"in_kernel": False}
    distattn.kernels.register_backend(_probe_backend(state))
    plans, xs = _inputs(NANO_DOCS[:2], dtype=torch.float32, backend="sync-probe")
    pre, post, params = _layer(dtype=torch.float32)
    xs = [x.requires_grad_() for x in xs]
    with no_host_sync(log, state):
        for _ in range(2):
            sum(y.sum() for y in ping_pong(pre, post, xs, plans)).backward()
    return log


def test_ping_pong_makes_no_host_sync():
    assert run_distributed(_sync_free_worker, 2, timeout=300) == [[]] * 2
