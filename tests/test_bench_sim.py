"""distattn bench --quick (real gloo runs: structure and sanity, not speed), distattn simulate on 512 GPUs,
--auto and --calibrate against the bench's own results."""

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


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = _run("bench", "--quick", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_quick_bench_writes_results_plots_and_tensorboard(bench_dir):
    with open(bench_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for col in ("scheduler", "world_size", "seq_len", "mask", "fwd_bwd_ms", "tflops", "flops_imbalance",
                "send_bytes", "peak_mem_mb"):
        assert col in rows[0]
    cases = {(r["world_size"], r["seq_len"], r["mask"]) for r in rows}
    assert len(cases) == 2 * 2 * 5
    for case in cases:
        assert SCHEDS <= {r["scheduler"] for r in rows if (r["world_size"], r["seq_len"], r["mask"]) == case}
    for r in rows:
        assert float(r["fwd_bwd_ms"]) > 0 and float(r["tflops"]) > 0 and float(r["peak_mem_mb"]) > 0
        assert float(r["flops_imbalance"]) >= 1.0 and int(r["send_bytes"]) > 0
    # the balanced layouts beat a plain ring on one causal document
    imb = {r["scheduler"]: float(r["flops_imbalance"]) for r in rows
           if (r["world_size"], r["seq_len"], r["mask"]) == ("4", "4096", "causal")}
    assert imb["ring"] > 1.5 and imb["zigzag"] < 1.05 and imb["cad"] < 1.1
    assert len(json.loads((bench_dir / "results.json").read_text())["rows"]) == len(rows)
    for png in ("time_vs_seq_len.png", "tflops_vs_world_size.png", "imbalance.png"):
        assert (bench_dir / png).read_bytes()[:4] == b"\x89PNG"
    assert any((bench_dir / "tb").iterdir())


def test_calibration_against_the_bench(bench_dir):
    out = _run("simulate", "--calibrate", str(bench_dir / "results.csv"), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = out.stdout.strip().splitlines()[-1]
    assert summary.startswith("median |error| per scheduler:")
    assert all(name in summary for name in SCHEDS)


def test_simulate_512_gpus_json():
    out = _run("simulate", "--gpus", "512", "--seq-len", "128K", "--model", "llama3-8b", "--json", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = {r["scheduler"]: r for r in json.loads(out.stdout)["results"]}
    assert set(results) == SCHEDS | {"wlb-ideal"}
    for r in results.values():
        assert r["gpus"] == 512 and r["cp"] * r["dp"] == 512
        assert r["step_time_s"] > 0 and 0 <= r["exposed_comm_s"] <= r["step_time_s"]
        assert 0 < r["compute_s"] <= r["step_time_s"] * (1 + 1e-9)
        assert r["compute_imbalance"] >= 1 and 0 <= r["dp_idle"] < 1 and 0 < r["mfu"] < 1 and r["memory_gb"] > 0
    assert results["wlb-ideal"]["step_time_s"] <= results["zigzag"]["step_time_s"]
    assert results["wlb-ideal"]["compute_imbalance"] <= results["zigzag"]["compute_imbalance"]
    assert results["cad"]["compute_imbalance"] < results["zigzag"]["compute_imbalance"]


def test_simulate_auto_recommends_a_mesh_and_bad_input():
    out = _run("simulate", "--gpus", "64", "--seq-len", "256K", "--model", "llama-34b", "--auto", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("recommended: ") and "dp " in last and " s/step" in last
    bad = _run("simulate", "--gpus", "64", "--seq-len", "128K", "--model", "gpt-5")
    assert bad.returncode == 2 and "--model" in bad.stderr
    bad = _run("simulate", "--gpus", "64", "--seq-len", "128K", "--cp", "3")
    assert bad.returncode == 2 and "--cp 3 must divide --gpus 64" in bad.stderr
