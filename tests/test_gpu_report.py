"""The GPU report without a GPU (``distattn/bench/gpu_*.py``; ``python -m distattn.bench.gpu_report``
forwards to it): its configs and the estimate they are judged by (the trainer's, the same figure as
``distattn train --dry-run``), the settings and lengths the estimate picks, the waves of memory runs,
TFLOP/s arithmetic, goal verdicts, tables, ``--plan``, the no-GPU report, and one real (CPU) run
through the runner."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distattn.kernels.tools import bench
from distattn.sim.memory_model import GIB
from distattn.bench import gpu_plan as plan, gpu_report, gpu_tables as tables
from distattn.bench.gpu_runner import STOPPED, Outcome, read_rows
from distattn.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
H100 = 80 * GIB


def _all_runs():
    return plan.memory_runs(H100) + plan.stack_runs(H100) + plan.backend_runs(15, 16384)


def test_every_runs_config_trains_its_setting(tmp_path):
    runs = _all_runs()
    assert len(runs) == 9 + 2 + 3
    for i, run in enumerate(runs):
        path = tmp_path / f"{i}.yaml"
        path.write_text(run.yaml(str(tmp_path / f"run{i}")))
        cfg = load_config(path)
        assert (cfg.data.seq_len, cfg.train.dtype, cfg.parallel.cpu_offload, cfg.train.mlp_chunk,
                cfg.train.activation_checkpointing, cfg.parallel.backend, cfg.world_size) == \
            (run.seq_len, "bf16", run.setting.cpu_offload, run.setting.mlp_chunk, run.setting.checkpointing,
             run.backend, 1), run.name
        assert cfg.replace(train={"out": run.config().train.out}) == run.config()   # the folder aside


def test_the_estimate_is_the_figure_dry_run_prints(tmp_path):
    run = plan.stack_runs(H100)[-1]
    path = tmp_path / "stack.yaml"
    path.write_text(run.yaml(str(tmp_path / "run")))
    done = subprocess.run([sys.executable, "-m", "distattn.cli", "train", str(path), "--dry-run", "--estimate-for",
                           "gpu", "--gpu-memory-gib", "80"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    printed = float(re.search(r"fits: ([\d.,]+) GiB per GPU", done.stdout).group(1).replace(",", ""))
    assert printed == pytest.approx(run.estimate().total / GIB, abs=0.006)


def test_longest_fitting_is_the_longest_multiple_that_fits():
    setting, step = plan.OFFLOAD_SETTING, plan.LENGTH_STEP
    for gib in (24, 40):
        n = plan.longest_fitting(plan.SMALL, setting, gib * GIB)
        assert n > 0 and n % step == 0
        assert plan.fits(plan.TrainRun("", plan.SMALL, n, setting, 1), gib * GIB)
        assert not plan.fits(plan.TrainRun("", plan.SMALL, n + step, setting, 1), gib * GIB)
    assert plan.longest_fitting(plan.SMALL, setting, 4 * GIB) == 0   # the CUDA runtime alone is 4 GiB


def test_the_fit_keeps_the_goals_margin():
    assert plan.budget(110) == 100 and plan.budget(109) == 99
    run = plan.backend_runs(15, 16384)[0]
    total = run.estimate().total
    assert plan.fits(run, math.ceil(total * 1.1) + 1) and not plan.fits(run, math.floor(total * 1.1) - 1)


def test_the_first_setting_that_fits_is_chosen():
    sizes = {s: 100 - 10 * i for i, s in enumerate(plan.BY_COST)}
    fit = lambda run, gpu_bytes: sizes[run.setting] <= plan.budget(gpu_bytes)   # noqa: E731
    assert plan.choose_setting(plan.SMALL, 1, 88, fit) == plan.BY_COST[2]
    assert plan.choose_setting(plan.SMALL, 1, 10, fit) is None
    for run in plan.stack_runs(H100):   # the real estimate: nothing cheaper would fit
        earlier = plan.BY_COST[:plan.BY_COST.index(run.setting)]
        assert plan.fits(run, H100)
        assert not any(plan.fits(plan.TrainRun("", run.model, run.seq_len, s, 1), H100) for s in earlier)
    assert [r.seq_len for r in plan.stack_runs(H100)] == [32768, 131072]


def test_memory_runs_cover_every_setting_and_the_longest_cpu_offload_length():
    runs = plan.memory_runs(H100)
    assert {(r.setting, r.seq_len) for r in runs[:-1]} == {(s, n) for s in plan.MEMORY_SETTINGS
                                                           for n in plan.MEMORY_SEQ_LENS}
    last = runs[-1]
    assert last.setting.cpu_offload and last.seq_len % plan.LENGTH_STEP == 0
    longer = plan.TrainRun("", last.model, last.seq_len + plan.LENGTH_STEP, last.setting, 1)
    assert plan.fits(last, H100) and not plan.fits(longer, H100)


def test_waves_share_the_gpu_within_its_memory():
    sizes = [("a", 60), ("b", 30), ("c", 25), ("d", 20), ("e", 200), ("f", 5)]
    groups = plan.waves(sizes, 100, most=3)
    assert sorted(n for g in groups for n in g) == list("abcdef")
    assert ["e"] in groups
    size = dict(sizes)
    assert all(len(g) <= 3 and (len(g) == 1 or sum(size[n] for n in g) * 1.1 <= 100) for g in groups)


def test_tflops_from_times():
    assert bench.tflops(2e12, 2.0) == pytest.approx(1000.0)
    assert bench.tflops(1e12, None) is None and bench.tflops(1e12, 0.0) is None
    r = bench.rates(1e12, 1.0, 5.0)
    assert r["fwd"] == pytest.approx(1000.0) and r["bwd"] == pytest.approx(500.0)
    assert r["fwd_bwd"] == pytest.approx(3.5e12 / 6e-3 / 1e12)
    assert bench.rates(1e12, 1.0, None)["fwd_bwd"] is None


def test_case_flops_count_visible_pairs():
    s = 1024
    assert bench.case_flops([s], True, 16, 128, 128) == 2 * (s * (s + 1) // 2) * 16 * 256
    assert bench.case_flops([s, s], False, 16, 192, 128) == 2 * 2 * s * s * 16 * 320
    lens = bench.case_lens(8192, "doc", 32768)
    assert sum(lens) == 32768 and len(lens) > 4
    assert bench.case_lens(131072, "causal", 32768) == [131072]


def test_timed_calls_stop_at_the_budget_or_the_cap():
    assert not bench.enough([500.0, 500.0], 0.3)               # fewer than MIN_REPS
    assert bench.enough([200.0] * bench.MIN_REPS, 0.3)        # 128K: a few calls
    assert not bench.enough([1.0] * 10, 0.3)                  # 8K: more ...
    assert bench.enough([1.0] * bench.MAX_REPS, 0.3)          # ... up to the cap


def test_unsupported_cases_say_why():
    assert "Dv != Dqk" in bench.unsupported("torch", "causal", 192, 128)
    assert bench.unsupported("torch", "doc", 128, 128) is None
    assert "n/a" in bench.unsupported("sdpa", "doc", 128, 128)
    assert [c[2] for c in bench.cases([131072, 8192], ["causal"], [(64, 64)])] == [8192, 131072]


def _kernel_rows(tri_fb=400.0, torch_fb=380.0, bwd=360.0):
    rows = []
    for hd in ("64", "128"):
        for s in (8192, 32768):
            rows.append({"head_dim": hd, "seq_len": s, "mask": "causal", "backend": "triton", "fwd": 500.0,
                         "bwd": bwd, "fwd_bwd": tri_fb, "note": ""})
            rows.append({"head_dim": hd, "seq_len": s, "mask": "causal", "backend": "torch", "fwd": 450.0,
                         "bwd": 300.0, "fwd_bwd": torch_fb, "note": ""})
    rows.append({"head_dim": "192/128", "seq_len": 8192, "mask": "causal", "backend": "torch", "fwd": None,
                 "bwd": None, "fwd_bwd": None, "note": "n/a: FlashAttention-2 has no Dv != Dqk"})
    return rows


def _outcome(run, peak_gib=None, mfu=0.45, code=STOPPED):
    rows = [] if peak_gib is None else [{"step": i + 1, "loss": 5.0 - i, "tokens_per_s": 1000.0 * (i + 1), "mfu": mfu,
                                         "peak_memory_gib": peak_gib * (0.9 if i == 0 else 1.0)}
                                        for i in range(run.steps)]
    return Outcome(run, code if rows else 1, rows, 12.0, "RuntimeError: CUDA out of memory", 1)


def test_goal_verdicts_follow_the_numbers():
    runs = plan.memory_runs(H100)[:2]
    good = [_outcome(r, (r.estimate().total - r.estimate().runtime) / GIB * 1.05) for r in runs]
    stack = [_outcome(plan.stack_runs(H100)[0], 30.0, mfu=0.41)]
    found = tables.goals(_kernel_rows(), tables.memory_rows(good), tables.stack_rows(stack))
    assert [g.verdict for g in found] == ["met"] * 5
    off = [_outcome(runs[0], (runs[0].estimate().total - runs[0].estimate().runtime) / GIB * 1.2)]
    found = tables.goals(_kernel_rows(tri_fb=370.0, bwd=340.0), tables.memory_rows(off),
                         tables.stack_rows([_outcome(plan.stack_runs(H100)[0], 30.0, mfu=0.39)]))
    assert [g.verdict for g in found] == ["NOT met"] * 5
    assert "min 0.97x" in found[0].measured
    assert [g.verdict for g in tables.goals(None, None, None)] == ["not measured"] * 5
    failed = tables.memory_rows([_outcome(runs[0])])
    assert failed[0]["ratio"] is None and tables.goals(None, failed, None)[3].verdict == "not measured"


def test_tables_have_a_cell_per_column():
    runs = plan.memory_runs(H100)[:2]
    mem = tables.memory_table(tables.memory_rows([_outcome(runs[0], 7.0), _outcome(runs[1])]))
    stack = tables.stack_table(tables.stack_rows([_outcome(r, 50.0) for r in plan.stack_runs(H100)]))
    backends = tables.backend_table([_outcome(r, 9.0) for r in plan.backend_runs(15, 16384)])
    kernels = tables.kernel_table(_kernel_rows())
    for lines in (mem, stack, backends, kernels):
        table = [line for line in lines if line.startswith("|")]
        assert len({line.count("|") for line in table}) == 1, table
    assert "failed (exit 1, 0/3 steps)" in mem[3] and "n/a" in kernels[-3]
    assert "1.05x" in kernels[2] and "met" in stack[2] and "-" in stack[3].split("|")[5]
    assert "Dv != Dqk" in kernels[-1]


def test_summaries_leave_out_the_warmup_and_keep_the_peak():
    rows = [{"tokens_per_s": t, "mfu": None if t == 1 else t / 100, "peak_memory_gib": p, "loss": 9 - t}
            for t, p in ((1, 5.0), (2, 7.0), (4, 6.0))]
    s = tables.summarize(rows, 1)
    assert s["tokens_per_s"] == 3 and s["mfu"] == pytest.approx(0.03) and s["peak_gib"] == 7.0
    assert s["loss"] == (8, 5) and s["steps"] == (2, 3)
    assert tables.ratio(11.0, 15 * GIB, 4 * GIB) == pytest.approx(1.0)


def test_plan_prints_the_runs_and_fits_the_budget():
    """Through the command the script runs (the bench layer's forwarder)."""
    done = subprocess.run([sys.executable, "-m", "distattn.bench.gpu_report", "--plan", "--gpu-memory-gib", "80"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "128K: chosen" in out and "cpu_offload @" in out and "kernel case hd 192/128 128K doc" in out
    total = float(re.search(r"rough total: .* = (\d+) s", out).group(1))
    assert total <= gpu_report.BUDGET_S


@pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU: the report would run for real")
def test_without_a_gpu_the_report_says_so(tmp_path, capsys):
    report = tmp_path / "r.md"
    assert gpu_report.main([str(report)]) == 0
    assert "No CUDA GPU on this machine" in report.read_text() and "no GPU" in capsys.readouterr().out


def test_rows_of_a_metrics_file_being_written(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step"')
    assert read_rows(path) == [{"step": 1}, {"step": 2}] and read_rows(tmp_path / "none") == []


def test_the_kernel_benchmark_bookkeeping_on_cpu(capsys):
    rows = bench.run([256], [(32, 32), (48, 32)], torch.float32, 512, 64, masks=("causal", "doc"),
                     backends=("torch", "fa3"), rep_budget_s=0.0, device="cpu")
    assert len(rows) == 2 * 2 * 2 and len(capsys.readouterr().out.splitlines()) == 8
    ran = [r for r in rows if r["backend"] == "torch" and r["head_dim"] == "32"]
    assert all(r["fwd"] > 0 and r["bwd"] > 0 and r["fwd_bwd"] > 0 and not r["note"] for r in ran)
    assert all(r["fwd"] is None and "Dv != Dqk" in r["note"] for r in rows if r["head_dim"] == "48/32"
               and r["backend"] == "torch")
    assert len([line for line in tables.kernel_table(rows) if line.startswith("| 32 ")]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="stands a CPU in for the GPU")
def test_main_runs_every_part_and_writes_the_report(tmp_path, monkeypatch):
    """The report's orchestration end to end with tiny CPU trainings (gloo, launched as the report
    launches them) standing in for the GPU runs, and the suite and kernel parts faked."""
    from distattn.costmodel.model_shape import ModelShape

    tiny = ModelShape(64, 1, 2, 1, 128, 256, tie_embeddings=True)
    runs = [plan.TrainRun(f"tiny {n}", tiny, 256, plan.Setting(c), 2, backend="torch")
            for n, c in ((1, "full"), (2, "none"), (3, "full"))]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_report, "_environment", lambda: ["- GPU: a CPU standing in"])
    monkeypatch.setattr(gpu_report, "_suite", lambda tmp, timeout: (True, ["suite faked"]))
    monkeypatch.setattr(gpu_report, "_kernels", lambda tmp, budget, table: (True, ["kernels faked"], _kernel_rows()))
    monkeypatch.setattr(gpu_report, "_gpu_bytes", lambda gib: H100)
    monkeypatch.setattr(plan, "memory_runs", lambda gpu_bytes: runs[:2])
    monkeypatch.setattr(plan, "stack_runs", lambda gpu_bytes: runs[2:3])
    monkeypatch.setattr(plan, "STACK_SEQ_LENS", (256,))
    monkeypatch.setattr(plan, "backend_runs", lambda steps, seq_len: [])   # (one process fewer: test time)
    report = tmp_path / "r.md"
    assert gpu_report.main([str(report)]) == 0
    text = report.read_text()
    assert [line for line in text.splitlines() if line.startswith("## ")] == ["## Goals", *(
        f"## {name}" for name in gpu_report.PARTS)]
    assert "| none | 256 |" in text and "| 256 | full |" in text and "Report written in" in text
    assert "| triton f+b vs torch (FA2), hd 64 | >= 1.0x at every length and mask | min 1.05x" in text
    assert list(tmp_path.iterdir()) == [report]
