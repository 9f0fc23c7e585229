"""Issue 57, item 5: a peer's failure is one line, everywhere. A rank stuck or dead during start-up, a
save or the checkpoint agreement gives one line on stderr naming the rank, the phase and the path, exit
code 1, no Python traceback of ours and no ``.partial`` checkpoint folder -- for local ranks
(``distattn train``) and under torchrun. Faults are planted by tests/peer_hooks.py."""

from __future__ import annotations

import os
import pickle
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch.distributed as dist
import yaml

import distattn
from distattn.distributed.comm import PeerFailed, PeerFailure, peer_failure, peer_phase
from distattn.distributed.spawn import RankError, run_distributed
from distattn.train.checkpoint import dcp as checkpoint

BIN = Path(sys.executable).parent
HOOKS = str(Path(__file__).with_name("peer_hooks.py"))
OURS = f'File "{Path(distattn.__file__).parent}'   # a traceback frame of the library's
TIMEOUT_S = 5


def _config(folder: Path, steps: int = 2, ckpt_every: int = 2, ranks: int = 2) -> Path:
    """A small fp32 run on ``ranks`` gloo ranks whose collectives give up after TIMEOUT_S seconds."""
    cfg = {"model": {"dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64},
           "data": {"seq_len": 512}, "parallel": {"dp": 1, "cp": ranks, "timeout_s": TIMEOUT_S},
           "train": {"steps": steps, "warmup_steps": 1, "ckpt_every": ckpt_every, "out": str(folder / "run")}}
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _hooked(fault: str, rank: int, *args, torchrun: bool = False) -> tuple[subprocess.CompletedProcess, float]:
    """``distattn train ARGS`` with ``fault`` planted in ``rank`` (locally, or under torchrun on 2 ranks,
    which waits 2 s, not 30, for a stuck rank to take its SIGTERM); the run and its seconds."""
    cmd = [sys.executable, HOOKS, fault, str(rank), "train", *map(str, args)]
    if torchrun:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(port), *cmd[1:]]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if torchrun and fault.startswith("stop"):
        _end_the_stuck_rank(proc)
    out, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), time.monotonic() - start


def _end_the_stuck_rank(torchrun: subprocess.Popen) -> None:
    """Once every other rank has exited, SIGKILL the stopped one: torchrun would wait 30 s for it to
    take its SIGTERM (torch 2.13 ignores --shutdown-timeout there) -- the user's wait, not ours."""
    deadline, seen = time.monotonic() + 120, set()
    while time.monotonic() < deadline and torchrun.poll() is None:
        try:
            kids = psutil.Process(torchrun.pid).children()
            states = [k.status() for k in kids]
        except psutil.NoSuchProcess:
            return
        seen |= {k.pid for k in kids}
        stuck = [k for k, state in zip(kids, states) if state == psutil.STATUS_STOPPED]
        if len(seen) == 2 and stuck and all(state in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE) for state in states):
            for k in stuck:
                k.kill()
            return
        time.sleep(0.1)


def _our_line(done: subprocess.CompletedProcess) -> str:
    """The one line our processes printed (torchrun's own summary aside), with no traceback of ours."""
    lines = [line for line in done.stderr.splitlines() if line.startswith("distattn train")]
    assert len(lines) == 1 and OURS not in done.stderr, done.stderr[-4000:]
    return lines[0]


def _ckpt(folder: Path) -> list[str]:
    return sorted(os.listdir(folder / "run" / "ckpt"))


# --- the translation, on the exceptions torch and gloo raise ----------------------------------------------------

CASES = [
    (dist.DistStoreError("wait timeout after 10000ms, keys: /default_pg/0//cpu//0/1"), "start-up",
     (1,), "did not join the process group within 5 s"),
    (RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                  "[127.0.0.1]:1973: Connection reset by peer. This is typically caused by a remote worker hanging"),
     "checkpoint agreement", (), "closed its connection (it died or was killed)"),
    (RuntimeError("Connection closed by peer [127.0.0.1]:4242"), "saving checkpoint step_6", (),
     "closed its connection (it died or was killed)"),
    (RuntimeError("Application timeout caused pair closure"), "saving checkpoint step_6", (), "did not answer within 5 s"),
    (dist.DistNetworkError("The client socket has failed to connect"), "start-up", (),
     "failed (The client socket has failed to connect)"),
]


def _raise_in_torch_distributed(exc: BaseException):
    """Raise ``exc`` from a frame of a torch.distributed module, where gloo's errors come from."""
    exec(compile("raise exc", "<torch.distributed>", "exec"), {"__name__": "torch.distributed.x", "exc": exc})


@pytest.mark.parametrize("exc, phase, ranks, what", CASES)
def test_a_peer_gone_or_silent_is_one_line_with_phase_and_path(exc, phase, ranks, what):
    failure = peer_failure(exc, phase, "/runs/x", 5)
    assert (failure.ranks, failure.what) == (ranks, what)
    with pytest.raises(PeerFailed) as raised:
        with peer_phase(phase, "/runs/x", 5):
            _raise_in_torch_distributed(exc)
    who = f"rank {ranks[0]}" if ranks else "a peer rank"
    assert str(raised.value) == f"{phase} (/runs/x): {who} {what}" and raised.value.__cause__ is exc
    again = pickle.loads(pickle.dumps(raised.value))   # it travels to the launching process whole
    assert isinstance(again, PeerFailed) and again.failure == raised.value.failure


@pytest.mark.parametrize("exc", [ValueError("parallel.cp must divide ..."), RuntimeError("CUDA out of memory"),
                                 KeyError("x")])
def test_other_errors_pass_unchanged(exc):
    assert peer_failure(exc, "start-up", "/runs/x") is None
    with pytest.raises(type(exc)) as raised:
        with peer_phase("start-up", "/runs/x"):
            raise exc
    assert raised.value is exc


def test_words_alone_do_not_make_a_peer_failure(monkeypatch):
    """A RuntimeError saying "timed out" that did not come out of torch.distributed passes unchanged; this
    library's own store waits (which name the ranks that never came) are translated."""
    import torch.distributed as dist

    # no group here yet, whatever an earlier test in this process left initialized
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    exc = RuntimeError("reading shard 3 timed out")
    with pytest.raises(RuntimeError) as raised:
        with peer_phase("start-up", "/runs/x"):
            raise exc
    assert raised.value is exc
    ours = RuntimeError("distattn: creating a DeviceMesh failed or timed out: rank 0 waited 5.0 s (the process "
                        "group's timeout, 5 s) for rank(s) [2, 3], which never got there.")
    with pytest.raises(PeerFailed, match=r"^start-up \(/runs/x\): ranks \[2, 3\] did not join the process group "
                                         r"within 5 s$"):
        with peer_phase("start-up", "/runs/x", 5):
            raise ours


def test_a_rank_tells_the_launcher_the_phase_it_is_in(monkeypatch):
    """Nested phases (the checkpoint agreement inside start-up): leaving the inner one is back in the outer."""
    from distattn.distributed import phases

    told: list = []
    monkeypatch.setattr(phases, "channel", lambda phase, path: told.append(phase))
    monkeypatch.setattr(phases, "_open", [])
    with peer_phase("start-up", "/r"):
        with peer_phase("checkpoint agreement", "/r/ckpt"):
            pass
    assert told == ["start-up", "checkpoint agreement", "start-up", None]


def test_blame_pins_the_failure_on_the_ranks_the_launcher_saw():
    failure = PeerFailure("saving checkpoint step_2", "/r/ckpt/step_2", (), "did not answer within 5 s", "timeout")
    assert failure.blame([3, 1]).line() == "saving checkpoint step_2 (/r/ckpt/step_2): ranks [1, 3] did not answer " \
                                           "within 5 s"
    assert failure.blame([1], "died (killed by SIGKILL)").line().endswith("rank 1 died (killed by SIGKILL)")


@pytest.mark.parametrize("rank, blamed, prints", [(0, (1,), True), (1, (1,), False), (1, (0,), True),
                                                   (2, (), True), (2, (1,), False)])
def test_under_a_launcher_rank_0_prints_or_a_rank_that_sees_it_gone(tmp_path, capsys, rank, blamed, prints):
    """Each rank decides alone (the group is broken): rank 0 prints; another rank only when rank 0 is the
    one that failed or it cannot tell which. Every rank exits 1, and ignores the launcher's SIGTERM from then."""
    import signal

    from distattn.cli.run_cmds import _peer_failed

    exc = PeerFailed(PeerFailure("checkpoint agreement", str(tmp_path / "ckpt"), blamed, "did not answer within 5 s"))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert _peer_failed(exc, tmp_path, rank) == 1
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert err == (f"distattn train: {exc}; the run stopped\n" if prints else ""), err


def test_only_partials_this_run_made_are_removed(tmp_path):
    (tmp_path / "step_4.partial").mkdir()              # an earlier run's: stays
    (tmp_path / "step_5.partial").write_text("mine")   # not a folder: not a save, stays
    before = checkpoint.partials(tmp_path)
    (tmp_path / "step_6.partial").mkdir()              # this run's
    (tmp_path / "notes.partial").mkdir()               # not a step: stays
    checkpoint.drop_new_partials(tmp_path, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.partial", "step_4.partial", "step_5.partial"]


def _silent_peer(seconds: float):
    """Rank 1 sleeps through a barrier that rank 0 waits in."""
    if dist.get_rank() == 1:
        time.sleep(seconds)
        return None
    with peer_phase("checkpoint agreement", "/runs/x/ckpt"):
        dist.barrier()


def test_the_launcher_names_the_rank_that_stayed_silent():
    with pytest.raises(RankError) as raised:
        run_distributed(_silent_peer, 2, 60, timeout=60, collective_timeout=3)
    exc = raised.value
    assert exc.rank == 0 and exc.silent == [1] and not exc.crashed, str(exc)
    assert isinstance(exc.original, PeerFailed) and exc.original.failure.phase == "checkpoint agreement"


# --- local ranks: `distattn train` -------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [1, 0])
def test_a_rank_stuck_in_a_save_is_named_and_leaves_no_partial(tmp_path, rank):
    """Rank 0 stuck: the launching process removes the partial rank 0 made; rank 1 stuck: rank 0 does."""
    done, _ = _hooked("stop-in-save", rank, _config(tmp_path))
    line = _our_line(done)
    ckpt = tmp_path / "run" / "ckpt"
    assert done.returncode == 1 and line == (f"distattn train: saving checkpoint step_2 ({ckpt / 'step_2'}): rank "
                                             f"{rank} did not answer within {TIMEOUT_S} s; the run stopped"), line
    assert _ckpt(tmp_path) == []


@pytest.mark.parametrize("rank, ranks", [(1, 2), (0, 3)])
def test_a_rank_killed_in_a_save_is_named_and_leaves_no_partial(tmp_path, rank, ranks):
    """Rank 0 dead among 3: its peers cannot tell who went (gloo names no rank), the launching process
    can, and removes the partial rank 0 made."""
    done, _ = _hooked("kill-in-save", rank, _config(tmp_path, ranks=ranks))
    line = _our_line(done)
    assert done.returncode == 1 and line.startswith("distattn train: saving checkpoint step_2 (") and \
        line.endswith(f"): rank {rank} died (killed by SIGKILL); the run stopped"), line
    assert _ckpt(tmp_path) == []


@pytest.mark.parametrize("fault, what", [("stop-at-start", f"did not answer within {TIMEOUT_S} s"),   # (joined)
                                         ("kill-at-start", "died (killed by SIGKILL)")])
def test_a_rank_stuck_or_dead_at_start_up_is_named(tmp_path, fault, what):
    done, _ = _hooked(fault, 1, _config(tmp_path))
    line = _our_line(done)
    assert done.returncode == 1 and line == f"distattn train: start-up ({tmp_path / 'run'}): rank 1 {what}; the run " \
                                            f"stopped", line


# --- under torchrun: each rank runs `distattn train` ----------------------------------------------------------------

ROOT_CAUSE_EXIT_1 = re.compile(r"rank\s*:\s*0 \(local_rank: 0\)\s*\n\s*exitcode\s*:\s*1 ")


def test_torchrun_a_rank_stuck_at_start_up_is_one_line(tmp_path):
    done, took = _hooked("stop-at-start", 1, _config(tmp_path), torchrun=True)
    line = _our_line(done)
    assert line == (f"distattn train: start-up ({tmp_path / 'run'}): rank 1 did not join the process group within "
                    f"{TIMEOUT_S} s; the run stopped"), line
    assert done.returncode == 1 and ROOT_CAUSE_EXIT_1.search(done.stderr), done.stderr[-3000:]
    assert not (tmp_path / "run" / "ckpt").exists() or _ckpt(tmp_path) == []


def test_torchrun_rank_0_stuck_in_a_save_is_named_by_rank_1_which_removes_the_partial(tmp_path):
    done, _ = _hooked("stop-in-save", 0, _config(tmp_path), torchrun=True)
    line = _our_line(done)
    ckpt = tmp_path / "run" / "ckpt"
    assert line == (f"distattn train: saving checkpoint step_2 ({ckpt / 'step_2'}): rank 0 did not answer within "
                    f"{TIMEOUT_S} s; the run stopped"), line
    assert _ckpt(tmp_path) == []


def test_torchrun_a_rank_killed_in_the_checkpoint_agreement_is_one_line(tmp_path):
    cfg = _config(tmp_path, steps=2, ckpt_every=1)
    first = subprocess.run([str(BIN / "distattn"), "train", str(cfg)], capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    done, _ = _hooked("kill-in-agreement", 1, cfg, "--steps", "4", "--resume", torchrun=True)
    line = _our_line(done)
    ckpt = tmp_path / "run" / "ckpt"
    assert line == (f"distattn train: checkpoint agreement ({ckpt}): rank 1 closed its connection (it died or was "
                    f"killed); the run stopped; rerun with --resume to continue from {ckpt / 'step_2'}"), line
    assert done.returncode == 1 and ROOT_CAUSE_EXIT_1.search(done.stderr), done.stderr[-3000:]
    assert _ckpt(tmp_path) == ["step_1", "step_2"]
