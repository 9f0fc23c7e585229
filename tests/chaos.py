"""Crash-consistency trials and a chaos soak of `distattn train` (issue 31): the harness and its tables.

    python tests/chaos.py crash --trials 20     # SIGKILL at random moments of a checkpoint save
    python tests/chaos.py soak --steps 300      # a run interrupted every few steps, resumed each time

* ``crash``: each trial trains until step ``target`` and SIGKILLs every rank, or one rank alone, a
  random time into that step's save (up to the save's measured duration). The next resume must load
  the newest *complete* checkpoint (``step_target`` if the save finished, else the one before), name
  the unfinished one it skipped, and finish with the loss of an uninterrupted run, bitwise.
* ``soak``: ``distattn train`` in its own process group, interrupted after a random 2..``gap`` logged
  steps by SIGKILL of one rank, SIGTERM to the whole group (a Slurm preemption), SIGKILL of the
  trainer, SIGTERM followed by bytes flipped in the newest checkpoint's largest shard (``bit-flip``:
  the resume must skip it, naming the file) or a full disk (``full-disk``: the run lives on a tmpfs,
  filled to the last byte until the run stops on its own; the space comes back before the resume),
  then resumed (``--resume``; ``--overwrite`` when nothing was saved yet) until it finishes. Every
  line of ``metrics.jsonl`` must then equal the uninterrupted run's (timings aside), each step logged
  once. Without root (no tmpfs mount) the soak leaves ``full-disk`` out and says so.

``tests/test_chaos.py`` runs a covering slice by default and both tables in full with ``--slow``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml

from distattn.train.metrics import TIMINGS

DISTATTN = str(Path(sys.executable).with_name("distattn"))
KINDS = ("kill-rank", "term-group", "kill-parent", "bit-flip", "full-disk")


def write_config(folder: Path, steps: int, ckpt_every: int) -> Path:
    """A small fp32 run on 2 gloo ranks (zigzag), logged every step."""
    cfg = {"model": {"dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64},
           "data": {"seq_len": 512}, "parallel": {"dp": 1, "cp": 2},
           "train": {"steps": steps, "warmup_steps": 2, "ckpt_every": ckpt_every, "log_every": 1,
                     "out": str(folder / "run")}}
    path = folder / "cfg.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def rows(run: Path) -> list[dict]:
    """The complete lines of ``metrics.jsonl`` (one being written is left out)."""
    path = run / "metrics.jsonl"
    out = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def training(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMINGS}


def reference(folder: Path, steps: int, ckpt_every: int) -> list[dict]:
    cfg = write_config(folder, steps, ckpt_every)
    done = subprocess.run([DISTATTN, "train", str(cfg)], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    return rows(folder / "run")


# ---- crash consistency: SIGKILL inside a save -------------------------------------------------------------
def _train_killed_in_save(cfg, target: int, delay: float, who: str):
    """On a rank: train, SIGKILLing this process ``delay`` s into the save of step ``target`` (``who``:
    "all" ranks, or the rank number as a string)."""
    import torch.distributed as dist

    from distattn.train.checkpoint import dcp as checkpoint
    from distattn.train import trainer

    real = checkpoint.save

    def save(directory, model, optimizer, step, *args, **kwargs):
        if step == target and who in ("all", str(dist.get_rank())):
            threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
        return real(directory, model, optimizer, step, *args, **kwargs)
    checkpoint.save = save
    return trainer.train(cfg, False)


def _timed_train(cfg):
    """On a rank: train, returning how long each save took here."""
    from distattn.train.checkpoint import dcp as checkpoint
    from distattn.train import trainer

    real, took = checkpoint.save, []

    def save(*args, **kwargs):
        t0 = time.perf_counter()
        real(*args, **kwargs)
        took.append(time.perf_counter() - t0)
    checkpoint.save = save
    trainer.train(cfg, False)
    return took


def _resume(cfg):
    from distattn.train import trainer

    return trainer.train(cfg, True)


def crash_trials(folder: Path, trials: int, seed: int = 0, say=print) -> list[dict]:
    """``trials`` trials alternating "all ranks" and "one rank" (module docstring); one row each."""
    from distattn.distributed.spawn import RankError, run_distributed
    from distattn.train.checkpoint import dcp as checkpoint
    from distattn.train.config import load_config

    steps = 5
    ref = reference(folder / "reference", steps, 1)
    cfg = load_config(write_config(folder / "timing", steps, 1))
    save_s = sorted(run_distributed(_timed_train, 2, cfg, timeout=600)[0])[steps // 2]
    rng = random.Random(seed)
    table = []
    for trial in range(trials):
        who = "all" if trial % 2 == 0 else str(rng.randrange(2))
        target, delay = rng.randint(2, steps - 1), rng.uniform(0, save_s)
        cfg = load_config(write_config(folder / f"trial{trial}", steps, 1))
        ckpt = Path(cfg.train.out) / "ckpt"
        try:
            run_distributed(_train_killed_in_save, 2, cfg, target, delay, who, timeout=600)
            raise AssertionError(f"trial {trial}: the kill at {delay:.4f} s into step {target}'s save did not land")
        except RankError:
            pass
        said: list[str] = []
        used = checkpoint.newest_usable(ckpt, say=said.append)
        complete = [int(p.name[5:]) for p in ckpt.glob("step_*") if p.name[5:].isdigit()]
        partial = [p.name for p in ckpt.glob(f"step_*{checkpoint.PARTIAL}")]
        # the newest complete save is loaded, and every newer unfinished one is named as skipped
        assert used is not None and used.name == f"step_{max(complete)}", (trial, used, complete)
        for name in partial:
            assert int(name[5:-len(checkpoint.PARTIAL)]) < max(complete) or any(name in s for s in said), \
                (trial, name, said)
        left = "partial" if f"step_{target}{checkpoint.PARTIAL}" in partial else \
            ("complete" if target in complete else "nothing")
        history = run_distributed(_resume, 2, cfg, timeout=600)[0]
        logged = [r["step"] for r in rows(Path(cfg.train.out))]
        same = [training(r) for r in rows(Path(cfg.train.out))] == [training(r) for r in ref]
        row = {"trial": trial, "killed": "all ranks" if who == "all" else f"rank {who}", "step": target,
               "delay_ms": round(1e3 * delay, 1), "save_ms": round(1e3 * save_s, 1),
               "left": left, "resumed_from": used.name,
               "steps_logged_once": logged == list(range(1, steps + 1)), "identical_to_uninterrupted": same,
               "final_loss_diff": abs(history[-1]["loss"] - ref[-1]["loss"])}
        say(json.dumps(row))
        table.append(row)
    return table


# ---- the soak: a whole run under interruptions -------------------------------------------------------------
def _descendants(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    """The rank processes: the forkserver's children."""
    for child in _descendants(proc):
        try:
            if "forkserver" in " ".join(child.cmdline()):
                return child.children()
        except psutil.NoSuchProcess:
            pass
    return []


def _interrupt(proc: subprocess.Popen, kind: str, rng: random.Random, disk: Path) -> None:
    if kind == "kill-rank":
        ranks = _ranks(proc)
        if ranks:
            rng.choice(ranks).kill()
    elif kind in ("term-group", "bit-flip"):
        os.killpg(proc.pid, signal.SIGTERM)
    elif kind == "full-disk":
        _fill(disk / "ballast")
    else:
        proc.kill()


def _fill(path: Path) -> None:
    """Write ``path`` until its file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while os.write(fd, b"\0" * (1 << 16)):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def _flip_newest(ckpt: Path) -> str | None:
    """Invert 64 bytes in the middle of the newest checkpoint's largest shard, when an older checkpoint
    is there to fall back on; returns the file's path."""
    from distattn.train.checkpoint import dcp as checkpoint

    found, _ = checkpoint.candidates(ckpt)
    if len(found) < 2:
        return None
    shard = max(found[0].glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.seek(shard.stat().st_size // 2)
        data = f.read(64)
        f.seek(shard.stat().st_size // 2)
        f.write(bytes(b ^ 0xFF for b in data))
    return str(shard)


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def soak(folder: Path, steps: int, gap: int = 12, ckpt_every: int = 5, seed: int = 0, say=print,
         each_once: bool = False) -> dict:
    """Run ``steps`` steps under interruptions (module docstring); returns the summary row. With ``each_once``,
    once every kind has landed the run goes on uninterrupted to its end (a short slice with steps to spare:
    on a loaded machine an interruption may land a step or two after the one aimed at)."""
    ref = reference(folder / "reference", steps, ckpt_every)
    disk = folder / "soak"
    mounted = _mount_tmpfs(disk, "256m")
    kinds = KINDS if mounted else tuple(k for k in KINDS if k != "full-disk")
    if not mounted:
        say("no tmpfs could be mounted here (not root?): the soak runs without the full-disk fault")
    try:
        return _soak(folder, disk, kinds, ref, steps, gap, ckpt_every, seed, say, each_once)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _soak(folder, disk, kinds, ref, steps, gap, ckpt_every, seed, say, each_once=False) -> dict:
    from distattn.train.checkpoint import dcp as checkpoint

    cfg = write_config(disk, steps, ckpt_every)
    run = disk / "run"
    rng = random.Random(seed)
    counts = {kind: 0 for kind in kinds}
    restarts, lost, t0 = 0, 0, time.monotonic()
    argv = [DISTATTN, "train", str(cfg)]
    while True:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        done_before = max((r["step"] for r in rows(run)), default=0)
        stop_at = done_before + rng.randint(2, gap)
        every_kind_landed = each_once and all(counts.values())
        kind = kinds[sum(counts.values()) % len(kinds)] if stop_at < steps and not every_kind_landed else None
        while proc.poll() is None and kind is not None:
            if max((r["step"] for r in rows(run)), default=0) >= stop_at:
                family = [proc, *_descendants(proc)]
                _interrupt(proc, kind, rng, disk)
                proc.wait(timeout=300)
                psutil.wait_procs([p for p in family if isinstance(p, psutil.Process)], timeout=60)
                break
            time.sleep(0.05)
        _, err = proc.communicate(timeout=1800)
        if proc.returncode == 0 and max((r["step"] for r in rows(run)), default=0) == steps:
            break
        assert proc.returncode in (1, 143, -signal.SIGKILL), (proc.returncode, err[-2000:])
        if proc.returncode in (1, 143):   # stopped on its own terms: one line, no traceback
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err[-3000:]
        if kind == "full-disk":
            assert proc.returncode == 1 and ("No space left on device" in err or "not enough free space" in err), err
            (disk / "ballast").unlink()
            counts[kind] += 1
        elif kind == "bit-flip":
            flipped = _flip_newest(run / "ckpt")
            counts[kind] += flipped is not None
        elif kind is not None:
            counts[kind] += 1
        logged = max((r["step"] for r in rows(run)), default=0)
        try:
            saved = checkpoint.newest_usable(run / "ckpt")
        except ValueError:   # only unfinished saves: nothing to resume
            saved = None
        lost += logged - (int(saved.name.split("_")[1]) if saved else 0)
        argv = [DISTATTN, "train", str(cfg), "--resume" if saved else "--overwrite"]
        restarts += 1
        say(f"interruption {restarts}: {kind} after step {logged}, resuming from {saved.name if saved else 'scratch'}")
    got = rows(run)
    summary = {"steps": steps, "interruptions": sum(counts.values()), **counts, "resumes": restarts,
               "steps_lost_and_retrained": lost,
               "each_step_logged_once": [r["step"] for r in got] == list(range(1, steps + 1)),
               "metrics_identical": [training(r) for r in got] == [training(r) for r in ref],
               "final_loss_diff": abs(got[-1]["loss"] - ref[-1]["loss"]), "wall_s": round(time.monotonic() - t0)}
    say(json.dumps(summary))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("crash", "soak"))
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--folder", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="distattn-chaos-") as tmp:
        folder = args.folder or Path(tmp)
        if args.what == "crash":
            crash_trials(folder, args.trials)
        else:
            soak(folder, args.steps)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    import chaos   # the ranks import the functions by this module's name, not __main__

    raise SystemExit(chaos.main())
