"""The examples run as users run them (one script per framework) and their loss goes down."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))
CORE = EXAMPLES[0].parent / "core_torchrun.py"   # the core API under torchrun; the others train a framework's model


@pytest.mark.parametrize("script", [p for p in EXAMPLES if p != CORE], ids=lambda p: p.name)
def test_example_runs(script):
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^step \d+: loss ([0-9.]+)$", out.stdout, flags=re.M)]
    assert len(losses) == 5 and losses[-1] < losses[0], out.stdout


def test_cad_pingpong_benchmark_runs_as_a_module():
    """The ping-pong benchmark runs under its own name (not ``distattn.runtime.pingpong``, the API it measures)."""
    out = subprocess.run([sys.executable, "-m", "distattn.bench.cad_pingpong", "--world-size", "2", "--seq-len",
                          "1024", "--repeats", "1"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    header, row = out.stdout.strip().splitlines()[-2:]
    assert header.split()[:2] == ["sequential", "ms"], out.stdout
    assert float(row.split()[-1]) < 1e-4, out.stdout  # the overlapped layer computes what the sequential one does


def test_the_core_example_runs_as_written_under_torchrun():
    """The quick start's command, as written, in a fresh shell from the repo root (no venv on PATH: the
    ``.venv/bin/`` prefix is what finds torchrun); tests/test_documented_commands.py counts on this test."""
    from test_documented_commands import fresh_env

    out = subprocess.run(["bash", "-c", ".venv/bin/torchrun --nproc-per-node 4 examples/core_torchrun.py"],
                         cwd=CORE.parents[1], env=fresh_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    checked = [line.split(":")[0].strip() for line in lines if "max |out - ref|" in line]
    assert checked == ["ring", "zigzag", "allgather", "ulysses", "cad", "usp"], out.stdout
    assert lines[-1] == "4 ranks, 7 documents, 2576 tokens: ok", out.stdout
