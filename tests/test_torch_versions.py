"""distattn on the torch versions it supports: importing it prints nothing (torch 2.14 renamed the
opaque-object API distattn's custom ops use, and its old names log a deprecation warning in every
process, so every rank of every run printed three), and the core install works on the newest torch
pip can reach, not only on the one this checkout's venv pins (tested: 2.13.0 and 2.14.1)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from test_install import ROOT, _run

# A fresh interpreter, so the import (and torch's registration behind it) really happens here.
IMPORT_QUIETLY = """
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import distattn, distattn.runtime.ops
for w in caught:
    print("WARNING", w.filename, w.category.__name__, str(w.message).replace(chr(10), " "))
print("AVAILABLE", distattn.runtime.ops.AVAILABLE)
"""


def _noise(done) -> list[str]:
    """The warnings a user of ``distattn`` would see from :data:`IMPORT_QUIETLY`'s run: Python warnings
    raised in distattn's files or about opaque objects, and any line on stderr that reads like a
    warning (torch logs its deprecations through ``logging``, not ``warnings``: ``W1127 ...
    torch/_opaque_base.py:6] torch._opaque_base is deprecated``)."""
    package = str(ROOT / "distattn")
    caught = [line for line in done.stdout.splitlines() if line.startswith("WARNING ")
              and (package in line or "/site-packages/distattn/" in line or "opaque" in line.lower())]
    logged = [line for line in done.stderr.splitlines() if re.search(r"warn|deprecat|opaque", line, re.I)]
    return caught + logged


def test_importing_distattn_warns_about_nothing():
    done = _run([sys.executable, "-c", IMPORT_QUIETLY], cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _noise(done) == [], f"torch {torch.__version__}:\n" + "\n".join(_noise(done))
    # the ops exist wherever torch has opaque objects (2.13 on): a quiet import that dropped them is no fix
    has_opaque = importlib.util.find_spec("torch._library.opaque_object") is not None
    assert f"AVAILABLE {has_opaque}" in done.stdout, done.stdout


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def _core_dependencies() -> list[str]:
    """pyproject's core dependencies other than torch (installed first, at the version under test)."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [dep for dep in deps if not re.match(r"torch\b", dep)]


def _newest_torch(py: Path, tmp: Path) -> str:
    """The torch version pip resolves for a plain ``pip install torch`` (its index, find-links and
    constraints: the newest a pip user here gets), or a skip when pip reaches none."""
    report = tmp / "torch.json"
    done = _run([str(py), "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "--quiet",
                 "--report", str(report), "torch"], cwd=tmp, timeout=600)
    if done.returncode != 0 or not report.exists():
        pytest.skip(f"pip cannot resolve torch (no index or network?): {done.stderr.strip()[-500:]}")
    version = json.loads(report.read_text())["install"][0]["metadata"]["version"]
    if _version(version) < _version(torch.__version__):
        pytest.skip(f"the newest torch pip reaches ({version}) is older than this venv's {torch.__version__}")
    return version


def _install(py: Path, what: list[str], tmp: Path, why: str) -> None:
    done = _run([str(py), "-m", "pip", "install", "-q", *what], cwd=tmp, timeout=1800)
    if done.returncode != 0:
        if re.search(r"No space left|Could not find a version|NewConnectionError|Read timed out|HTTPError",
                     done.stderr):
            pytest.skip(f"cannot install {why} (disk or network): {done.stderr.strip()[-800:]}")
        raise AssertionError(f"pip install {why} failed:\n{done.stderr[-3000:]}")


@pytest.mark.slow
@pytest.mark.timeout(3600)   # two torch installs (this venv's and test_install's own) and a training run
def test_the_core_install_works_on_the_newest_torch(tmp_path):
    base = getattr(sys, "_base_executable", sys.executable)
    made = _run([base, "-m", "venv", str(tmp_path / "venv")], cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    py = tmp_path / "venv" / "bin" / "python"
    version = _newest_torch(py, tmp_path)
    _install(py, [f"torch=={version}"], tmp_path, f"torch {version}")
    # setuptools and wheel: test_install builds the wheel without build isolation
    _install(py, [*_core_dependencies(), "pytest>=7", "pytest-timeout>=2", "setuptools>=64", "wheel"], tmp_path,
             "distattn's core dependencies and pytest")
    _install(py, ["--no-deps", "--no-build-isolation", str(ROOT)], tmp_path, "distattn")

    # the installed package (cwd is not the checkout), in a fresh interpreter of that venv
    quiet = _run([str(py), "-c", IMPORT_QUIETLY], cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "AVAILABLE True" in quiet.stdout, quiet.stdout
    assert _noise(quiet) == [], f"torch {version}:\n" + "\n".join(_noise(quiet))

    # test_install's core checks under that torch: its fixture builds the wheel into a venv of its own
    # with the torch of the interpreter running it, i.e. this one's
    nodes = ["tests/test_install.py::test_the_wheel_holds_the_core_and_runs_outside_the_checkout",
             "tests/test_install.py::test_an_adapter_without_its_framework_names_the_extra"]
    done = _run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "pytest"),
                 *nodes], cwd=ROOT, timeout=3000)
    assert done.returncode == 0 and " passed" in done.stdout, \
        f"torch {version}:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
