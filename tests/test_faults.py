"""Signals and dead callers: nothing outlives the process that started it, SIGTERM checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DISTATTN = str(Path(sys.executable).with_name("distattn"))
SMALL = {"model": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128},
         "data": {"seq_len": 1024}, "parallel": {"dp": 1, "cp": 2},   # 2 ranks: what 4 show, cheaper to start
         "train": {"steps": 500, "warmup_steps": 1, "ckpt_every": 1000}}


def _config(tmp_path, seq_len: int = 1024) -> Path:
    sections = {k: dict(v) for k, v in SMALL.items()}
    sections["train"]["out"] = str(tmp_path / "run")
    sections["data"]["seq_len"] = seq_len
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(sections))
    return path


def _alive(pids) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_gone(pids, seconds=15.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _alive(pids)


def _start_training(tmp_path, own_group: bool = False, seq_len: int = 1024):
    """`distattn train` running until its first step is logged (``own_group``: as the leader of its
    own process group, like a Slurm step); returns (process, its descendants)."""
    tmp_path.mkdir(exist_ok=True)
    proc = subprocess.Popen([DISTATTN, "train", str(_config(tmp_path, seq_len))], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=own_group)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    kids = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    assert len(kids) >= 3  # the forkserver and the two ranks
    return proc, kids


@pytest.mark.parametrize("to_group", [False, True], ids=["parent", "process-group"])
def test_sigterm_checkpoints_at_the_next_step_and_exits_143(tmp_path, to_group):
    """SIGTERM to the trainer alone, or to every process of it at once (how Slurm preempts, cancels
    and ends a job at its time limit; `timeout -s TERM` too): the ranks finish the step and save."""
    proc, kids = _start_training(tmp_path, own_group=to_group)
    if to_group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "--resume" in err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]["step"]
    # ckpt_every is 1000: the only checkpoint is the one SIGTERM asked for, at the last logged step
    assert [p.name for p in (tmp_path / "run" / "ckpt").iterdir()] == [f"step_{last}"]
    assert _wait_gone(kids) == []


def test_a_first_ctrl_c_checkpoints_and_exits_130_a_second_stops_at_once(tmp_path):
    """Ctrl-C reaches the whole terminal process group: the first is a SIGTERM (a checkpoint at the
    next step boundary, exit 130), a second one while it is saving stops every rank at once."""
    proc, kids = _start_training(tmp_path, own_group=True)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "stopped by SIGINT after step" in err and "--resume" in err, err
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert [p.name for p in (tmp_path / "run" / "ckpt").iterdir()] == [f"step_{last}"]
    assert _wait_gone(kids) == []

    # steps of a second or more, so the second Ctrl-C comes while the first is still being honoured
    proc, kids = _start_training(tmp_path / "twice", seq_len=32768)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)   # two signals sent at once arrive as one
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err, err
    assert _wait_gone(kids) == []


def test_sigkill_of_the_trainer_leaves_no_rank(tmp_path):
    proc, kids = _start_training(tmp_path)
    proc.kill()
    proc.communicate(timeout=30)
    assert _wait_gone(kids) == []


HUNG_CALLER = """
import time, torch.distributed as dist
from distattn.distributed.spawn import run_distributed
def hang():
    time.sleep(3600)
if __name__ == "__main__":
    run_distributed(hang, 4, timeout=3600)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_to_a_hung_run_distributed_caller_ends_every_rank(tmp_path, sig):
    script = tmp_path / "hung.py"
    script.write_text(HUNG_CALLER)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(psutil.Process(proc.pid).children(recursive=True)) < 5:  # forkserver + 4 ranks
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)
    kids = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGTERM:
        assert "Terminated: stopped by SIGTERM" in err
    assert _wait_gone(kids) == []
