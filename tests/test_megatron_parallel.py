"""Megatron-core under its own tensor, pipeline, data and context parallelism with distattn's core
attention (``get_gpt_layer_spec(scheduler=...)``): every scheduler on Megatron's own split of sbhd
(whole-sequence zigzag, plain and with packed documents) and thd (per-document) batches, RoPE and
GQA, against Megatron's single-process run of its local spec -- loss, logits and every gradient in
fp64. CAD pooled over the data-parallel replicas (``cad_pool="dp"``, DistCA) included. The harness
and its CPU shims: ``tests/megatron_cpu.py``."""

import pytest

from distattn.spawn import run_distributed

pytest.importorskip("megatron.core")

import megatron_cpu  # noqa: E402  (after the skip: it imports nothing of Megatron at module level)

SCHEDULERS = ("zigzag", "ring", "allgather", "ulysses", "usp", "cad")
# name: (tp, pp, cp, world); dp = world / (tp * pp * cp)
CONFIGS = {"tp2_cp2": (2, 1, 2, 4), "pp2_cp2": (1, 2, 2, 4), "tp2_pp2_cp2": (2, 2, 2, 8), "dp2_cp2": (1, 1, 2, 4)}
TOLERANCE = 1e-9


@pytest.fixture(scope="module")
def reference():
    """Megatron's local spec in one process, batches A and B in every format (computed once)."""
    return run_distributed(megatron_cpu.reference, 1, timeout=600)[0]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_scheduler_matches_megatron(config, reference):
    tp, pp, cp, world = CONFIGS[config]
    dp = world // (tp * pp * cp)
    cases = [(s, fmt, {}) for s in SCHEDULERS for fmt in megatron_cpu.FORMATS]
    if dp > 1:
        cases += [("cad", fmt, {"cad_pool": "dp"}) for fmt in megatron_cpu.FORMATS]
    results = run_distributed(megatron_cpu.parallel_run, world, tp, pp, cp, cases, reference, timeout=900)
    for scheduler, fmt, kwargs in cases:
        key = (scheduler, fmt, tuple(sorted(kwargs.items())))
        worst = {k: max(rank[key][0][k] for rank in results) for k in ("loss", "logits", "grads")}
        assert max(worst.values()) <= TOLERANCE, (config, key, worst)
        assert sum(rank[key][1] for rank in results) == world // pp, key   # every last-stage rank checked logits
        balanced = set().union(*(rank[key][2] for rank in results))
        assert balanced == {dp * cp if kwargs else cp}, (key, balanced)   # pooled: every dp x cp rank


def test_bad_scheduler_options_are_refused():
    from distattn.parallel.megatron import get_gpt_layer_spec

    with pytest.raises(ValueError, match="scheduler='nope' is unknown"):
        get_gpt_layer_spec(scheduler="nope")
    with pytest.raises(ValueError, match="cad_pool='dp' balances attention over data-parallel replicas.*'ring'"):
        get_gpt_layer_spec(scheduler="ring", cad_pool="dp")
    with pytest.raises(ValueError, match="cad_pool='tp' is unknown"):
        get_gpt_layer_spec(scheduler="cad", cad_pool="tp")
