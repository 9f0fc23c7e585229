"""distattn logs, it does not print: embedded without logging configured, ``train()`` shows nothing (its
per-step lines are INFO records); ``distattn.configure_logging(ranks="all")`` shows every rank's messages,
each prefixed with its rank; the CLI's ``--log-level`` silences them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_tools import flip
from conftest import small_yaml

DISTATTN = str(Path(sys.executable).with_name("distattn"))
SMALL = {"model": {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64},
         "data": {"seq_len": 256}, "parallel": {"dp": 1, "cp": 2},
         "train": {"steps": 4, "warmup_steps": 1, "ckpt_every": 2}}
EMBEDDED = """
import sys
import distattn
from distattn.train.config import load_config
from distattn.train.trainer import run
if __name__ == "__main__":   # the ranks' forkserver imports this file
    if sys.argv[2] != "unconfigured":
        distattn.configure_logging("INFO", ranks=sys.argv[2])
    run(load_config(sys.argv[1]), resume=True)
"""


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> Path:
    """A finished 4-step run whose newest checkpoint has a flipped shard: a resume says it skipped it."""
    folder = tmp_path_factory.mktemp("logging")
    cfg = small_yaml(SMALL, folder)
    done = subprocess.run([DISTATTN, "train", str(cfg)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    shard = folder / "run" / "ckpt" / "step_4" / "__1_0.distcp"
    flip(shard, shard.stat().st_size // 2, 64)
    return folder


def _embedded(folder: Path, tmp_path: Path, ranks: str) -> list[str]:
    import shutil

    shutil.copytree(folder / "run", tmp_path / "run")
    cfg = small_yaml(SMALL, tmp_path)
    script = tmp_path / "embed.py"
    script.write_text(EMBEDDED)
    done = subprocess.run([sys.executable, str(script), str(cfg), ranks], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def test_embedded_without_logging_configured_nothing_shows(damaged, tmp_path):
    assert _embedded(damaged, tmp_path, "unconfigured") == []   # the two ranks' records, steps 3 and 4's too


def test_ranks_all_prefixes_every_ranks_messages(damaged, tmp_path):
    lines = [line for line in _embedded(damaged, tmp_path, "all") if not line.startswith("step ")]
    for rank in (0, 1):
        assert any(line.startswith(f"[rank {rank}] resuming from step_2, the newest checkpoint that verifies")
                   for line in lines), lines
    assert [line.split()[:3] for line in lines if "step " in line[:15]] == [["[rank", "0]", "step"]] * 2
    shown = _embedded(damaged, tmp_path / "again", "0")
    rank0 = [line for line in shown if not line.startswith("step ")]
    assert rank0 and all(line.startswith("resuming from step_2") for line in rank0), rank0
    assert [line.split()[1] for line in shown if line.startswith("step ")] == ["3/4", "4/4"]   # records at INFO


def test_the_cli_log_level_silences_distattn_messages(damaged, tmp_path):
    import shutil

    shutil.copytree(damaged / "run", tmp_path / "run")
    cfg = small_yaml(SMALL, tmp_path)
    done = subprocess.run([DISTATTN, "train", str(cfg), "--resume", "--steps", "5", "--log-level", "error"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "newest checkpoint that verifies" not in done.stdout + done.stderr
    assert "resuming from" in done.stdout   # the CLI's own line stays
    assert [line.split()[1] for line in done.stdout.splitlines() if line.startswith("step ")] == ["3/5", "4/5", "5/5"]


def test_configure_logging_refuses_what_it_does_not_know():
    import distattn

    with pytest.raises(ValueError, match="ranks must be '0'"):
        distattn.configure_logging("INFO", ranks="1")
    with pytest.raises(ValueError, match="level must be one of"):
        distattn.configure_logging("LOUD")
