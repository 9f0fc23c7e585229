"""distattn launch: torchrun and Slurm commands (dry runs checked, the sbatch script parsed by bash),
and real runs of a tiny config on this machine: torchrun, a private single-node Slurm, a local Ray cluster."""

import json
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import local_slurm
from distattn.launch import LaunchOptions, sbatch_script, torchrun_command
from distattn.train.config import RunConfig, load_config

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
                     "#SBATCH --account=lab", "#SBATCH --time=02:00:00", "--rdzv-backend=distattn-c10d",
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
    assert [r["step"] for r in rows] == [1, 2]  # steps are counted from 1, as ckpt/step_2 is
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


def test_torchrun_dry_runs_are_what_runs(tmp_path):
    """One node: the printed command pastes back to the same argv and rendezvouses on 127.0.0.1."""
    out = _launch(str(ROOT / "configs" / "tiny.yaml"), "--backend", "torchrun", "--out", str(tmp_path / "a b"),
                  "--dry-run")
    assert out.returncode == 0, out.stderr
    argv = shlex.split(out.stdout)
    assert argv[1:3] == ["-m", "distattn.launch.torchrun"] and argv[argv.index("--out") + 1] == str(tmp_path / "a b")
    for expected in ("--nnodes=1", "--nproc-per-node=4", "--rdzv-backend=distattn-c10d",
                     "--rdzv-endpoint=127.0.0.1:29500", "--local-addr=127.0.0.1"):
        assert expected in argv, expected


def test_torchrun_layouts_that_cannot_work_are_refused():
    gpu = load_config(ROOT / "configs" / "llama3-8b-128k-64gpu.yaml")
    # 64 CPU processes of an 8B model on one node: the GPU config without --nodes/--gpus-per-node
    with pytest.raises(ValueError, match=r"--nodes 1 puts 64 on a node, which needs about [\d,]+ GiB.*"
                                         r"--nodes N --gpus-per-node G with N x G = 64 \(e\.g\. --nodes 8"):
        torchrun_command("c.yaml", gpu, LaunchOptions())
    with pytest.raises(ValueError, match="--nodes 1 puts 64 on a node"):
        sbatch_script("c.yaml", gpu, LaunchOptions())
    eight = LaunchOptions(nodes=8, gpus_per_node=8)
    with pytest.raises(ValueError, match=r"--rdzv-host is required with --nodes 8"):
        torchrun_command("c.yaml", gpu, eight)
    for loopback in ("localhost", "127.0.0.1", "::1", "0.0.0.0", "::"):
        with pytest.raises(ValueError, match=rf"--rdzv-host {loopback} is a loopback or unspecified address.*7 node"):
            torchrun_command("c.yaml", gpu, eight, rdzv_host=loopback)
    with pytest.raises(ValueError, match=r"needs dp \* cp = 64 ranks but --nodes 4 x 8 per node = 32"):
        torchrun_command("c.yaml", gpu, LaunchOptions(nodes=4, gpus_per_node=8), rdzv_host="node001")
    cmd = torchrun_command("c.yaml", gpu, eight, rdzv_host="node001")
    assert "--rdzv-endpoint=node001:29500" in cmd and not any(a.startswith("--local-addr") for a in cmd)
    tiny = RunConfig()
    for bad, match in (({"port": 70000}, "--port must be a TCP port"), ({"time": "2 hours"}, "--time '2 hours'"),
                       ({"max_restarts": -1}, "--max-restarts")):
        with pytest.raises(ValueError, match=match):
            torchrun_command("c.yaml", tiny, LaunchOptions(**bad))
    with pytest.raises(ValueError, match="--rdzv-host 'node 1' is not a hostname"):
        torchrun_command("c.yaml", tiny, LaunchOptions(), rdzv_host="node 1")


PROBE = """import json, os, sys, psutil
agent = psutil.Process(os.getppid())  # the torchrun agent, which hosts the stores
listen = [[c.laddr.ip, c.laddr.port] for c in agent.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
json.dump({"listen": listen, "master": [os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])]},
          open(sys.argv[1], "w"))
"""


def test_torchrun_stores_listen_only_on_the_rendezvous_host(tmp_path):
    """torchrun's c10d store (and the workers' MASTER_PORT store) listen on *:PORT; ours on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = torchrun_command("unused.yaml", RunConfig().replace(parallel={"dp": 1, "cp": 1}), LaunchOptions(port=port))
    train = len(cmd) - cmd[::-1].index("-m") - 1  # run a probe instead of the training job
    (tmp_path / "probe.py").write_text(PROBE)
    out = subprocess.run(cmd[:train] + [str(tmp_path / "probe.py"), str(tmp_path / "seen.json")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads((tmp_path / "seen.json").read_text())
    listening = {tuple(a) for a in seen["listen"]}
    assert ("127.0.0.1", port) in listening and tuple(seen["master"]) in listening
    assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening
