"""distattn launch: torchrun and Slurm commands (dry runs checked, the sbatch script parsed by bash),
and real runs of a tiny config on this machine: torchrun, a private single-node Slurm, a local Ray cluster."""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
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


def _tiny_config(tmp_path, steps: int = 2) -> Path:
    """The tiny job: 2 ranks; ``steps`` many is one that runs until a signal stops it (no checkpoint
    is due before: the only one is the signal's)."""
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["model"].update(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=128)
    cfg["data"]["seq_len"] = 512
    cfg["parallel"]["cp"] = 2
    cfg["train"].update(steps=steps, out=str(tmp_path / "run"), ckpt_every=max(steps, 100))
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
    assert "done: steps 1-2" in log.read_text()
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


def test_slurm_script_warns_before_the_time_limit(tmp_path):
    """--signal=USR1@120 by default (--signal-lead 0: none), --cpus-per-task as before unless given, the
    log folder made by the script too, the shared paths named, and a batch shell that survives USR1."""
    config = str(_tiny_config(tmp_path))
    cfg = load_config(config)
    script = sbatch_script(config, cfg, LaunchOptions(log_dir=str(tmp_path / "logs")), out=str(tmp_path / "o"))
    for expected in ("#SBATCH --signal=USR1@120\n", "#SBATCH --cpus-per-task=2\n",
                     f"mkdir -p {tmp_path / 'logs'}\n", f"#SBATCH --output={tmp_path / 'logs'}/%x-%j.out",
                     "must live on a\n# filesystem the nodes share", f"#   the config: {config}\n",
                     f"#   train.out: {tmp_path / 'o'}\n", "trap ", "kill -USR1", 'wait "$srun_pid"'):
        assert expected in script, expected
    assert script.index("mkdir -p") < script.index("srun ")
    changed = sbatch_script(config, cfg, LaunchOptions(cpus_per_task=16, signal_lead=0))
    assert "#SBATCH --cpus-per-task=16\n" in changed and "#SBATCH --signal" not in changed
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    out = _launch(config, "--backend", "slurm", "--cpus-per-task", "8", "--signal-lead", "300", "--dry-run")
    assert out.returncode == 0 and "--cpus-per-task=8\n" in out.stdout and "--signal=USR1@300\n" in out.stdout
    for flag, value, match in (("--cpus-per-task", "0", "--cpus-per-task must be an integer >= 1"),
                               ("--signal-lead", "-1", "--signal-lead must be whole seconds, 0-65535"),
                               ("--signal-lead", "70000", "--signal-lead must be whole seconds, 0-65535")):
        bad = _launch(config, "--backend", "slurm", flag, value, "--dry-run")
        assert bad.returncode == 2 and match in bad.stderr, bad.stderr


def _wait_for_steps(proc, tmp_path, rows: int = 1, seconds: float = 180) -> None:
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + seconds
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= rows):
        assert (proc is None or proc.poll() is None) and time.monotonic() < deadline, \
            proc.communicate() if proc else "no step logged"
        time.sleep(0.1)


def _check_stopped_by_usr1(tmp_path, err: str) -> None:
    """One checkpoint, the signal's, at the last logged step; the line that says so."""
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]["step"]
    assert [p.name for p in (tmp_path / "run" / "ckpt").iterdir()] == [f"step_{last}"]
    assert (f"stopped by SIGUSR1 (Slurm's warning before the time limit) after step {last}; newest checkpoint "
            f"{tmp_path / 'run' / 'ckpt' / f'step_{last}'}, continue with --resume") in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("to_group", [False, True], ids=["parent", "process-group"])
def test_sigusr1_checkpoints_and_exits_0(tmp_path, to_group):
    """Local ranks: SIGUSR1 to `distattn train` alone (passed on to the ranks) or to every process of it
    (as Slurm signals a step: the forkserver ignores it) saves at the step boundary and exits 0."""
    proc = subprocess.Popen([EXE, "train", str(_tiny_config(tmp_path, 100000))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_steps(proc, tmp_path)
        os.killpg(proc.pid, signal.SIGUSR1) if to_group else proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    _check_stopped_by_usr1(tmp_path, err)


def test_torchrun_agent_passes_sigusr1_to_its_workers(tmp_path):
    """SIGUSR1 to the agent alone (its workers have sessions of their own): it neither dies of it --
    torchrun handles TERM, INT, HUP and QUIT only -- nor keeps it; the workers save and all exit 0."""
    config = str(_tiny_config(tmp_path, 100000))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = torchrun_command(config, load_config(config), LaunchOptions(port=port))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(proc, tmp_path)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    _check_stopped_by_usr1(tmp_path, err)


def _slurm_job_told_usr1(tmp_path, launch: list[str], scancel: list[str] | None, seconds: float = 120) -> str:
    """Submit the long tiny job, ``scancel --signal=USR1`` it after its first step (None: wait for its
    own ``--signal``), wait for it to end; returns ``scontrol show job`` then."""
    cluster = local_slurm.LocalSlurm(tmp_path / "slurm")
    with cluster as env:
        out = subprocess.run([EXE, "launch", str(_tiny_config(tmp_path, 100000)), "--backend", "slurm",
                              "--log-dir", str(tmp_path / "logs"), *launch], env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        job = out.stdout.split()[2].rstrip(":")
        _wait_for_steps(None, tmp_path)
        if scancel is not None:
            subprocess.run(["scancel", *scancel, "--signal=USR1", job], env=env, check=True, timeout=60)
        deadline = time.monotonic() + seconds
        while "JobState=RUNNING" in (show := subprocess.run(["scontrol", "show", "job", job], env=env,
                                                             capture_output=True, text=True).stdout):
            assert time.monotonic() < deadline, cluster.logs()
            time.sleep(0.5)
    assert "JobState=COMPLETED" in show and "ExitCode=0:0" in show, show + cluster.logs()
    _check_stopped_by_usr1(tmp_path, (tmp_path / "logs" / f"distattn-cfg-{job}.err").read_text())
    return show


@pytest.mark.skipif(not local_slurm.available(), reason="needs root and Debian's slurmctld/slurmd "
                    "(bash scripts/setup.sh --with-slurm installs them)")
# By default the batch shell (the script's trap passes USR1 on through srun); USR1 to the steps' processes
# alone with --slow: by default test_sigusr1_checkpoints_and_exits_0[process-group] signals every process of a
# local run as Slurm signals a step's.
@pytest.mark.parametrize("whom", [pytest.param([], marks=pytest.mark.slow, id="steps"),
                                  pytest.param(["--batch"], id="batch-shell")])
def test_slurm_sigusr1_checkpoints_and_completes(tmp_path, whom):
    """`scancel --signal=USR1` (what --signal=USR1@N sends: the steps' processes) or with --batch (the
    shell and srun, as --signal=B:USR1 would the shell): the job saves a checkpoint and ends COMPLETED, 0."""
    _slurm_job_told_usr1(tmp_path, [], whom)


@pytest.mark.slow
@pytest.mark.skipif(not local_slurm.available(), reason="needs root and Debian's slurmctld/slurmd "
                    "(bash scripts/setup.sh --with-slurm installs them)")
def test_slurm_time_limit_warning_checkpoints_and_completes(tmp_path):
    """The script's own #SBATCH --signal=USR1@100 of a 3-minute job: Slurm sends it 80 s in, or up to
    60 s earlier (its resolution), and the job ends COMPLETED with the checkpoint (about 70 s)."""
    _slurm_job_told_usr1(tmp_path, ["--time", "3", "--signal-lead", "100"], None, seconds=180)
