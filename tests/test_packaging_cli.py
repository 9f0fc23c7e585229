"""The built wheel holds every module under the distattn namespace; the console script works."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPING = {"distattn": "distattn", "kernels": "distattn/kernels", "parallel": "distattn/parallel",
           "launch": "distattn/launch", "cluster": "distattn/cluster"}


def test_wheel_contains_every_module(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info",
                                                             "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "whl"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "whl").glob("distattn-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"{dest}/{path.relative_to(ROOT / folder).as_posix()}"
                for folder, dest in MAPPING.items() for path in (ROOT / folder).rglob("*.py")}
    assert expected and expected <= names, sorted(expected - names)
    assert "distattn/cluster/templates/sbatch.sh.tmpl" in names
    # nothing generic at the top level of site-packages
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"distattn", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, tops


def test_console_script_demo_json():
    exe = Path(sys.executable).with_name("distattn")
    out = subprocess.run([str(exe), "demo", "--world-size", "3", "--doc-lens", "7,1,40,12", "--heads", "4",
                          "--kv-heads", "1", "--head-dim", "16", "--repeats", "1", "--json"], check=True,
                         capture_output=True, text=True, timeout=300)
    rows = json.loads(out.stdout.strip().splitlines()[-1])["rows"]
    assert [r["scheduler"] for r in rows] == ["ring", "zigzag", "allgather", "ulysses", "usp", "cad"]
    assert max(rows[0][f"err_{x}"] for x in ("out", "dq", "dk", "dv")) < 1e-4


def test_console_script_reports_bad_input():
    exe = Path(sys.executable).with_name("distattn")
    out = subprocess.run([str(exe), "demo", "--doc-lens", "4,-2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "doc_lens[1] = -2" in out.stderr


def test_gpu_report_without_a_gpu_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: tests/test_gpu.py covers the report's parts")
    report = tmp_path / "report.md"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_report.sh"), str(report)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no GPU" in done.stdout and "No CUDA GPU on this machine" in report.read_text()
