"""distattn.runtime.plan_cache.PlanCache: the one plan cache of the trainer and the adapters -- hits, misses,
bounded LRU eviction, pooled plans cached per batch, and keys that tell every argument apart."""

import pytest
import torch

import distattn.runtime.plan_cache as plan_cache
from distattn.runtime.plan_cache import PlanCache


@pytest.fixture
def made(monkeypatch):
    """``distattn.plan`` replaced by a recorder: each call returns a new object and is listed."""
    calls = []

    def fake(doc_lens, mesh, **kwargs):
        calls.append((doc_lens, mesh, kwargs))
        return object()

    monkeypatch.setattr(plan_cache, "make_plan", fake)
    return calls


def test_same_arguments_hit_and_others_miss():
    cache = PlanCache(size=4)
    first = cache.plan([24, 8], 4, scheduler="zigzag")   # a dry plan: world size 4
    assert cache.plan((24, 8), 4, scheduler="zigzag") is first
    assert cache.plan(torch.tensor([24, 8]), 4, scheduler="zigzag") is first   # the same documents
    assert first.doc_lens == (24, 8) and first.scheduler == "zigzag"
    other = cache.plan([16, 16], 4, scheduler="zigzag")
    assert other is not first and other.doc_lens == (16, 16)
    assert cache.made == 2 and len(cache) == 2 and list(cache) == [first, other]


def test_least_recently_used_plan_is_dropped(made):
    cache = PlanCache(size=2)
    a, b = cache.plan([8], "g"), cache.plan([16], "g")
    assert cache.plan([8], "g") is a        # a is now the most recently used
    c = cache.plan([24], "g")               # drops b
    assert len(cache) == 2 and list(cache) == [a, c]
    assert cache.plan([8], "g") is a and cache.plan([16], "g") is not b
    assert len(made) == 4 and len(cache) == 2


def test_keys_tell_scheduler_layout_options_and_group_apart(made):
    cache, group, other_group = PlanCache(size=16), object(), object()
    base = dict(scheduler="zigzag", layout="contiguous", causal=True, window=None)
    first = cache.plan([32], group, **base)
    variants = [({**base, "scheduler": "ring"}, group), ({**base, "layout": "zigzag"}, group),
                ({**base, "causal": False}, group), ({**base, "window": 8}, group), (base, other_group),
                ({**base, "ulysses_degree": 2}, group)]
    plans = [cache.plan([32], g, **kw) for kw, g in variants]
    assert len({id(p) for p in [first, *plans]}) == len(variants) + 1 and len(made) == len(variants) + 1
    assert cache.plan([32], group, **dict(reversed(list(base.items())))) is first   # keyword order is no key
    assert made[1][2]["scheduler"] == "ring" and made[5][1] is other_group   # each made with its own arguments


def test_unhashable_option_is_keyed_by_identity_and_kept_alive(monkeypatch):
    count = []
    monkeypatch.setattr(plan_cache, "make_plan", lambda *args, **kwargs: count.append(1) or object())
    cache, cost = PlanCache(size=8), [1.0, 2.0]   # a list: no hash
    first = cache.plan([16], "g", cost=cost)
    assert cache.plan([16], "g", cost=cost) is first and len(count) == 1
    assert cache.plan([16], "g", cost=[1.0, 2.0]) is not first   # an equal list is another object
    # lists made and dropped at once: each entry keeps its own alive, so none's id is taken by the
    # next one (which would find the other's plan)
    plans = {id(cache.plan([16], "g", cost=[3.0])) for _ in range(4)}
    assert len(plans) == 4 and len(count) == 6


def test_pooled_plan_is_made_per_batch(made):
    class Batch:   # e.g. Megatron's packed_seq_params: one object per step, the same on every layer
        pass

    cache, pool = PlanCache(size=8), object()
    unbatched = [cache.plan([16], "g", scheduler="cad", pool=pool) for _ in range(2)]
    assert unbatched[0] is not unbatched[1] and len(made) == 2 and len(cache) == 0   # a collective: every call
    one, two = Batch(), Batch()
    p1 = cache.plan([16], "g", scheduler="cad", pool=pool, batch=one)
    assert cache.plan([16], "g", scheduler="cad", pool=pool, batch=one) is p1   # the batch's other layers
    p2 = cache.plan([16], "g", scheduler="cad", pool=pool, batch=two)            # same documents, new batch
    assert p2 is not p1 and cache.plan([16], "g", scheduler="cad", pool=pool, batch=one) is p1
    assert len(made) == 4 and len(cache) == 2 and cache.made == 4
    plain = cache.plan([16], "g", scheduler="zigzag", batch=one)   # not pooled: the batch is no key
    assert cache.plan([16], "g", scheduler="zigzag", batch=two) is plain and len(made) == 5


def test_pooled_plans_are_made_at_the_same_steps_on_every_replica():
    """A pooled plan is a collective: replicas whose documents (keys) differ must still make their
    plans for the same batches -- here replica 0's batches share their documents, replica 1's do
    not, and interleaved pipeline chunks come back to earlier batches."""
    class Batch:   # a packed_seq_params: what a replica's schedule hands its layers at a step
        pass

    batches = [Batch() for _ in range(12)]
    steps = [0, 1, 2, 0, 3, 1, 4, 5, 2, 6, 7, 8, 9, 3, 10, 11, 4]   # batch looked up at each step
    made = []
    for replica, keys in enumerate(([("same",)] * 12, [(f"doc{i}",) for i in range(12)])):
        cache, mine = PlanCache(size=4), []
        for step, b in enumerate(steps):
            cache.get(keys[b], lambda: mine.append(step), batches[b])
        made.append(mine)
    assert made[0] == made[1] and len(made[0]) < len(steps)


def test_size_must_be_a_positive_int():
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(ValueError, match="size must be a positive int"):
            PlanCache(size=bad)
