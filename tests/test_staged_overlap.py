"""Every schedule hides behind the other nano-batch (issue 66): the executors of ``ring``, ``zigzag``,
``allgather``, ``ulysses`` and ``usp`` run in stages as ``cad``'s does (``distattn.executors.base``),
so ``ping_pong`` of two nano-batches is exact against running them one after the other (fp64, every
gradient), each scheduler's exchange is in flight while the other nano-batch's layers compute, in
the forward and the backward, and the trainer's step with ``parallel.nano_batches: 2`` equals one
nano-batch's (fp64, FSDP2, a resume in between). ``cad``'s own order: ``tests/test_cad_overlap.py``."""

import numpy as np
import pytest
import torch
import torch.distributed as dist

import distattn
from conftest import BackwardMark, max_err
from distattn.distributed.comm import Comm
from distattn.runtime.pingpong import ping_pong
from distattn.distributed.spawn import run_distributed

HQ, HKV, D, HIDDEN = 8, 2, 8, 16
NANO_DOCS = [[40, 7, 3], [90, 1, 22]]
CASES = [("ring", {}), ("zigzag", {}), ("allgather", {}), ("allgather", {"heads_per_step": 1}), ("ulysses", {}),
         ("ulysses", {"head_groups": 2}), ("usp", {"ulysses_degree": 2}),
         ("usp", {"ulysses_degree": 2, "head_groups": 2})]
TRANSFERS = ("exchange", "all_gather", "reduce_scatter", "all_to_all")


def _layer(log: list):
    """QKV projection before attention, output projection and residual after; ``log`` records
    ("pre"|"post", i) and, in the backward, when the gradient leaves post (("post'", i))."""
    g = torch.Generator().manual_seed(2)
    w_qkv = torch.randn(HIDDEN, (HQ + 2 * HKV) * D, generator=g, dtype=torch.float64) / 4
    w_out = torch.randn(HQ * D, HIDDEN, generator=g, dtype=torch.float64) / 6
    params = [w.requires_grad_() for w in (w_qkv, w_out)]
    names: dict[int, int] = {}

    def pre(x):
        i = names.setdefault(id(x), len(names))
        log.append(("pre", i))
        q, k, v = (x @ w_qkv).split([HQ * D, HKV * D, HKV * D], dim=-1)
        return q.reshape(-1, HQ, D), k.reshape(-1, HKV, D), v.reshape(-1, HKV, D)

    def post(o, x):
        i = names[id(x)]
        log.append(("post", i))
        return x + torch.tanh(BackwardMark.apply(o, log, ("post'", i)).reshape(o.shape[0], -1) @ w_out)

    return pre, post, params, names


class _Transfers:
    """Logs ``("issue" | "wait", nano-batch, n)`` for every transfer of the plans' communicators."""

    def __init__(self, plans, log: list):
        self.owner = {id(c): i for i, p in enumerate(plans) for c in p._live("attention").executor.comms}
        self.log, self.count, self.real = log, 0, {}

    def __enter__(self):
        for name in TRANSFERS:
            self.real[name] = getattr(Comm, name)
            setattr(Comm, name, self._wrap(self.real[name]))
        return self

    def __exit__(self, *exc):
        for name, fn in self.real.items():
            setattr(Comm, name, fn)

    def _wrap(self, real):
        def method(comm, *args, **kwargs):
            pending = real(comm, *args, **kwargs)
            if id(comm) not in self.owner:
                return pending
            n, self.count = self.count, self.count + 1
            self.log.append(("issue", self.owner[id(comm)], n))
            wait = pending.wait

            def logged(**kw):
                if ("wait", self.owner[id(comm)], n) not in self.log:
                    self.log.append(("wait", self.owner[id(comm)], n))
                return wait(**kw)
            pending.wait = logged
            return pending
        return method


def _hidden(events: list, nano: int, behind) -> bool:
    """Some transfer of ``nano`` issued before event ``behind`` and waited for after it."""
    at = events.index(behind)
    issued = {n for op, i, n in (e for e in events[:at] if e[0] == "issue") if i == nano}
    return any(e[0] == "wait" and e[1] == nano and e[2] in issued for e in events[at:])


def _run(layer, xs, plans, staged: bool):
    pre, post, params, names = layer
    names.clear()   # nano-batch i: the i-th input pre sees
    xs = [x.clone().requires_grad_() for x in xs]
    for p in params:
        p.grad = None
    if staged:
        ys = ping_pong(pre, post, xs, plans)
    else:
        ys = [post(distattn.attention(*pre(x), p), x) for x, p in zip(xs, plans)]
    sum(((y * (j + 1)) ** 2).sum() for j, y in enumerate(ys)).backward()
    return [y.detach() for y in ys] + [x.grad for x in xs] + [p.grad.clone() for p in params]


def _worker(cases):
    out = []
    for scheduler, options in cases:
        plans = [distattn.plan(d, dist.group.WORLD, scheduler=scheduler, backend="reference", **options)
                 for d in NANO_DOCS]
        g = torch.Generator().manual_seed(0)
        xs = [p.shard(torch.randn(sum(d), HIDDEN, generator=g, dtype=torch.float64)) for p, d in zip(plans, NANO_DOCS)]
        log: list = []
        layer = _layer(log)
        seq = _run(layer, xs, plans, staged=False)
        log.clear()
        with _Transfers(plans, log):
            pp = _run(layer, xs, plans, staged=True)
        cut = next(i for i, e in enumerate(log) if e[0] == "post'")
        forward, backward = log[:cut], log[cut:]
        out.append((scheduler, options, max(max_err(a, b) for a, b in zip(seq, pp, strict=True)),
                    _hidden(forward, 0, ("pre", 1)), _hidden(forward, 1, ("post", 0)),
                    _hidden(backward, 1, ("post'", 0)), forward, backward))
    return out


def test_every_schedule_hides_behind_the_other_nano_batch():
    """4 ranks, fp64: ping-pong equals the sequential run (outputs, input and parameter gradients, to
    1e-12); nano-batch A's first transfer is in flight while B's QKV projection runs, B's first
    backward transfer while A's output projection's backward runs, and where the forward sends out
    back (ulysses, usp) B's while A's output projection runs."""
    for results in run_distributed(_worker, 4, CASES, timeout=600):
        for scheduler, options, err, first, back_out, backward, fwd_log, bwd_log in results:
            assert err <= 1e-12, (scheduler, options, err)
            assert first, (scheduler, options, fwd_log)
            assert backward, (scheduler, options, bwd_log)
            assert back_out == (scheduler in ("ulysses", "usp")), (scheduler, options, fwd_log)


MODEL = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64}


def _corpus(folder) -> str:
    """Short documents (20-400 tokens): every micro-batch holds several, so each cuts in two."""
    from distattn.train.data.corpus import write_token_file

    rng = np.random.default_rng(0)
    write_token_file(folder / "corpus", [rng.integers(0, 250, n) for n in rng.integers(20, 400, 300)])
    return str(folder / "corpus")


def _trainer_worker(out: str, corpus: str, schedulers, dp: int):
    """fp64 (the trainer's model made with fp64 as torch's default dtype): per scheduler, 3 steps with
    one nano-batch against 2 steps with two, then a resume for the third; FSDP2 over dp x cp."""
    from unittest import mock

    from distattn.runtime import pingpong
    from distattn.train.config import RunConfig, validate
    from distattn.train.trainer import Trainer

    torch.set_default_dtype(torch.float64)
    world = dist.get_world_size()
    got, dispatched = {}, []
    real = pingpong._Dispatch.forward

    def forward(ctx, flight, q, k, v):   # which executors ran staged
        dispatched.append(type(flight.executor).__name__)
        return real(ctx, flight, q, k, v)

    def cfg(name, nano, steps):
        return validate(RunConfig().replace(
            model=MODEL, data={"source": "tokens", "path": corpus, "seq_len": 1024},
            parallel={"dp": dp, "cp": world // dp, "scheduler": name, "dp_mode": "fsdp", "nano_batches": nano},
            train={"steps": steps, "lr_decay_steps": 3, "warmup_steps": 1, "ckpt_every": 2, "log_every": 100,
                   "activation_checkpointing": "selective", "out": f"{out}/{name}-{nano}"}))

    for name in schedulers:
        runs = {}
        for nano in (1, 2):
            dispatched.clear()
            with mock.patch.object(pingpong._Dispatch, "forward", staticmethod(forward)):
                history = Trainer(cfg(name, nano, 2), progress="none").run()
                trainer = Trainer(cfg(name, nano, 3), resume=True, progress="none")
                history = history + trainer.run()
            weights = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
                       for p in trainer.model.parameters()]
            runs[nano] = ([(m["step"], m["loss"], m["grad_norm"]) for m in history], weights, set(dispatched))
        got[name] = runs
    return got


def _check_trainer(results) -> None:
    for got in results:
        for name, runs in got.items():
            (one, w1, _), (two, w2, staged) = runs[1], runs[2]
            assert [s for s, _, _ in two] == [1, 2, 3], name
            assert len(staged) == 1 and staged != {"LocalExecutor"}, (name, staged)   # its executor ran in stages
            np.testing.assert_allclose([m[1:] for m in two], [m[1:] for m in one], rtol=1e-12, atol=0, err_msg=name)
            for a, b in zip(w1, w2, strict=True):
                assert a.dtype == torch.float64
                assert (a - b).abs().max() <= 1e-12 * a.abs().max(), name


SCHEDULERS = ("ring", "zigzag", "allgather", "ulysses", "usp", "cad")
# The default slice trains one scheduler per executor: zigzag (RingExecutor), allgather (GatherExecutor), usp
# (HeadExecutor around a RingExecutor) and cad (its task all-to-all); --slow adds ring (zigzag's executor over
# another layout) and ulysses (usp's HeadExecutor around the local kernel), and all six on 8 ranks. Every
# scheduler's staging itself, ring and ulysses included, is test_every_schedule_hides_behind_the_other_nano_batch's.
TRAINER_SLICE = ("zigzag", "allgather", "usp", "cad")


@pytest.mark.parametrize("schedulers", [TRAINER_SLICE, pytest.param(
    tuple(s for s in SCHEDULERS if s not in TRAINER_SLICE), marks=pytest.mark.slow)], ids=["slice", "rest"])
def test_trainer_nano_batches_equal_one_for_every_scheduler(tmp_path, schedulers):
    """4 gloo ranks (dp 2 x cp 2), FSDP2, selective checkpointing: losses, gradient norms and final
    weights of ``nano_batches: 2`` (with a resume) equal ``nano_batches: 1``'s within 1e-12."""
    _check_trainer(run_distributed(_trainer_worker, 4, str(tmp_path), _corpus(tmp_path), schedulers, 2, timeout=900))


@pytest.mark.slow
def test_trainer_nano_batches_equal_one_for_every_scheduler_on_8_ranks(tmp_path):
    _check_trainer(run_distributed(_trainer_worker, 8, str(tmp_path), _corpus(tmp_path), SCHEDULERS, 2,
                                   timeout=1800))
