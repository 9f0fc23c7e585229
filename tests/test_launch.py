"""distattn launch: torchrun and Slurm commands (dry runs checked, the sbatch script parsed by bash),
and real runs of a tiny config on this machine: torchrun, a private single-node Slurm, a local Ray cluster."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import local_slurm

EXE = str(Path(sys.executable).with_name("distattn"))
ROOT = Path(__file__).resolve().parents[1]


def _launch(*args, timeout=120):
    return subprocess.run([EXE, "launch", *args], capture_output=True, text=True, timeout=timeout)


def test_slurm_dry_run_is_a_valid_script(tmp_path):
    out = _launch(str(ROOT / "configs" / "llama3-8b-128k-64gpu.yaml"), "--backend", "slurm", "--nodes", "8",
                  "--gpus-per-node", "8", "--partition", "gpu", "--account", "lab", "--time", "02:00:00",
                  "--dry-run")
    assert out.returncode == 0, out.stderr
    script = out.stdout
    for expected in ("#SBATCH --nodes=8", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                     "#SBATCH --account=lab", "#SBATCH --time=02:00:00", "--rdzv-backend=c10d",
                     "--nproc-per-node=8", "srun ", "distattn.cli train"):
        assert expected in script, expected
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_torchrun_dry_run_and_layout_errors():
    out = _launch(str(ROOT / "configs" / "llama3-8b-512k-64gpu.yaml"), "--backend", "torchrun", "--nodes", "8",
                  "--gpus-per-node", "8", "--rdzv-host", "node001", "--dry-run")
    assert out.returncode == 0, out.stderr
    for expected in ("--nnodes=8", "--nproc-per-node=8", "--rdzv-endpoint=node001:29500", "train"):
        assert expected in out.stdout
    bad = _launch(str(ROOT / "configs" / "llama3-8b-512k-64gpu.yaml"), "--backend", "torchrun", "--nodes", "3",
                  "--gpus-per-node", "8", "--dry-run")
    assert bad.returncode == 2 and "needs dp * cp = 64 ranks" in bad.stderr


def _tiny_config(tmp_path) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["model"].update(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=128)
    cfg["data"]["seq_len"] = 512
    cfg["parallel"]["cp"] = 2
    cfg["train"].update(steps=2, out=str(tmp_path / "run"))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _check_tiny_run(tmp_path):
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert (tmp_path / "run" / "ckpt" / "step_2" / ".metadata").exists()


def test_torchrun_runs_the_tiny_job(tmp_path):
    out = _launch(str(_tiny_config(tmp_path)), "--backend", "torchrun", "--port", "29611", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    _check_tiny_run(tmp_path)


@pytest.mark.skipif(not local_slurm.available(), reason="needs root and Debian's slurmctld/slurmd "
                    "(bash scripts/setup.sh --with-slurm installs them)")
def test_slurm_runs_the_tiny_job(tmp_path):
    cluster = local_slurm.LocalSlurm(tmp_path / "slurm")
    with cluster as env:
        out = subprocess.run([EXE, "launch", str(_tiny_config(tmp_path)), "--backend", "slurm", "--wait",
                              "--wait-timeout", "300", "--log-dir", str(tmp_path / "logs")],
                             env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr + cluster.logs()
    first = out.stdout.splitlines()[0]
    assert first.startswith("submitted job ") and "log " in first
    assert "COMPLETED" in out.stdout.splitlines()[-1]
    log = Path(first.split("log ")[-1])
    assert "done: step 2" in log.read_text()
    _check_tiny_run(tmp_path)


def test_ray_runs_the_tiny_job(tmp_path):
    pytest.importorskip("ray.train")
    out = _launch(str(_tiny_config(tmp_path)), "--backend", "ray", "--ray-num-cpus", "2", timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ray job done: step 2" in out.stdout
    _check_tiny_run(tmp_path)


def test_local_dry_run():
    out = _launch(str(ROOT / "configs" / "tiny.yaml"), "--backend", "local", "--dry-run", "--out", "runs/x")
    assert out.returncode == 0
    assert "distattn.cli train" in out.stdout and "--out runs/x" in out.stdout
