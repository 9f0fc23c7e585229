"""Issue 66 item 4, priced since issue 77 by the tile model (distattn.costmodel.tiles): the query heads one
kernel call runs (a Ulysses rank's share) matter only where a call's CTAs do not fill the SMs, the
longest then setting its time; how the schedules' heads per call reach the simulator, and the GPU
report's head sweep that measures it on a GPU. Seconds."""

import re

import numpy as np
import pytest
import torch

from distattn.costmodel.model_shape import GPUS, MODELS
from distattn.costmodel.network import default_profile
from distattn.planning.schedule import AttnShape
from distattn.sim.job import dry_schedule, plan_context
from distattn.sim.kernel import AttentionKernel
from distattn.sim.simulate import SimConfig, simulate

M8B = MODELS["llama3-8b"]


def test_rank_rates_run_at_the_heads_per_call():
    """Few heads of a short document leave most SMs idle: the rate falls; a long one fills them."""
    k = AttentionKernel.measured(GPUS["h100"], 128)
    for n, slower in ((2048, True), (65536, False)):
        segments = (np.array([0, 1]), np.array([n, n]), np.array([n * (n + 1) // 2] * 2), np.array([n, n]))
        all_heads = k.rank_rates(segments, 3, "forward", 32)
        few = k.rank_rates(segments, 3, "forward", 1)
        assert (few[0] < 0.9 * all_heads[0]) == slower and few[2] == few[:2].max()   # an idle rank: the best
        assert few[0] <= all_heads[0] * (1 + 1e-12)


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


def test_ulysses_at_cp_32_runs_one_head_per_call_at_its_documents_speed():
    """Llama-3 8B on 32 GPUs, CP 32: Ulysses runs one head per call over every document, cad all 32
    heads of its tasks. Whole documents keep the SMs full on one head but for the short ones: Ulysses'
    step moves by well under 5% against pricing its calls on all heads."""
    cfg = SimConfig(M8B, 32, 524288, 32, batch=1, activation_checkpointing="full")
    ulysses = dry_schedule("ulysses", [4096] * 64 + [262144], 32, plan_context(cfg, default_profile()))
    kernel = AttentionKernel.measured(GPUS["h100"], 128)
    one = kernel.rank_rates(ulysses.kernel_segments(), 32, "backward", ulysses.kernel_heads(AttnShape(32, 8, 128)))
    all_ = kernel.rank_rates(ulysses.kernel_segments(), 32, "backward", 32)
    assert ulysses.kernel_heads(AttnShape(32, 8, 128)) == 1 and 0.95 < one.min() / all_.max() <= 1 + 1e-12
    rows = {r["scheduler"]: r["step_time_s"] for r in simulate(cfg, default_profile(), ["ulysses", "cad"])}
    assert all(t > 0 for t in rows.values())


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
