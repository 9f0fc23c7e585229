"""Issue 42, as a user meets it: checkpoints that prove themselves, a full or read-only disk that costs
no data, signals at any moment, metrics files that are not what they seem, a learning rate that
survives resumes. Every probe runs the `distattn` command on real files (and real mounts, as root)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from ckpt_tools import flip, save_tiny
from conftest import slow_cases, small_yaml
from distattn.train.checkpoint import dcp as checkpoint, manifest
from distattn.train.safe_io import WriteFailed

DISTATTN = str(Path(sys.executable).with_name("distattn"))
SMALL = {"model": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128},
         "data": {"seq_len": 1024}, "parallel": {"dp": 1, "cp": 2},
         "train": {"steps": 4, "warmup_steps": 1, "ckpt_every": 2}}


def _cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([DISTATTN, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _one_line(done: subprocess.CompletedProcess, code: int) -> str:
    err = done.stderr.strip().splitlines()
    assert done.returncode == code and len(err) == 1 and "Traceback" not in done.stderr, (done.returncode,
                                                                                          done.stderr[-3000:])
    return err[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 4-step run (checkpoints step_2 and step_4); tests copy it."""
    folder = tmp_path_factory.mktemp("finished")
    done = _cli("train", small_yaml(SMALL, folder))
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def _copy(finished: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(config, run folder) of a copy of the finished run."""
    shutil.copytree(finished / "run", tmp_path / "run")
    return small_yaml(SMALL, tmp_path), tmp_path / "run"


# --- checksummed checkpoints -----------------------------------------------------------------------------------


def test_a_flipped_shard_is_named_and_the_checkpoint_before_it_is_used(finished, tmp_path):
    cfg, run = _copy(finished, tmp_path)
    shard = run / "ckpt" / "step_4" / "__1_0.distcp"
    flip(shard, shard.stat().st_size // 2, 256)   # 256 bytes of one weight, the file's size unchanged
    done = _cli("ckpt", "verify", run / "ckpt")
    assert done.returncode == 1, done
    assert f"FAIL {run / 'ckpt' / 'step_4'}: {shard} does not match its checksum" in done.stdout, done.stdout
    assert f"ok   {run / 'ckpt' / 'step_2'}: step 2" in done.stdout
    assert _cli("ckpt", "verify", run / "ckpt" / "step_2").returncode == 0

    done = _cli("train", cfg, "--resume", "--steps", 6)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from step_2, the newest checkpoint that verifies; skipped step_4: " in done.stdout
    assert f"{shard} does not match its checksum" in done.stdout, done.stdout
    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4, 5, 6]
    checkpoint.verify(run / "ckpt" / "step_4")   # saved again, whole


# --- a disk that is full or read-only --------------------------------------------------------------------------


@pytest.fixture
def mount(tmp_path):
    """``mount(folder, size_bytes, read_only=False)``: a tmpfs there (as root; skips elsewhere), gone after."""
    mounted = []

    def make(folder: Path, size: int, read_only: bool = False) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        opts = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(folder)
        return folder
    yield make
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_full_disk_costs_no_data(finished, tmp_path, mount):
    """A save that does not fit stops in one line; the metrics and the older checkpoint stay whole; a
    resume on the still-full disk is refused before any rank starts; once there is room it continues."""
    size = sum(p.stat().st_size for p in (finished / "run" / "ckpt" / "step_2").iterdir())
    # room for one checkpoint with the save's margin, not for two
    disk = mount(tmp_path / "disk", int(1.6 * size) + (1 << 20))
    cfg = small_yaml(SMALL, disk, train={"steps": 6})
    done = _cli("train", cfg)
    line = _one_line(done, 1)
    assert f"saving checkpoint {disk / 'run' / 'ckpt' / 'step_4'} failed: not enough free space" in line, line
    assert "newest good checkpoint: " + str(disk / "run" / "ckpt" / "step_2") in line, line
    assert [r["step"] for r in _rows(disk / "run")] == [1, 2, 3, 4]
    assert sorted(p.name for p in (disk / "run" / "ckpt").iterdir()) == ["step_2"]
    checkpoint.verify(disk / "run" / "ckpt" / "step_2")

    metrics = (disk / "run" / "metrics.jsonl").read_bytes()
    line = _one_line(_cli("train", cfg, "--resume"), 2)
    assert "MiB free but a checkpoint of this model takes about" in line, line
    assert (disk / "run" / "metrics.jsonl").read_bytes() == metrics

    subprocess.run(["mount", "-o", f"remount,size={8 * size}", str(disk)], check=True)
    done = _cli("train", cfg, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {disk / 'run' / 'ckpt' / 'step_2'}" in done.stdout
    assert [r["step"] for r in _rows(disk / "run")] == [1, 2, 3, 4, 5, 6]


def _save(directory: Path, step: int):
    save_tiny(directory, step, width=64)


def test_a_save_the_disk_refuses_names_the_cause_and_the_path(tmp_path, mount, monkeypatch):
    """The free-space check cannot see everything (another writer fills the disk): the write's own
    ENOSPC, and a read-only folder's EROFS, are one line each, with nothing left behind."""
    monkeypatch.setattr(checkpoint, "ROOM_MARGIN", 0.0)   # the check sees room: the write finds none
    monkeypatch.setattr(checkpoint, "ROOM_SLACK", 0)
    disk = mount(tmp_path / "disk", 256 << 10)
    _save(disk / "step_1", 1)
    from distattn.train.metrics import RunLog

    log = RunLog(disk, 10, 0, bar=False)
    ballast = disk / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
    try:   # fill the disk to the last page
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    os.close(fd)
    with pytest.raises(WriteFailed, match=rf"saving checkpoint {disk / 'step_2'} failed: No space left on device"):
        _save(disk / "step_2", 2)
    assert sorted(p.name for p in disk.iterdir()) == ["ballast", "metrics.jsonl", "step_1", "tb"]
    checkpoint.verify(disk / "step_1")

    def short_write(*args, **kwargs):   # how torch's zip writer reports a write the disk cut short
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.dcp, "save", short_write)
        with pytest.raises(WriteFailed, match=r"unexpected pos 704 vs 598; not enough free space: the disk filled "
                                              rf"while writing, 0.0 MiB free \({disk}\)"):
            _save(disk / "step_2", 2)
    with pytest.raises(WriteFailed, match=rf"writing {disk / 'metrics.jsonl'} failed: No space left on device"):
        log.step({"step": 1, "loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s_per_device": 1.0,
                  "mfu": None, "peak_memory_gib": 0.0, "comm_wait_s": 0.0, "flops_imbalance_all": 1.0,
                  "step_time_s": 1.0, "x": "y" * 8192}, record=True)

    read_only = mount(tmp_path / "ro", 1 << 20, read_only=True)
    with pytest.raises(WriteFailed, match=rf"saving checkpoint {read_only / 'step_1'} failed: Read-only file system"):
        _save(read_only / "step_1", 1)


def test_a_read_only_checkpoint_folder_is_refused_before_any_step(finished, tmp_path):
    """ckpt/ made read-only (a bind mount, so root cannot write either): the resume is refused up
    front instead of training steps no checkpoint could keep."""
    cfg, run = _copy(finished, tmp_path)
    ckpt = run / "ckpt"
    if subprocess.run(["mount", "--bind", str(ckpt), str(ckpt)], capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ckpt)], check=True)
        metrics = (run / "metrics.jsonl").read_bytes()
        line = _one_line(_cli("train", cfg, "--resume", "--steps", 6), 2)
        assert f"{ckpt} is not writable, so no checkpoint could be saved" in line, line
        assert (run / "metrics.jsonl").read_bytes() == metrics
    finally:
        subprocess.run(["umount", "-l", str(ckpt)], capture_output=True)


# --- metrics.jsonl that is not a plain file --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_a_metrics_file_that_is_not_a_plain_file_is_refused_and_left_alone(finished, tmp_path, kind):
    cfg, run = _copy(finished, tmp_path)
    metrics = run / "metrics.jsonl"
    metrics.unlink()
    target = tmp_path / "precious.txt"
    if kind == "fifo":
        os.mkfifo(metrics)
    else:
        target.write_text("someone else's file\nnot a metrics line")
        metrics.symlink_to(target)
    start = time.monotonic()
    line = _one_line(_cli("train", cfg, "--resume", "--steps", 6, timeout=60), 2)
    assert time.monotonic() - start < 30 and str(metrics) in line, line
    if kind == "fifo":
        assert metrics.is_fifo()
    else:
        assert metrics.is_symlink() and target.read_text() == "someone else's file\nnot a metrics line"


def test_a_dangling_metrics_link_in_a_new_folder_is_refused(tmp_path):
    cfg = small_yaml(SMALL, tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    line = _one_line(_cli("train", cfg, timeout=60), 2)
    assert "metrics.jsonl" in line and not (tmp_path / "elsewhere.jsonl").exists(), line


# --- the learning rate and the run a resume continues ----------------------------------------------------------


def test_the_learning_rate_schedule_survives_a_longer_resume(finished, tmp_path):
    """The finished 4-step run, resumed with --steps 6: the schedule ended at step 4 (lr_decay_steps
    is the first run's steps), so steps 5 and 6 stay at min_lr instead of climbing a new cosine."""
    cfg, run = _copy(finished, tmp_path)
    done = _cli("train", cfg, "--resume", "--steps", 6)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the learning rate decays over 4 steps" in done.stdout, done.stdout
    rows = _rows(run)
    min_lr = 3e-4
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[3]["lr"] >= rows[4]["lr"] == rows[5]["lr"] == pytest.approx(min_lr), [r["lr"] for r in rows]
    assert manifest.read(run / "ckpt" / "step_6").run["lr_decay_steps"] == 4

    # a longer schedule on purpose: set in the config, printed, stored from then on
    cfg = small_yaml(SMALL, tmp_path, train={"lr_decay_steps": 10})
    done = _cli("train", cfg, "--resume", "--steps", 8)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train.lr_decay_steps 10 replaces the checkpoint's 4" in done.stdout, done.stdout
    assert _rows(run)[6]["lr"] > min_lr and manifest.read(run / "ckpt" / "step_8").run["lr_decay_steps"] == 10


# One loop over the shape keys (checkpoint/resume.py's resume_config) refuses each: the default run changes
# dim, --slow each of the others too.
@pytest.mark.parametrize("change", [{"dim": 96}, *slow_cases({"n_layers": 3}, {"n_kv_heads": 4})])
def test_a_resume_with_another_model_shape_is_refused_before_any_rank(finished, tmp_path, change):
    _copy(finished, tmp_path)
    line = _one_line(_cli("train", small_yaml(SMALL, tmp_path, model=change), "--resume", timeout=60), 2)
    key, value = next(iter(change.items()))
    assert f"model.{key} {value} (checkpoint: {SMALL['model'][key]})" in line and "--resume" not in line, line


def test_switching_the_data_source_on_resume_is_refused(finished, tmp_path):
    """A token file instead of the stdlib corpus the checkpoint's data cursor points into."""
    import numpy as np

    _copy(finished, tmp_path)
    tokens = tmp_path / "tok"
    np.arange(4096, dtype=np.uint16).__mod__(256).astype(np.uint16).tofile(f"{tokens}.bin")
    np.save(f"{tokens}.idx.npy", np.array([0, 2048, 4096], dtype=np.int64))
    cfg = small_yaml(SMALL, tmp_path, data={"source": "tokens", "path": str(tokens)})
    line = _one_line(_cli("train", cfg, "--resume", timeout=60), 2)
    assert "data.source 'tokens' (checkpoint: 'stdlib')" in line and "--resume" not in line, line


# --- signals at any moment -------------------------------------------------------------------------------------

SIGNAL_TIMES = [1.0, 4.0]                            # the covering slice; all of them with --slow
SIGNAL_TIMES_SLOW = [0.5, 2.0, 6.0, 10.0]


def _signal_at(tmp_path: Path, seconds: float) -> dict:
    cfg = small_yaml(SMALL, tmp_path, parallel={"cp": 4}, train={"steps": 500, "ckpt_every": 1000})
    proc = subprocess.Popen([DISTATTN, "train", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    time.sleep(seconds)
    family = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=180)
    took = time.monotonic() - sent
    gone = psutil.wait_procs([psutil.Process(p) for p in family if psutil.pid_exists(p)], timeout=30)[1]
    run = tmp_path / "run"
    saved = sorted(p.name for p in (run / "ckpt").iterdir()) if (run / "ckpt").is_dir() else []
    steps = [r["step"] for r in _rows(run)] if (run / "metrics.jsonl").exists() else []
    return {"at_s": seconds, "code": proc.returncode, "stderr": err.strip(), "exit_s": round(took, 1),
            "left_behind": len(gone), "checkpoints": saved, "steps": steps}


def _check_signal(row: dict) -> None:
    lines = row["stderr"].splitlines()
    assert row["code"] == 143 and len(lines) == 1 and "Traceback" not in row["stderr"], row
    assert row["left_behind"] == 0, row
    if row["checkpoints"]:   # a checkpoint at the step it stopped after, and the line names it
        assert row["checkpoints"] == [f"step_{row['steps'][-1]}"] and "continue with --resume" in lines[0], row
    else:
        assert "no step had finished" in lines[0] or "before any rank started" in lines[0], row


@pytest.mark.parametrize("seconds", SIGNAL_TIMES)
def test_sigterm_to_the_group_at_any_moment(tmp_path, seconds):
    _check_signal(_signal_at(tmp_path, seconds))


@pytest.mark.slow
@pytest.mark.parametrize("seconds", SIGNAL_TIMES_SLOW)
def test_sigterm_to_the_group_at_any_moment_full(tmp_path, seconds):
    _check_signal(_signal_at(tmp_path, seconds))
