"""Issue 54: the trainer makes step N+1's batch and plans on a background thread while step N runs
(``parallel.plan_ahead``, :mod:`distattn.train.plan_ahead`), with no collective on that thread: pooled
CAD plans get every CP group's documents (``distattn.plan(..., pool=group, pool_doc_lens=...)``, the
same schedule as the exchange); the losses are the inline trainer's bitwise; a run stopped mid-way and
resumed gives the uninterrupted losses bitwise; an error while planning ahead reaches the step that
needs the plans."""

import signal
import threading
from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed as dist

import distattn
from conftest import small_run
from distattn.distributed.spawn import run_distributed
from distattn.train.config import RunConfig, validate
from distattn.train.data.corpus import write_token_file

THREAD = "distattn-plan-ahead"
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_to_all", "all_to_all_single", "broadcast",
               "broadcast_object_list", "barrier", "reduce_scatter_tensor", "all_gather_into_tensor")


def _same_schedule(a, b) -> bool:
    sa, sb = a.schedule, b.schedule
    segs = all(np.array_equal(getattr(sa.segments, f), getattr(sb.segments, f))
               for f in ("q0", "q1", "k0", "k1", "rank", "area", "lo", "hi"))
    runs = all(np.array_equal(x, y) for c in range(sa.pool_size)
               for x, y in zip(sa.slots.rank_runs(c), sb.slots.rank_runs(c)))
    return segs and runs and sa.slot_ranks == sb.slot_ranks and sa.pool_size == sb.pool_size == 4


def _pool_worker(docs):
    from distattn.runtime.plan_cache import PlanCache

    runs = [dist.new_group([0, 1]), dist.new_group([2, 3])]       # CP groups: the pool's ranks in runs of 2
    apart = [dist.new_group([0, 2]), dist.new_group([1, 3])]      # CP groups that are not
    me = dist.get_rank()
    g, group = me // 2, runs[me // 2]
    exchanged = distattn.plan(docs[g], group, scheduler="cad", pool=dist.group.WORLD, backend="reference")
    local = distattn.plan(docs[g], group, scheduler="cad", pool=dist.group.WORLD, backend="reference",
                          pool_doc_lens=docs)
    x = torch.randn(sum(docs[g]), 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(g))
    outs = [distattn.attention(*(plan.shard(x),) * 3, plan) for plan in (exchanged, local)]
    refused = []
    bad = [(docs[::-1], "pool_doc_lens\\[.\\] must be this rank's doc_lens"),
           (docs[:1], "one list of document lengths per CP group of the pool \\(2 groups of 2 ranks\\), got 1"),
           ([docs[0], [3, 0]] if g == 0 else [[3, 0], docs[1]], "pool_doc_lens\\[.\\]\\[1\\] = 0"),
           ("12", "got str")]
    for wrong, match in bad:
        with pytest.raises(ValueError, match=match):
            distattn.plan(docs[g], group, scheduler="cad", pool=dist.group.WORLD, pool_doc_lens=wrong)
        refused.append(match)
    with pytest.raises(ValueError, match="not pool ranks .* in runs of 2; or pass pool= alone"):
        distattn.plan(docs[me % 2], apart[me % 2], scheduler="cad", pool=dist.group.WORLD, pool_doc_lens=docs)
    cache = PlanCache()   # no collective: cached by its arguments like any plan
    cached = [cache.plan(docs[g], group, scheduler="cad", pool=dist.group.WORLD, pool_doc_lens=[list(d) for d in docs])
              for _ in range(2)]
    # the cut every replica computes alone is the one the all-reduce agrees on (a one-document replica: none)
    from distattn.train.plan_ahead import replica_nano_batches
    from distattn.train.plan_ahead import agreed_nano_batches

    cuts = all(agreed_nano_batches(mine[g], 2, 1e-3, True, "cpu") == replica_nano_batches(mine, 2, 1e-3)[g]
               for mine in (docs, [docs[0], [64]]))
    return (_same_schedule(exchanged, local), torch.equal(*outs), len(refused), cached[0] is cached[1],
            cache.made, cuts)


def _corpus(path) -> str:
    """A token file of heavy-tailed document lengths (balanced packing holds pieces of it)."""
    rng = np.random.default_rng(0)
    lens = np.maximum(1, rng.lognormal(np.log(20), 1.2, 300).astype(int))
    write_token_file(path, [rng.integers(0, 256, n) for n in lens])
    return str(path)


# a tiny model on 128-token sequences of the token file: replicas with different documents
TINY = {"model": {"dim": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64},
        "data": {"source": "tokens", "seq_len": 128, "token_cap": 128, "seed": 1}, "parallel": {},
        "train": {"steps": 3, "warmup_steps": 1, "ckpt_every": 100, "log_every": 100}}
DOCS = [[90, 3, 7], [4, 5, 6, 7, 8]]   # group 0 has a long document: group 1's ranks take part of it


def _four_ranks(configs: dict) -> dict:
    return {"pool": _pool_worker(DOCS), **_on_and_off(configs)}


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    """One spawn of 4 gloo ranks (spawning is most of the time on 2 cores): the pool_doc_lens checks,
    then dp 2 x cp 2 trained with plan_ahead on and off, cad (pooled, two nano-batches) and zigzag."""
    tmp = tmp_path_factory.mktemp("plan_ahead")
    corpus = _corpus(tmp / "corpus")
    configs = {(scheduler, ahead): small_run(TINY, tmp / f"{scheduler}-{ahead}", data={"path": corpus},
                                             parallel={"dp": 2, "cp": 2, "scheduler": scheduler, "plan_ahead": ahead,
                                                       "nano_batches": 2 if scheduler == "cad" else 1})
               for scheduler in ("cad", "zigzag") for ahead in (True, False)}
    assert configs["cad", True].parallel.pools_replicas
    return run_distributed(_four_ranks, 4, configs, timeout=300)


def test_pool_doc_lens_plans_as_the_exchange_does_and_refuses_bad_input(four_ranks):
    for rank in four_ranks:
        same, equal, refused, cached, made, cuts = rank["pool"]
        assert same and equal and refused == 4 and cached and made == 1 and cuts
    for kwargs in ({"scheduler": "cad"}, {"scheduler": "zigzag"}):   # no pool=: refused, naming the argument
        with pytest.raises(ValueError, match="^pool_doc_lens lists the documents of a pool's CP groups"):
            distattn.plan([64], 4, pool_doc_lens=[[64]], **kwargs)


def _collectives_off_main(record: list):
    """Patches torch.distributed's collectives to note any called from a thread other than the main one."""
    patches = []
    for name in COLLECTIVES:
        real = getattr(dist, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            if threading.current_thread() is not threading.main_thread():
                record.append((_name, threading.current_thread().name))
            return _real(*args, **kwargs)
        patches.append(mock.patch.object(dist, name, spy))
    return patches


def _on_and_off(configs: dict) -> dict:
    from distattn.train.trainer import Trainer

    off_main: list = []
    patches = _collectives_off_main(off_main)
    for p in patches:
        p.start()
    try:
        out = {name: Trainer(cfg).run() for name, cfg in configs.items()}
    finally:
        for p in patches:
            p.stop()
    out["off_main"] = off_main
    out["threads"] = [t.name for t in threading.enumerate() if t.name.startswith(THREAD)]
    return out


def test_plan_ahead_gives_the_inline_losses_bitwise(four_ranks):
    ranks = four_ranks
    for rank in ranks:
        assert rank["off_main"] == [] and rank["threads"] == []   # no collective off the main thread; joined
    got = ranks[0]
    for scheduler in ("cad", "zigzag"):
        on, off = got[scheduler, True], got[scheduler, False]
        assert len(on) == 3
        assert [(m["loss"], m["grad_norm"]) for m in on] == [(m["loss"], m["grad_norm"]) for m in off]
        assert all(m["planning_s"] >= 0 and m["plan_made_s"] > 0 for m in on + off), on + off


def _stop_and_resume(straight, stopped) -> dict:
    from distattn.train.ranks import StopSignal
    from distattn.train.trainer import Trainer

    full = Trainer(straight).run()
    stop = StopSignal()

    def at_step(m):   # a SIGTERM on rank 0 during step 1: every rank stops after step 2
        if m["step"] == 1 and dist.get_rank() == 0:
            stop.signum = signal.SIGTERM
    first = Trainer(stopped, [at_step], stop=stop).run()
    threads = [t.name for t in threading.enumerate() if t.name.startswith(THREAD)]
    return {"full": full, "first": first, "resumed": Trainer(stopped, resume=True).run(), "threads": threads}


def test_a_run_stopped_and_resumed_with_plan_ahead_is_exact(tmp_path):
    base = {"model": TINY["model"], "data": {**TINY["data"], "path": _corpus(tmp_path / "corpus")},
            # FSDP2: DDP's first iteration after a resume buckets gradients otherwise (1e-8 apart)
            "parallel": {"dp": 2, "cp": 1, "scheduler": "cad", "dp_mode": "fsdp"},
            "train": {"steps": 4, "warmup_steps": 1, "ckpt_every": 100}}
    straight, stopped = small_run(base, tmp_path / "straight"), small_run(base, tmp_path / "stopped")
    assert straight.parallel.plan_ahead and straight.parallel.pools_replicas and straight.packing == "balanced"
    ranks = run_distributed(_stop_and_resume, 2, straight, stopped, timeout=300)
    got = ranks[0]
    assert [m["step"] for m in got["first"]] == [1, 2] and [m["step"] for m in got["resumed"]] == [3, 4]
    assert sorted(p.name for p in (tmp_path / "stopped" / "ckpt").iterdir()) == ["step_2", "step_4"]
    # step 3's batch was being taken on the thread when the stop came: the checkpoint holds the cursor
    # before it, with the pieces step 2 held back
    assert got["full"][1]["held_documents"] > 0, got["full"]
    want = [(m["loss"], m["grad_norm"]) for m in got["full"]]
    assert [(m["loss"], m["grad_norm"]) for m in got["first"] + got["resumed"]] == want
    assert all(rank["threads"] == [] for rank in ranks)


SMALL = ["parallel.cp=1", "model.n_layers=1", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2",
         "model.ffn_dim=64", "data.seq_len=64", "parallel.nano_batches=1", "train.warmup_steps=1",
         "train.ckpt_every=100", "train.steps=4"]


@pytest.mark.parametrize("ahead", [True, False])
def test_an_error_while_planning_reaches_the_step_that_needs_the_plans(tmp_path, ahead):
    from distattn.runtime.plan_cache import PlanCache
    from distattn.train.config import load_config
    from distattn.train.trainer import Trainer

    real, where = PlanCache.plan, []

    def plan(cache, doc_lens, *args, **kwargs):   # step 2's plans fail
        where.append(threading.current_thread().name)
        if len(where) == 2:
            raise ValueError("doc_lens [64] cannot be planned: a planning error")
        return real(cache, doc_lens, *args, **kwargs)

    seen = []
    cfg = load_config("tiny", [*SMALL, f"train.out={tmp_path}", f"parallel.plan_ahead={str(ahead).lower()}"])
    with mock.patch.object(PlanCache, "plan", plan), \
            pytest.raises(ValueError, match=r"^doc_lens \[64\] cannot be planned: a planning error$"):
        Trainer(cfg, [lambda m: seen.append(m["step"])]).run()
    assert seen == [1]   # step 1 ran; step 2, which needed the plans, raised the error
    assert where[1].startswith(THREAD) == ahead   # made on the thread while step 1 ran, or inline
    assert not [t for t in threading.enumerate() if t.name.startswith(THREAD)]   # the thread ended


def test_plan_ahead_config():
    assert RunConfig().parallel.plan_ahead is True
    assert validate(RunConfig().replace(parallel={"plan_ahead": False})).parallel.plan_ahead is False
    with pytest.raises(ValueError, match="^parallel.plan_ahead must be true or false"):
        validate(RunConfig().replace(parallel={"plan_ahead": "yes"}))
