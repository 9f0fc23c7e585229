"""Megatron-core under its own tensor, pipeline, data and context parallelism with distattn's core
attention (``get_gpt_layer_spec(scheduler=...)``): every scheduler on Megatron's own split of sbhd
(whole-sequence zigzag, plain and with packed documents) and thd (per-document) batches, RoPE and
GQA, against Megatron's single-process run of its local spec -- loss, logits and every gradient in
fp64. CAD pooled over the data-parallel replicas (``cad_pool="dp"``, DistCA) included, and the
nano-batch ping-pong inside Megatron's own block (``nano_batches=2``, cad's default): exact, its
pieces interleaved across the layers in :func:`distattn.planning.program.layer_order`, one nano-batch
everywhere when a pooled replica cannot cut its batch. The harness and its CPU shims:
``tests/megatron_cpu.py``."""

import pytest
import torch

from distattn.planning.program import layer_order
from distattn.schedulers import spec as scheduler_spec
from distattn.distributed.spawn import run_distributed

pytest.importorskip("megatron.core")

import megatron_cpu  # noqa: E402  (after the skip: it imports nothing of Megatron at module level)

SCHEDULERS = ("zigzag", "ring", "allgather", "ulysses", "usp", "cad")
PACKED = ("sbhd-packed", "thd")   # the formats with documents: the ones nano-batches cut
# name: (tp, pp, cp, world); dp = world / (tp * pp * cp)
CONFIGS = {"tp2_cp2": (2, 1, 2, 4), "pp2_cp2": (1, 2, 2, 4), "tp2_pp2_cp2": (2, 2, 2, 8), "dp2_cp2": (1, 1, 2, 4)}
TOLERANCE = 1e-9


@pytest.fixture(scope="module")
def reference():
    """Megatron's local spec in one process, batches A, B and C in every format (computed once)."""
    return run_distributed(megatron_cpu.reference, 1, timeout=600)[0]


def _only(reference, names, formats) -> dict:
    """``reference``'s entries of batches ``names`` in ``formats``: the ranks get their tensors as file
    descriptors, which the process launcher passes in hundreds at most."""
    return {(name, fmt): ref for (name, fmt), ref in reference.items() if name in names and fmt in formats}


def _key(scheduler, fmt, kwargs):
    return scheduler, fmt, tuple(sorted(kwargs.items()))


def _nano_batches(scheduler, fmt, kwargs) -> int:
    """How many nano-batches the spec cuts a batch of several documents into."""
    return 1 if fmt not in PACKED else kwargs.get("nano_batches") or scheduler_spec(scheduler).nano_batches


def _check(config, cases, results, world, pp, dp, cp, replicas=("A", "B")):
    """Every case exact on every rank, logits checked on every last-stage rank, the plans balanced
    over the CP group (pooled: every dp x cp rank); the pieces each rank's forwards ran: the
    cross-layer order of the stage's layers per microbatch with two nano-batches, none with one."""
    stage_layers, microbatches = megatron_cpu.LAYERS // pp, 2 if pp > 1 else 1
    for scheduler, fmt, kwargs in cases:
        key = _key(scheduler, fmt, kwargs)
        worst = {k: max(rank[key][0][k] for rank in results) for k in ("loss", "logits", "grads")}
        assert max(worst.values()) <= TOLERANCE, (config, key, worst)
        assert sum(rank[key][1] for rank in results) == world // pp, key   # every last-stage rank checked logits
        balanced = set().union(*(rank[key][2] for rank in results))
        assert balanced == {dp * cp if kwargs.get("cad_pool") else cp}, (key, balanced)
        # Megatron's rank order is tp, cp, dp, pp (fastest first): the replica of a rank
        cuts = [len(megatron_cpu.BATCHES[replicas[(rank // (world // pp // dp)) % dp]][0]) > 1 for rank in range(world)]
        for rank, result in enumerate(results):
            two = _nano_batches(scheduler, fmt, kwargs) == 2 and (pp > 1 or all(cuts) or
                                                                  (cuts[rank] and not kwargs.get("cad_pool")))
            want = layer_order(stage_layers, 2) * microbatches if two else ()
            assert result[key][3] == want, (config, key, rank, result[key][3])


# The default run: TP 2 (with cad's keep), PP 2, and DP 2 (with cad pooled over the replicas, and keep), each
# beside CP 2 on 4 ranks; --slow adds TP 2 x PP 2 x CP 2, the 8-rank product of the first two.
@pytest.mark.parametrize("config", [pytest.param(name, marks=[pytest.mark.slow] if CONFIGS[name][3] == 8 else [])
                                    for name in CONFIGS])
def test_every_scheduler_matches_megatron(config, reference):
    tp, pp, cp, world = CONFIGS[config]
    dp = world // (tp * pp * cp)
    cases = [(s, fmt, {}) for s in SCHEDULERS for fmt in megatron_cpu.FORMATS]   # cad: two nano-batches
    # cad with one nano-batch and with two named; zigzag with two (its attention whole at "compute": no stages)
    cases += [(s, fmt, {"nano_batches": n}) for s, n in (("cad", 1), ("cad", 2), ("zigzag", 2)) for fmt in PACKED]
    if dp > 1:
        cases += [("cad", fmt, {"cad_pool": "dp", **extra}) for fmt in megatron_cpu.FORMATS
                  for extra in ({}, {"nano_batches": 1}, {"nano_batches": 2})]
    # cad's attention servers keeping what they receive, against the default (resend): CP 2 and TP 2 x CP 2
    keeps = [("cad", fmt, {"cad_backward": "keep"}) for fmt in PACKED] if pp == 1 else []
    results = run_distributed(megatron_cpu.parallel_run, world, tp, pp, cp, cases + keeps,
                              _only(reference, "AB", megatron_cpu.FORMATS), timeout=900)
    _check(config, cases + keeps, results, world, pp, dp, cp)
    for _, fmt, kwargs in keeps:   # the same numbers exactly: the workers get the very rows they kept
        for rank in results:
            assert rank[_key("cad", fmt, kwargs)][0] == rank[_key("cad", fmt, {})][0], (config, fmt)


def test_pooled_replicas_cut_only_if_all_can(reference):
    """DP2 x CP2, replica 1's batch one document (C): pooled, both replicas run one nano-batch (they
    agree before planning); unpooled, replica 0 still cuts its own."""
    tp, pp, cp, world = CONFIGS["dp2_cp2"]
    cases = [("cad", fmt, kwargs) for fmt in PACKED for kwargs in ({"cad_pool": "dp"}, {"nano_batches": 2})]
    results = run_distributed(megatron_cpu.parallel_run, world, tp, pp, cp, cases, _only(reference, "AC", PACKED),
                              ("A", "C"), timeout=900)
    _check("dp2_cp2 A|C", cases, results, world, pp, 2, cp, ("A", "C"))


def test_bad_scheduler_options_are_refused():
    from distattn.parallel.megatron import get_gpt_layer_spec

    with pytest.raises(ValueError, match="scheduler='nope' is unknown"):
        get_gpt_layer_spec(scheduler="nope")
    with pytest.raises(ValueError, match="cad_pool='dp' balances attention over data-parallel replicas.*'ring'"):
        get_gpt_layer_spec(scheduler="ring", cad_pool="dp")
    with pytest.raises(ValueError, match="cad_pool='tp' is unknown"):
        get_gpt_layer_spec(scheduler="cad", cad_pool="tp")
    for bad in (3, 0, True):
        with pytest.raises(ValueError, match=f"nano_batches={bad!r} is not supported; choose 1, 2 .* or None"):
            get_gpt_layer_spec(scheduler="cad", nano_batches=bad)


def _refusal_worker():
    """One rank: what each layer configuration makes of ``nano_batches=2`` and of the default (None),
    and a packed batch of several documents with an attention mask."""
    from megatron.core import parallel_state

    from distattn.parallel.megatron import get_gpt_layer_spec

    parallel_state.initialize_model_parallel(1, 1)
    configs = {"recompute": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
               "selective": {"recompute_granularity": "selective"}, "gate": {"attention_output_gate": True}}
    out = {}
    with megatron_cpu.megatron_on_cpu():
        for name, changes in configs.items():
            try:
                megatron_cpu.gpt(get_gpt_layer_spec(scheduler="cad", nano_batches=2), **changes)
                out[name] = None
            except ValueError as exc:
                out[name] = str(exc)
            model = megatron_cpu.gpt(get_gpt_layer_spec(scheduler="cad"), **changes)
            out[name, "default"] = {layer.nano_batches for layer in model.decoder.layers}
        model = megatron_cpu.gpt(get_gpt_layer_spec(scheduler="cad"))
        out["plain"] = {layer.nano_batches for layer in model.decoder.layers}
        docs, ids, _, _ = megatron_cpu.batch("A", "sbhd-packed")
        params = megatron_cpu.packed_params("sbhd-packed", docs, None)
        mask = torch.ones(1, 1, sum(docs), sum(docs), dtype=torch.bool).triu(1)
        try:
            model(ids[None], None, mask, packed_seq_params=params)
        except ValueError as exc:
            out["mask"] = str(exc)
    parallel_state.destroy_model_parallel()
    return out


def test_what_nano_batches_cannot_run_is_refused_or_runs_one():
    out = run_distributed(_refusal_worker, 1, timeout=300)[0]
    assert "recompute_granularity='full' (Megatron recomputes one layer alone" in out["recompute"]
    assert "recompute_granularity='selective'" in out["selective"]
    assert "nano_batches=2 cannot run with attention_output_gate=True; pass nano_batches=1" in out["gate"]
    for name in ("recompute", "selective", "gate"):   # the default: one nano-batch there
        assert out[name, "default"] == {1}, name
    assert out["plain"] == {2}
    assert "attention_mask is not None with 4 packed documents" in out["mask"] and "attention_mask=None" in out["mask"]
