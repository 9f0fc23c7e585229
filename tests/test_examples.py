"""The examples run as users run them (one script per framework) and their loss goes down."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script):
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^step \d+: loss ([0-9.]+)$", out.stdout, flags=re.M)]
    assert len(losses) == 5 and losses[-1] < losses[0], out.stdout
