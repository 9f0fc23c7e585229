"""The main job: configs, data, same losses for every scheduler, resume exactness, the kill test."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from distattn.train.config import RunConfig, load_config, validate
from distattn.train.data.packer import Packer
from distattn.train.data.corpus import StdlibCorpus, TokenFileCorpus, write_token_file
from distattn.train.trainer import run

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"model": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128},
         "data": {"seq_len": 1024},
         "parallel": {"dp": 1, "cp": 4},
         "train": {"steps": 3, "warmup_steps": 1, "ckpt_every": 100}}


def _cfg(tmp_path, **changes) -> RunConfig:
    sections = {k: dict(v) for k, v in SMALL.items()}
    for section, values in changes.items():
        sections[section].update(values)
    sections["train"].setdefault("out", str(tmp_path / "run"))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(sections))
    return load_config(path)


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def test_config_validation(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {dim: 64, heads: 4}\n")
    with pytest.raises(ValueError, match="unknown config key 'model.heads'"):
        load_config(path)
    path.write_text("optimizer: {}\n")
    with pytest.raises(ValueError, match="unknown config section 'optimizer'"):
        load_config(path)
    with pytest.raises(ValueError, match="parallel.cp must be > 0"):
        validate(RunConfig().replace(parallel={"cp": 0}))
    with pytest.raises(ValueError, match="train.mlp_chunk must be >= 0"):
        validate(RunConfig().replace(train={"mlp_chunk": -1}))
    with pytest.raises(ValueError, match="data.path is required"):
        validate(RunConfig().replace(data={"source": "tokens"}))
    for cfg in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(cfg)  # every shipped config is valid


def test_packer_is_deterministic_resumable_and_dp_sharded():
    corpus = StdlibCorpus()
    a = Packer(corpus, 4096, seed=1)
    seqs = [a.next() for _ in range(5)]
    assert all(len(t) == 4096 and sum(lens) == 4096 for t, lens in seqs)
    b = Packer(corpus, 4096, seed=1)
    b.next()
    state = b.state()
    c = Packer(corpus, 4096, seed=1)
    c.load_state(state)
    for want in seqs[1:]:
        got = c.next()
        assert np.array_equal(got[0], want[0]) and got[1] == want[1]
    # two data-parallel ranks take alternate sequences of the same stream
    r0, r1 = Packer(corpus, 4096, seed=1), Packer(corpus, 4096, seed=1)
    assert np.array_equal(r0.next_batch(2, 0)[0], seqs[0][0]) and np.array_equal(r1.next_batch(2, 1)[0], seqs[1][0])


def test_token_file_source(tmp_path):
    docs = [np.arange(n) % 300 for n in (5, 1000, 17)]
    write_token_file(tmp_path / "corpus", docs)
    corpus = TokenFileCorpus(tmp_path / "corpus")
    assert corpus.lengths.tolist() == [5, 1000, 17]
    tokens, lens = Packer(corpus, 512, seed=0).next()
    assert len(tokens) == 512 and tokens.max() < 300
    with pytest.raises(ValueError, match="does not exist"):
        TokenFileCorpus(tmp_path / "missing")


def test_every_scheduler_gives_the_same_losses(tmp_path):
    """fp32: CP=1 and cp=4 with each scheduler agree on the first steps (relative difference < 1e-3)."""
    runs = {"cp1": {"parallel": {"cp": 1}}}
    for scheduler in ["ring", "zigzag", "allgather", "ulysses", "cad"]:
        runs[scheduler] = {"parallel": {"scheduler": scheduler}}
    runs["usp"] = {"parallel": {"scheduler": "usp", "ulysses_degree": 2}}
    losses = {}
    for name, changes in runs.items():
        cfg = _cfg(tmp_path, **changes).replace(train={"out": str(tmp_path / name)})
        losses[name] = [m["loss"] for m in run(cfg)]
    base = np.array(losses["cp1"])
    assert base[-1] < base[0]
    for name, values in losses.items():
        assert np.max(np.abs(np.array(values) - base) / base) < 1e-3, (name, values, base)


def test_fewer_tokens_than_ranks(tmp_path):
    """seq_len 3 on cp=4 leaves a rank without tokens: every scheduler still trains, as CP=1 does
    (usp with its default Ulysses degree, gcd(cp, kv heads))."""
    base = [m["loss"] for m in run(_cfg(tmp_path, data={"seq_len": 3}, parallel={"cp": 1},
                                        train={"steps": 2, "out": str(tmp_path / "cp1")}))]
    for scheduler in ["ring", "zigzag", "allgather", "ulysses", "usp", "cad"]:
        cfg = _cfg(tmp_path, data={"seq_len": 3}, parallel={"scheduler": scheduler},
                   train={"steps": 2, "out": str(tmp_path / scheduler)})
        losses = [m["loss"] for m in run(cfg)]
        assert np.allclose(losses, base, rtol=1e-4), (scheduler, losses, base)


def test_dp_and_fsdp(tmp_path):
    """dp 2 x cp 2 with DDP and with FSDP2 give the same losses."""
    ddp = [m["loss"] for m in run(_cfg(tmp_path, parallel={"dp": 2, "cp": 2}, train={"out": str(tmp_path / "a")}))]
    fsdp = [m["loss"] for m in run(_cfg(tmp_path, parallel={"dp": 2, "cp": 2, "dp_mode": "fsdp"},
                                        train={"out": str(tmp_path / "b")}))]
    assert np.allclose(ddp, fsdp, rtol=1e-4)
    assert (tmp_path / "a" / "tb").is_dir() and any((tmp_path / "a" / "tb").iterdir())


def _descendants(pid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def test_kill_a_rank_then_resume_exactly(tmp_path):
    """SIGKILL one rank after the first checkpoint: the job exits non-zero quickly with a clear
    message; --resume finishes with the same losses as an uninterrupted run."""
    steps = 8
    full = _cfg(tmp_path, train={"steps": steps, "ckpt_every": 2, "out": str(tmp_path / "full")})
    want = _losses_of(run(full))
    cfg_path = tmp_path / "killed.yaml"
    sections = {k: dict(v) for k, v in SMALL.items()}
    sections["train"].update(steps=steps, ckpt_every=2, out=str(tmp_path / "killed"))
    cfg_path.write_text(yaml.safe_dump(sections))
    cmd = [str(Path(sys.executable).with_name("distattn")), "train", str(cfg_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "killed" / "ckpt" / "step_2" / ".metadata").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    ranks = [pid for pid in _descendants(proc.pid) if pid not in _direct_children(proc.pid)]
    os.kill(ranks[-1], signal.SIGKILL)
    start = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.monotonic() - start < 60
    assert "a rank failed" in err and "--resume" in err
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    got = _losses(tmp_path / "killed")
    assert sorted(got) == list(range(1, steps + 1))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6), step


def _direct_children(pid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(pid).children()]


def _losses_of(history) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in history}


def test_checkpoint_metadata_unpickler_refuses_other_objects():
    import io
    import pickle

    from distattn.train.checkpoint.dcp_safe import _MetadataUnpickler

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        _MetadataUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()
