"""distattn bench --quick (real gloo runs: structure and sanity, not speed), distattn simulate on 512 GPUs,
--auto and --calibrate against the bench's own results; issue 19's `python -m distattn.bench.memory`."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

EXE = str(Path(sys.executable).with_name("distattn"))
SCHEDS = {"ring", "zigzag", "allgather", "ulysses", "usp", "cad"}


def _run(*args, timeout=900):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout)


# The default run benches the quick suite at its shorter length (2K: both world sizes, every mask and
# scheduler, DeepSpeed's peer; a 4K case costs 3-4 times a 2K one on CPU) and, apart, the one 4K row the
# imbalance check needs (4 ranks, one causal document, cad: 1.25 at 2K, its pieces too coarse; ring's 1.75
# and zigzag's 1.0 do not depend on the length, so they are read at 2K); ``--slow`` benches the whole quick
# suite, both lengths, and reads all three at 4K from it.
QUICK_SEQ_LENS = ("2048", "4096")


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory, request):
    out = tmp_path_factory.mktemp("bench")
    whole = request.config.getoption("--slow")
    # one timed round instead of the quick suite's two: these tests check what it writes, not its speed
    done = _run("bench", "--quick", "--repeats", "1", "--out", str(out), *([] if whole else ["--seq-lens", "2048"]))
    assert done.returncode == 0, done.stderr[-3000:]
    if not whole:
        done = _run("bench", "--quick", "--repeats", "1", "--world-sizes", "4", "--seq-lens", "4096", "--masks",
                    "causal", "--schedulers", "cad", "--no-peers", "--out", str(out / "causal-4k"))
        assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_quick_bench_writes_results_plots_and_tensorboard(bench_dir):
    with open(bench_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for col in ("scheduler", "world_size", "seq_len", "mask", "fwd_bwd_ms", "tflops", "flops_imbalance",
                "send_bytes", "peak_mem_mb"):
        assert col in rows[0]
    cases = {(r["world_size"], r["seq_len"], r["mask"]) for r in rows}
    seq_lens = QUICK_SEQ_LENS if not (bench_dir / "causal-4k").exists() else QUICK_SEQ_LENS[:1]
    assert {s for _, s, _ in cases} == set(seq_lens)
    assert len(cases) == 2 * len(seq_lens) * 5 and {"prefix-lm", "causal-blockwise"} <= {r["mask"] for r in rows}
    for case in cases:
        assert SCHEDS <= {r["scheduler"] for r in rows if (r["world_size"], r["seq_len"], r["mask"]) == case}
    for r in rows:
        assert float(r["fwd_bwd_ms"]) > 0 and float(r["tflops"]) > 0 and float(r["peak_mem_mb"]) > 0
        assert float(r["flops_imbalance"]) >= 1.0 and int(r["send_bytes"]) > 0
    # the balanced layouts beat a plain ring on one causal document
    causal_rows, ring_len = rows, "4096"
    if (bench_dir / "causal-4k").exists():
        with open(bench_dir / "causal-4k" / "results.csv", newline="") as f:
            causal_rows, ring_len = rows + list(csv.DictReader(f)), "2048"
    imb = {r["scheduler"]: float(r["flops_imbalance"]) for r in causal_rows
           if (r["world_size"], r["seq_len"], r["mask"]) == ("4", "4096" if r["scheduler"] == "cad" else ring_len,
                                                           "causal")}
    assert imb["ring"] > 1.5 and imb["zigzag"] < 1.05 and imb["cad"] < 1.1
    assert len(json.loads((bench_dir / "results.json").read_text())["rows"]) == len(rows)
    for png in ("time_vs_seq_len.png", "tflops_vs_world_size.png", "imbalance.png"):
        assert (bench_dir / png).read_bytes()[:4] == b"\x89PNG"
    assert any((bench_dir / "tb").iterdir())


def test_the_memory_bench_keeps_its_old_command():
    """The memory bench moved to the train layer; the command issue 19 named runs it, arguments and exit code."""
    done = subprocess.run([sys.executable, "-m", "distattn.bench.memory", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("usage: python -m distattn.bench.memory") and "--budget-gib" in done.stdout
    done = subprocess.run([sys.executable, "-m", "distattn.bench.memory", "--no-such-flag"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "unrecognized arguments: --no-such-flag" in done.stderr, done.stderr[-3000:]


def test_calibration_against_the_bench(bench_dir):
    out = _run("simulate", "--calibrate", str(bench_dir / "results.csv"), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = out.stdout.strip().splitlines()[-1]
    assert summary.startswith("median |error| per scheduler:")
    assert all(name in summary for name in SCHEDS)


def test_simulate_512_gpus_json():
    out = _run("simulate", "--gpus", "512", "--seq-len", "128K", "--model", "llama3-8b", "--draws", "3", "--json",
               timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = {r["scheduler"]: r for r in json.loads(out.stdout)["results"]}
    assert set(results) == SCHEDS | {"wlb", "wlb-ideal", "ideal"}
    for r in results.values():
        assert r["gpus"] == 512 and r["cp"] * r["dp"] == 512 and r["draws"] == 3 and r["fits"]
        assert r["step_time_p10_s"] <= r["step_time_s"] <= r["step_time_p90_s"]
        assert r["checkpointing"] in ("none", "selective", "full", "offload") and 0 < r["memory_gib"] <= 80
        assert r["step_time_s"] > 0 and 0 <= r["exposed_comm_s"] <= r["step_time_s"]
        assert 0 < r["compute_s"] <= r["step_time_s"] * (1 + 1e-9)
        assert r["compute_imbalance"] >= 1 and 0 <= r["dp_idle"] < 1 and 0 < r["mfu"] < 1
        assert r["over_ideal"] >= 1 - 1e-9 and r["over_ideal_p10"] <= r["over_ideal"] <= r["over_ideal_p90"]
    assert results["wlb"]["speedup_vs_wlb"] == 1
    assert results["wlb-ideal"]["compute_imbalance"] <= results["zigzag"]["compute_imbalance"]
    assert results["cad"]["compute_imbalance"] < results["zigzag"]["compute_imbalance"]
    # the global bound: no placement beats it, the per-replica one included
    assert results["ideal"]["step_time_s"] <= min(r["step_time_s"] for r in results.values()) * (1 + 1e-9)
    assert results["ideal"]["compute_imbalance"] == pytest.approx(1, rel=1e-3)   # whole documents: tokens nearly even


# The default case sweeps 16 GPUs (a third of 64's CPU time: fewer cp values and meshes); the same
# --auto sweep and memory fit of llama-34b, 64 GPUs at 256K with --slow.
@pytest.mark.parametrize("gpus, seq_len", [("16", "64K"), pytest.param("64", "256K", marks=pytest.mark.slow)])
def test_simulate_auto_recommends_a_mesh_and_bad_input(gpus, seq_len):
    out = _run("simulate", "--gpus", gpus, "--seq-len", seq_len, "--model", "llama-34b", "--auto", "--draws", "1",
               timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("recommended: ") and "dp " in last and " s/step" in last
    bad = _run("simulate", "--gpus", "64", "--seq-len", "128K", "--model", "gpt-5")
    assert bad.returncode == 2 and "--model" in bad.stderr
    bad = _run("simulate", "--gpus", "64", "--seq-len", "128K", "--cp", "3")
    assert bad.returncode == 2 and "--cp 3 must divide --gpus 64" in bad.stderr


def test_auto_ranks_by_tokens_per_gpu_not_step_time(monkeypatch):
    import distattn.sim.sweep as sweep
    from distattn.costmodel.network import default_profile
    from distattn.sim.simulate import MODELS, SimConfig

    # 16 GPUs, 64K tokens: the most tokens/s per GPU among the settings that fit
    best, rows = sweep.recommend(SimConfig(MODELS["llama3-8b"], 16, 65536, 1), default_profile(), ["zigzag", "cad"])
    feasible = [r for r in rows if r["fits"]]
    assert {r["cp"] for r in rows} == {1, 2, 4, 8, 16} and best in feasible
    assert best["tokens_per_s_per_gpu"] == max(r["tokens_per_s_per_gpu"] for r in feasible)
    # TP holds: the CP sizes are those of 2-GPU CP ranks
    _, rows = sweep.recommend(SimConfig(MODELS["llama3-8b"], 16, 65536, 1, tp=2), default_profile(), ["zigzag"])
    assert {(r["tp"], r["cp"]) for r in rows} == {(2, 1), (2, 2), (2, 4), (2, 8)}

    # the rule alone, on figures where the two rankings are far apart
    def fake(cfg, network, names, batches, draws, sweep_cp):
        step = {1: 4.0, 2: 1.5, 4: 1.0, 8: 0.9}[cfg.cp]
        return [{"scheduler": "zigzag", "cp": cfg.cp, "dp": cfg.dp, "step_time_s": step, "fits": True,
                 "tokens_per_s_per_gpu": cfg.seq_len * cfg.dp / step / cfg.gpus}]

    monkeypatch.setattr(sweep, "rows", fake)
    best, rows = sweep.recommend(SimConfig(MODELS["llama3-8b"], 8, 4096, 1), None, ["zigzag"])
    assert [r["cp"] for r in rows] == [1, 2, 4, 8] and best["cp"] == 2  # not cp 8, the shortest step


def test_simulate_per_rank_timelines(tmp_path):
    from distattn.costmodel.network import default_profile
    from distattn.sim.simulate import (MODELS, PHASES, TIMELINE_COLUMNS, SimConfig, simulate,
                                       simulate_with_timelines, write_timeline)

    # 4 replicas of 8 ranks, 4 nodes; compute at full speed while transfers move (else exposed_comm_s, what
    # communication adds, also counts compute slowed by transfers, beyond what ranks stand at waits)
    cfg = SimConfig(MODELS["llama3-8b"], 32, 65536, 8, dp_transfers=False, comm_slowdown=0.0)
    results, timeline = simulate_with_timelines(cfg, default_profile())

    def timed(rows):   # (planning_s is measured: it varies run to run)
        return [{k: v for k, v in r.items() if k != "planning_s"} for r in rows]
    assert timed(results) == timed(simulate(cfg, default_profile())) and len(results) == 9
    assert len(timeline) == 9 * 32 * len(PHASES) and all(set(t) == set(TIMELINE_COLUMNS) for t in timeline)
    for r in results:
        step = r["step_time_s"]
        ranks = {}
        for t in timeline:
            if t["scheduler"] == r["scheduler"]:
                ranks.setdefault(t["rank"], {})[t["phase"]] = t
        assert sorted(ranks) == list(range(32))
        busy = []
        for rank, ph in ranks.items():
            assert (ph["compute"]["replica"], ph["compute"]["cp_rank"], ph["compute"]["node"]) == \
                (rank // 8, rank % 8, rank // 8)
            assert all(t["seconds"] >= 0 and t["end_s"] - t["start_s"] == t["seconds"] for t in ph.values())
            # compute, exposed communication and idle tile the step; overlapped communication hides in compute
            assert ph["compute"]["start_s"] == 0 and ph["compute"]["end_s"] == ph["exposed_comm"]["start_s"]
            assert ph["exposed_comm"]["end_s"] == ph["idle"]["start_s"]
            assert sum(ph[p]["seconds"] for p in ("compute", "exposed_comm", "idle")) == pytest.approx(step, rel=1e-12)
            assert ph["idle"]["end_s"] == pytest.approx(step, rel=1e-12)
            assert ph["overlapped_comm"]["seconds"] <= ph["compute"]["seconds"]
            busy.append(ph["compute"]["seconds"] + ph["exposed_comm"]["seconds"])
        assert max(busy) == pytest.approx(step) and min(ranks[i]["idle"]["seconds"] for i in ranks) == 0
        assert max(ph["compute"]["seconds"] for ph in ranks.values()) == pytest.approx(r["compute_s"])
        # the slowest rank's time at waits (for transfers, or for the slower ranks a transfer needs) and
        # its transfer time hidden behind compute; exposed_comm_s is what communication adds to the step
        slowest = ranks[max(ranks, key=lambda i: busy[i])]
        assert slowest["exposed_comm"]["seconds"] == pytest.approx(r["stalled_s"])
        assert slowest["overlapped_comm"]["seconds"] == pytest.approx(max(r["comm_s"] - r["stalled_s"], 0))
        assert 0 <= r["exposed_comm_s"] <= r["stalled_s"] + 1e-9
        # what each replica computed: the rest of its step it waited for the slowest replica
        replica_compute = [max(ranks[j]["compute"]["seconds"] for j in range(i * 8, (i + 1) * 8)) for i in range(4)]
        assert r["dp_idle"] == pytest.approx(sum((step - b) / step for b in replica_compute) / 4)
    assert sum(t["seconds"] for t in timeline
               if t["scheduler"] in ("wlb-ideal", "ideal") and t["phase"].endswith("comm")) == 0

    write_timeline(timeline, tmp_path / "t.csv")
    with open(tmp_path / "t.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == TIMELINE_COLUMNS and len(rows) == len(timeline)
    with pytest.raises(ValueError, match="Chrome trace"):   # (.json: the trace, tests/test_profile.py)
        write_timeline(timeline, tmp_path / "t.json")
    with pytest.raises(ValueError, match="--timeline .*t.txt: name a .csv or .json file"):
        write_timeline(timeline, tmp_path / "t.txt")


def test_simulate_cli_timeline_and_auto(tmp_path):
    out = _run("simulate", "--gpus", "16", "--seq-len", "64K", "--auto", "--draws", "1", "--timeline",
               str(tmp_path / "a.json"), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("recommended: ") and "tokens/s per GPU" in last
    chosen = last.removeprefix("recommended: ").split(",")[0]
    events = json.loads((tmp_path / "a.json").read_text())["traceEvents"]
    assert {e["args"]["name"] for e in events if e["name"] == "process_name"} == \
        {f"{chosen} rank {r} (simulated)" for r in range(16)}
    out = _run("simulate", "--gpus", "16", "--seq-len", "64K", "--cp", "8", "--timeline", str(tmp_path / "t.csv"),
               "--schedulers", "ring", "zigzag", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "t.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2 * 16 * 4
    bad = _run("simulate", "--gpus", "16", "--seq-len", "64K", "--timeline", str(tmp_path / "t.txt"))
    assert bad.returncode == 2 and "--timeline" in bad.stderr and not (tmp_path / "t.txt").exists()
