"""Issue 66 item 4: the simulator's kernel speed by shard shape -- a measured term for the query heads
one kernel call runs (a Ulysses rank's share), from the latency table's ``tp`` rows
(:class:`distattn.sim.kernel.HeadTerm`), how the schedules' heads per call reach it, and the GPU
report's head sweep that would measure it on a GPU. Seconds."""

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from distattn.model_shape import GPUS, MODELS
from distattn.network import default_profile
from distattn.schedule import AttnShape
from distattn.sim.job import dry_schedule, plan_context
from distattn.sim.kernel import AttentionKernel, HeadTerm, latency_heads
from distattn.sim.simulate import SimConfig, simulate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TABLE = SHARED / "profiles" / "attn_latency_h100.csv"
M8B = MODELS["llama3-8b"]
FIXED = 0.025          # ms: a call's fixed cost in the synthetic tables


def _table():
    if not TABLE.exists():
        pytest.skip("shared profiles not present")
    return TABLE


def _csv(path, per_flop):
    """A latency table whose ``tp`` rows run ``per_flop[tp]`` times all heads' speed per FLOP (plus
    the fixed cost), and one ``cp = 2`` row that must be ignored."""
    rows = ["L,cp,tp,duration_per_doc"]
    for tp, speed in per_flop.items():
        rows += [f"{n},1,{tp},{FIXED + (n * (n + 1) / 2 / 1e6) / tp / speed if n > 64 else FIXED}"
                 for n in (64, 1024, 4096, 32768)]
    path.write_text("\n".join(rows) + "\n4096,2,1,0.5\n")
    return path


def test_the_term_is_one_on_all_heads_and_the_tables_ratio_on_fewer():
    term = latency_heads(_table())
    assert term.heads == (4.0, 8.0, 16.0, 32.0)        # tp 8, 4, 2, 1 of 32 query heads
    lengths = np.asarray(term.lengths)
    assert lengths[0] == 2048 and lengths[-1] == 65536
    assert term.factor(32, lengths).tolist() == [1.0] * len(lengths)
    # one head is below the table's fewest (4): it takes 4's term, measured, not extrapolated
    t = {(int(r[0]), int(r[2])): float(r[3]) for r in (line.split(",") for line in TABLE.read_text().split()[1:])
         if r[1] == "1"}
    for n in (16384, 32768):   # where tp 8's own ratio is the smallest: the term is it
        raw = (t[n, 1] - t[64, 1]) / (8 * (t[n, 8] - t[64, 8]))
        assert term.factor(1, n) == pytest.approx(raw) and term.factor(4, n) == term.factor(1, n) < 1
    assert 0.95 < term.factor(1, 16384) < 0.98          # ~3%: the most the table shows
    assert term.factor(64, 16384) == 1 and term.factor(1, 512) == term.factor(1, 2048) == 1


def test_the_term_is_monotone_in_heads_and_never_above_one():
    term = latency_heads(_table())
    heads = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48]
    lengths = np.geomspace(256, 262144, 25)
    grid = np.stack([term.factor(h, lengths) for h in heads])
    assert (grid <= 1).all() and (grid > 0.9).all() and (np.diff(grid, axis=0) >= -1e-12).all()


def test_a_synthetic_table_is_capped_kept_monotone_and_interpolated_in_heads(tmp_path):
    # tp 2 (16 heads) runs 10% faster per FLOP than all heads (capped at 1), tp 4 (8 heads) 30% slower
    term = latency_heads(_csv(tmp_path / "lat.csv", {1: 1.0, 2: 1.1, 4: 0.7}))
    assert term.heads == (8.0, 16.0, 32.0) and term.lengths == (1024.0, 4096.0, 32768.0)
    assert term.factor(16, [1024, 32768]).tolist() == pytest.approx([1.0, 1.0])
    assert term.factor(8, 4096) == pytest.approx(0.7) and term.factor(2, 4096) == pytest.approx(0.7)
    assert term.factor(np.sqrt(8 * 16), 4096) == pytest.approx(np.sqrt(0.7))   # log-interpolated in heads
    # a head term in 64-head units shifts the head counts
    assert latency_heads(tmp_path / "lat.csv", table_heads=64).heads == (16.0, 32.0, 64.0)
    # and it scales the kernel's speed only where heads are given
    k = AttentionKernel.measured(GPUS["h100"], 128, tmp_path / "lat.csv")
    assert k.heads_term == term and "heads per call" in k.source
    assert k.tflops("forward", 4096, heads=8) == pytest.approx(0.7 * k.tflops("forward", 4096))
    assert k.tflops("forward", 4096, heads=32) == k.tflops("forward", 4096, heads=None)


def test_without_tp_rows_or_a_table_the_term_is_one(tmp_path):
    only = _csv(tmp_path / "lat.csv", {1: 1.0})
    assert latency_heads(only) is None
    assert AttentionKernel.measured(GPUS["h100"], 128, only).heads_term is None
    flat = AttentionKernel.measured(GPUS["h100"], 128)
    assert flat.heads_term is None and flat.tflops("backward", 4096, heads=1) == flat.tflops("backward", 4096)


def test_bad_tables_and_head_counts_are_user_errors(tmp_path):
    with pytest.raises(ValueError, match="splits more than"):
        latency_heads(_csv(tmp_path / "a.csv", {1: 1.0, 64: 1.0}))
    path = tmp_path / "b.csv"
    path.write_text("L,cp,tp,duration_per_doc\n64,1,1,0.02\n1024,1,1,0.1\n4096,1,1,1\n4096,1,2,0.5\n")
    with pytest.raises(ValueError, match="tp=2"):
        latency_heads(path)
    with pytest.raises(ValueError, match="heads per call"):
        latency_heads(_csv(tmp_path / "c.csv", {1: 1.0, 2: 1.0})).factor(0, 4096)
    with pytest.raises(ValueError, match="increasing"):
        HeadTerm((8.0, 4.0), (1024.0,), ((1.0,), (1.0,)), "x")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        HeadTerm((4.0, 8.0), (1024.0,), ((1.2,), (1.0,)), "x")
    with pytest.raises(ValueError, match="1 on all heads"):
        HeadTerm((4.0, 8.0), (1024.0,), ((0.9,), (0.95,)), "x")


def test_rank_rates_run_at_the_heads_per_call(tmp_path):
    k = AttentionKernel.measured(GPUS["h100"], 128, _csv(tmp_path / "lat.csv", {1: 1.0, 4: 0.5}))
    n = 4096
    segments = (np.array([0, 1]), np.array([n, n]), np.array([n * (n + 1) // 2] * 2))
    all_heads = k.rank_rates(segments, 3, "forward", 1.0)
    assert k.rank_rates(segments, 3, "forward", 1.0, heads=32).tolist() == all_heads.tolist()
    few = k.rank_rates(segments, 3, "forward", 1.0, heads=1)
    assert few[:2] == pytest.approx(0.5 * all_heads[:2]) and few[2] == all_heads[2]   # an idle rank: the best


def test_the_schedules_heads_per_call():
    cfg = SimConfig(M8B, 8, 65536, 8)
    context, shape = plan_context(cfg, default_profile()), AttnShape(32, 8, 128)
    docs = [4096] * 8 + [32768]

    def heads(name, **options):
        return dry_schedule(name, docs, 8, context, **options).kernel_heads(shape)
    assert heads("ulysses") == 4 and heads("ulysses", head_groups=2) == 2
    assert heads("usp") == 32 / dry_schedule("usp", docs, 8, context).ulysses_degree
    assert heads("cad") == heads("zigzag") == heads("ring") == heads("allgather") == 32
    assert heads("allgather", heads_per_step=1) == 4   # one KV head's query heads a call
    assert heads("wlb") == 32


def test_ulysses_at_cp_32_slows_while_cad_does_not():
    """Llama-3 8B on 32 GPUs, CP 32: Ulysses runs one head per call (the table's fewest, 4, stands in),
    usp 4, cad all 32. The measured term is small (<= ~3%): the step moves by a fraction of that."""
    kernel = AttentionKernel.measured(GPUS["h100"], 128, _table())
    before = dataclasses.replace(kernel, heads_term=None)
    rows = {}
    for name, k in (("after", kernel), ("before", before)):
        cfg = SimConfig(M8B, 32, 524288, 32, kernel=k, batch=1, activation_checkpointing="full")
        rows[name] = {r["scheduler"]: r["step_time_s"] for r in simulate(cfg, default_profile(), ["ulysses", "cad"])}
    assert rows["after"]["cad"] == rows["before"]["cad"]
    assert rows["before"]["ulysses"] < rows["after"]["ulysses"] < 1.03 * rows["before"]["ulysses"]


def test_a_strong_head_penalty_moves_ulysses_only(tmp_path):
    """A table where 4 heads run at half speed per FLOP: Ulysses' attention pays it, zigzag's not."""
    kernel = AttentionKernel.measured(GPUS["h100"], 128, _csv(tmp_path / "lat.csv", {1: 1.0, 8: 0.5}))
    rows = {}
    for name, k in (("after", kernel), ("before", dataclasses.replace(kernel, heads_term=None))):
        cfg = SimConfig(M8B, 32, 262144, 32, kernel=k, batch=1, activation_checkpointing="full")
        rows[name] = {r["scheduler"]: r["step_time_s"] for r in simulate(cfg, default_profile(), ["ulysses", "zigzag"])}
    assert rows["after"]["zigzag"] == rows["before"]["zigzag"]
    assert rows["after"]["ulysses"] > 1.05 * rows["before"]["ulysses"]


def test_the_gpu_reports_kernel_cases_hold_1_4_and_32_heads_per_call():
    from distattn.bench import gpu_report
    from distattn.kernels.tools import bench

    args = gpu_report.KERNEL_ARGS
    assert gpu_report._kernel_arg("--heads") == ["1", "4", "32"]
    sweep = bench.head_cases([int(n) for n in gpu_report._kernel_arg("--heads-seq-lens")], [1, 4, 32], 32768)
    assert [(s, h, kv) for s, h, kv, _ in sweep] == [(4096, 32, 8), (4096, 4, 1), (4096, 1, 1),
                                                   (32768, 32, 8), (32768, 4, 1), (32768, 1, 1)]
    for s in (4096, 32768):   # equal work per call: 32x the tokens on one head
        tokens = {h: sum(lens) for n, h, _, lens in sweep if n == s}
        assert tokens[1] == 32 * tokens[32] and tokens[4] == 8 * tokens[32]
    lines = "\n".join(gpu_report.plan_lines(80 * 2**30, 15, 16384))
    assert len(re.findall(r"heads per call", lines)) == 6 and "--heads" in " ".join(args)
    with pytest.raises(ValueError, match="--heads"):
        bench.head_cases([4096], [0, 4], 32768)


def test_the_head_sweep_bookkeeping_on_cpu(capsys):
    from distattn.bench import gpu_tables as tables
    from distattn.kernels.tools import bench

    rows = bench.run([128], [(32, 32)], torch.float32, 64, 64, masks=("causal",), backends=("torch", "sdpa"),
                     rep_budget_s=0.0, device="cpu", heads=(1, 4, 8), heads_seq_lens=(64,), heads_head_dim=32)
    sweep = [r for r in rows if r["heads_sweep"]]
    assert len(rows) == 2 + 6 and [(r["heads"], r["kv_heads"]) for r in sweep[::2]] == [(8, 2), (4, 1), (1, 1)]
    assert all("GQA" in r["note"] for r in sweep if r["backend"] == "sdpa" and r["kv_heads"] != r["heads"])
    assert all(r["fwd"] > 0 for r in sweep if r["backend"] == "torch")
    table = tables.kernel_table(rows)
    assert any(line.startswith("| 32 | 1/1 |") for line in table)
    relative = tables.heads_table(rows)
    assert "over 8 heads'" in relative[1] and any(line.startswith("| 0K | 8/2 | n/a | n/a | 1.000 | 1.000")
                                                   for line in relative)
    assert tables.heads_table([r for r in rows if not r["heads_sweep"]]) == []
    assert [g.verdict for g in tables.goals(rows, None, None)][:2] == ["not measured"] * 2   # sweep rows stay out
    assert "heads   1/1" in capsys.readouterr().out
