"""ulysses and usp on gloo ranks vs the fp64 oracle; uneven heads, GQA/MQA; meshes; stats; DeepSpeed."""

import itertools
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

import distattn
from conftest import case_error, rand_qkv, sent_vs_stats, slow_cases
from distattn.parallel import usp_mesh
from distattn.schedulers.usp import default_ulysses_degree
from distattn.distributed.spawn import RankError, run_distributed

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))

DOCS = [[3, 50, 2, 1, 4, 17], [1, 2, 1, 3, 1, 1, 2, 5, 1, 4], [29]]
MASKS = [(True, None), (False, None), (True, 6), (False, 5)]


def _worker(cases, mesh_spec=None):
    mesh = None
    if mesh_spec is not None:  # build the DeviceMesh inside the rank
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", mesh_spec[0], mesh_dim_names=mesh_spec[1])
    return [(case, case_error(*case, mesh=mesh)) for case in cases]


def _ulysses_cases(p):
    heads = [(6, 2), (6, 1), (8, 8), (p, 1), (7, 7)]  # uneven, MQA, Hkv == Hq, one head each, odd
    cases = []
    for (hq, hkv), docs, (causal, window) in itertools.product(heads, DOCS, MASKS):
        if hq >= p:
            cases.append(("ulysses", docs, causal, window, hq, hkv))
    return cases


@pytest.mark.parametrize("world_size", [2, 3, 4, *slow_cases(5, 6)])
def test_ulysses_exact(world_size):
    """Worlds 2-4: heads that divide the world and heads that do not, one head per rank; 5 and 6 with
    --slow (six ranks run usp's 2x3 meshes below)."""
    for rank_results in run_distributed(_worker, world_size, _ulysses_cases(world_size), timeout=600):
        for case, err in rank_results:
            assert err < 1e-12, (world_size, case, err)


def _usp_cases(u, with_degree):
    options = {"ulysses_degree": u} if with_degree else {}
    return [("usp", docs, causal, window, hq, hkv, "reference", options)
            for docs, (causal, window), (hq, hkv) in itertools.product(DOCS, MASKS, [(4, 2), (6, 1), (9, 3)])
            if hq >= u]


@pytest.mark.parametrize("u,r", [pytest.param(2, 2, marks=pytest.mark.slow), (2, 3), (3, 2)])
def test_usp_exact_on_2d_mesh_and_with_ulysses_degree(u, r):
    """usp on 2-D meshes (axes in either order) and on a 1-D group with ulysses_degree: Ulysses of 2 under
    a ring of 3 and Ulysses of 3 under a ring of 2; the square 2x2 with --slow."""
    # DeviceMesh with axes in either order, and a 1-D group plus ulysses_degree
    for spec in [((u, r), ("ulysses", "ring")), ((r, u), ("ring", "ulysses"))]:
        for rank_results in run_distributed(_worker, u * r, _usp_cases(u, False), spec, timeout=600):
            for case, err in rank_results:
                assert err < 1e-12, (spec, case, err)
    for rank_results in run_distributed(_worker, u * r, _usp_cases(u, True)[:8], timeout=600):
        for case, err in rank_results:
            assert err < 1e-12, ("ulysses_degree", case, err)


def _head_group_cases():
    """Head groups that split KV heads (12/4 over 3: 4 query heads, ~1.3 KV heads per rank), that
    share one (12/3 over 3: 4 groups of 1 query head on one KV head), uneven shares (7/7 over 3)
    and usp's ring under them."""
    out = []
    for (hq, hkv, groups), docs in itertools.product([(12, 4, 2), (12, 4, 4), (12, 3, 4), (7, 7, 2)], DOCS[:2]):
        out.append(("ulysses", docs, True, None, hq, hkv, "reference", {"head_groups": groups}))
    for (hq, hkv, groups), (causal, window) in itertools.product([(12, 4, 3), (8, 2, 2)], MASKS[::2]):
        out.append(("usp", DOCS[0], causal, window, hq, hkv, "reference", {"head_groups": groups, "ulysses_degree": 2}))
    return out


def test_head_groups_exact():
    """head_groups > 1 moves and computes a rank's query heads a part at a time: the same results."""
    for rank_results in run_distributed(_worker, 3, [c for c in _head_group_cases() if c[0] == "ulysses"], timeout=600):
        for case, err in rank_results:
            assert err < 1e-12, case
    for rank_results in run_distributed(_worker, 4, [c for c in _head_group_cases() if c[0] == "usp"], timeout=600):
        for case, err in rank_results:
            assert err < 1e-12, case


def test_every_saved_tensor_reaches_save_for_backward():
    """Head groups nest the inner executors' saved tuples in plain tuples: every tensor must still go
    through save_for_backward, where checkpointing's hooks see it (on ctx it would stay alive)."""
    import torch

    from distattn.executors.base import Saved
    from distattn.executors.head_a2a import HeadSaved
    from distattn.runtime.ops import flatten, unflatten

    t = [torch.full((1,), float(i)) for i in range(10)]
    saved = HeadSaved(4, 2, t[8], t[9], (Saved(*t[:3], None, t[3]), Saved(*t[4:7], None, t[7])))
    known = (t[0], None, None, None, None)   # the op's q: by reference
    skeleton, new = flatten(saved, known, None)
    assert [x.item() for x in new] == [8, 9, 1, 2, 3, 4, 5, 6, 7]   # in the order they are met
    assert "tensor" not in repr(skeleton)
    assert repr(unflatten(skeleton, [*known, *new])) == repr(saved)


def test_head_groups_refusals():
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="head_groups must be a positive int"):
            distattn.plan([64], 2, scheduler="ulysses", head_groups=bad)
    with pytest.raises(ValueError, match="unexpected option"):
        distattn.plan([64], 2, scheduler="zigzag", head_groups=2)
    from distattn.schedulers.ulysses import HeadLayout, group_ranges
    with pytest.raises(ValueError, match="head_groups <= 2"):
        group_ranges(HeadLayout.build(6, 2, 3).q, 3)
    assert group_ranges(HeadLayout.build(7, 7, 2).q, 2) == [((0, 2), (4, 6)), ((2, 4), (6, 7))]


@pytest.mark.parametrize("scheduler,hq,hkv,options", [
    ("ulysses", 8, 2, {}), ("ulysses", 8, 2, {"head_groups": 2}), ("ulysses", 6, 1, {}), ("ulysses", 7, 7, {}),
    ("usp", 6, 3, {"ulysses_degree": 2, "head_groups": 3}),
    ("usp", 4, 2, {"ulysses_degree": 2}), ("usp", 6, 3, {"ulysses_degree": 2}),
])
def test_send_bytes_match_stats(scheduler, hq, hkv, options):
    for sent, predicted, _ in run_distributed(sent_vs_stats, 4, scheduler, [7, 30, 1, 22], hq, hkv, True, None,
                                              options):
        assert sent == predicted


def test_dry_stats():
    # uneven heads: 6 heads on 4 ranks is 2, 2, 1, 1 -> FLOPs imbalance 2 / 1.5
    st = distattn.plan([4096], 4, scheduler="ulysses").stats(6, 2, 64)
    assert st["flops_imbalance"] == pytest.approx(4 / 3)
    assert sum(st["flops"]) == 4 * (4096 * 4097 // 2) * 6 * 64
    st = distattn.plan([4096], 8, scheduler="usp", ulysses_degree=2).stats(8, 8, 64)
    assert st["flops_imbalance"] < 1.001 and st["token_imbalance"] == 1.0
    with pytest.raises(ValueError, match="8 heads cannot cover 16 ranks"):
        distattn.plan([4096], 16, scheduler="ulysses").stats(8, 8, 64)


def test_default_degree_divides_the_kv_heads():
    # the largest divisor of the CP size that divides the KV heads: Ulysses never splits a KV head
    assert [default_ulysses_degree(p, h) for p, h in [(16, 8), (8, 8), (4, 4), (6, 4), (12, 8), (5, 2), (4, 1)]] \
        == [8, 8, 4, 2, 4, 1, 1]
    assert distattn.plan([64], 6, scheduler="usp", num_kv_heads=4).schedule.ulysses_degree == 2
    assert distattn.plan([64], 6, scheduler="usp", num_kv_heads=4, ulysses_degree=3).schedule.ulysses_degree == 3
    with pytest.raises(ValueError, match="ulysses_degree=U or num_kv_heads=H"):
        distattn.plan([64], 4, scheduler="usp")
    with pytest.raises(ValueError, match="num_kv_heads must be a positive int"):
        distattn.plan([64], 4, scheduler="usp", num_kv_heads=0)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_usp_is_valid_for_every_shipped_config(path):
    cfg = yaml.safe_load(path.read_text())
    model, cp = cfg["model"], cfg["parallel"]["cp"]
    degree = cfg["parallel"].get("ulysses_degree")
    plan = distattn.plan([cfg["data"]["seq_len"]], cp, scheduler="usp", ulysses_degree=degree,
                         num_kv_heads=model["n_kv_heads"])
    u = plan.schedule.ulysses_degree
    assert cp % u == 0 and model["n_kv_heads"] % u == 0 and model["n_heads"] >= u, (path.name, u)
    assert u == (degree or default_ulysses_degree(cp, model["n_kv_heads"]))
    st = plan.stats(model["n_heads"], model["n_kv_heads"], model["dim"] // model["n_heads"])
    assert st["world_size"] == cp and st["token_imbalance"] < 1.01


def _tiny_config_worker():
    """configs/tiny.yaml's attention shapes (cp 4, 8 heads, 4 KV heads) under usp's default degree."""
    errors = [case_error("usp", docs, causal, window, 8, 4, options={"num_kv_heads": 4})
              for docs, (causal, window) in zip(DOCS, MASKS)]
    plan = distattn.plan([64], dist.group.WORLD, scheduler="usp", num_kv_heads=4)
    q, k, v = rand_qkv(64, 64, 8, 2, 8)
    try:
        distattn.attention(plan.shard(q), plan.shard(k), plan.shard(v), plan)
        refused = None
    except ValueError as exc:
        refused = str(exc)
    return plan.schedule.ulysses_degree, errors, refused


def test_tiny_config_shapes_run_usp_with_the_default_degree():
    for degree, errors, refused in run_distributed(_tiny_config_worker, 4, timeout=120):
        assert degree == 4 and max(errors) < 1e-12, (degree, errors)
        assert "k and v have 2 heads but this usp plan was made with num_kv_heads=4" in refused


def test_bad_layouts():
    with pytest.raises(ValueError, match="ulysses_degree must divide the world size 6: one of \\[1, 2, 3, 6\\]"):
        distattn.plan([64], 6, scheduler="usp", ulysses_degree=4)
    with pytest.raises(ValueError, match="needs a 2-D DeviceMesh with axes \\('ulysses', 'ring'\\)"):
        distattn.plan([64], 4, scheduler="usp")
    with pytest.raises(ValueError, match="unexpected option"):
        distattn.plan([64], 4, scheduler="ulysses", ulysses_degree=2)


def _mesh_errors_worker():
    from torch.distributed.device_mesh import init_device_mesh

    errors = []
    for call in (
        lambda: distattn.plan([64], init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp")), scheduler="usp"),
        lambda: distattn.plan([64], usp_mesh("cpu", 2), scheduler="usp", ulysses_degree=4),
        lambda: usp_mesh("cpu", 3),
    ):
        try:
            call()
            errors.append(None)
        except ValueError as exc:
            errors.append(str(exc))
    # init_mesh's groups wait as long as the default group (torch's own: 30 minutes)
    from distattn.distributed.comm import group_timeout
    from distattn.distributed.mesh import init_mesh

    mesh = init_mesh("cpu", (2, 2), ("dp", "cp"))
    errors.append([group_timeout(mesh[name].get_group()).total_seconds() for name in ("dp", "cp")])
    # a head count the Ulysses group cannot split fails before any communication
    plan = distattn.plan([64], usp_mesh("cpu", 4), scheduler="usp")
    q, k, v = rand_qkv(64, 64, 3, 1, 8)
    try:
        distattn.attention(plan.shard(q), plan.shard(k), plan.shard(v), plan)
    except ValueError as exc:
        errors.append(str(exc))
    return errors


def test_mesh_errors():
    errors = run_distributed(_mesh_errors_worker, 4, timeout=120, collective_timeout=20)[0]
    assert "mesh_dim_names ('ulysses', 'ring'), got ('dp', 'cp')" in errors[0]
    assert "ulysses_degree=4 disagrees with the mesh's 'ulysses' axis (2)" in errors[1]
    assert "positive divisor of the world size 4" in errors[2]
    assert errors[3] == [20.0, 20.0]
    assert "3 heads cannot cover 4 ranks" in errors[4]


def test_same_result_as_deepspeed_ulysses():
    pytest.importorskip("deepspeed")
    from distattn.bench.ulysses_vs_deepspeed import compare

    for rank in compare(world_size=4, seq_len=512, heads=8, head_dim=16, repeats=1, doc_lens=[100, 3, 250, 159]):
        assert rank["max_diff"] < 1e-6


def _hang_worker():
    plan = distattn.plan([40], dist.group.WORLD, scheduler="ulysses")
    q, k, v = rand_qkv(40, 40, 4, 2, 8)
    distattn.attention(plan.shard(q), plan.shard(k), plan.shard(v), plan)
    if dist.get_rank() != 0:  # a second call: the all-to-all waits for rank 0, which has left
        distattn.attention(plan.shard(q), plan.shard(k), plan.shard(v), plan)


def test_missing_rank_times_out():
    with pytest.raises(RankError, match=r"ulysses forward failed or timed out waiting for rank\(s\) \[0\]"):
        run_distributed(_hang_worker, 2, timeout=120, collective_timeout=3)
