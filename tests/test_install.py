"""What a pip user gets: a wheel built from this checkout, installed with the core dependencies only
(no extra) into a fresh venv, used from a folder that is not the checkout. The core works --
plan, attention, the trainer on a built-in config -- and an adapter whose framework is missing is
one ImportError that names the extra to install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ONE_RANK = """
import tempfile, torch, torch.distributed as dist, distattn
dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
torch.manual_seed(0)
docs = [300, 5, 211]
q, k, v = (torch.randn(sum(docs), h, 16, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
plan = distattn.plan(docs, dist.group.WORLD, scheduler="zigzag")
out = distattn.attention(plan.shard(q), plan.shard(k), plan.shard(v), plan)
ref = distattn.reference_attention(q, k, v, docs, causal=True)
err = (plan.unshard(out.detach()) - ref).abs().max().item()
assert err < 1e-12, err
print("core attention ok", err)
from distattn.compat.ring_flash_attn import substitute_hf_flash_attn, zigzag_ring_flash_attn_varlen_func
try:
    substitute_hf_flash_attn(dist.group.WORLD, 1)
except ImportError as exc:
    assert "pip install 'distattn[hf]'" in str(exc), exc
    print("compat ok")
"""


def _run(argv, cwd, timeout=600, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, **kw)


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory) -> Path:
    """A venv holding torch and the built wheel of distattn with its core dependencies, nothing else."""
    tmp = tmp_path_factory.mktemp("install")
    built = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                  str(tmp / "dist"), str(ROOT)], cwd=tmp)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel, = (tmp / "dist").glob("distattn-*.whl")
    base = getattr(sys, "_base_executable", sys.executable)
    made = _run([base, "-m", "venv", str(tmp / "venv")], cwd=tmp)
    assert made.returncode == 0, made.stderr[-3000:]
    _link_torch(tmp / "venv")
    done = _run([str(tmp / "venv" / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], cwd=tmp,
                timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp


def _link_torch(venv: Path) -> None:
    """The same torch as here, the local CPU build, installed in ``venv`` as hard links to this one's
    files (unpacking its 750 MB again took most of this module's time; a copy where links cannot
    cross file systems). Links, not symlinks: a pip in ``venv`` that removed its torch would remove
    only its own names. pip sees torch installed and adds its dependencies (sympy, networkx, ...)
    while it installs the wheel's."""
    import torch

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    here = Path(torch.__file__).parent.parent
    site, = (venv / "lib").glob("python3*/site-packages")
    info, = here.glob(f"torch-{torch.__version__}.dist-info")
    for name in [info.name, *(info / "top_level.txt").read_text().split()]:
        shutil.copytree(here / name, site / name, copy_function=link)


def test_the_wheel_holds_the_core_and_runs_outside_the_checkout(core_venv):
    py, cli = core_venv / "venv" / "bin" / "python", core_venv / "venv" / "bin" / "distattn"
    listed = _run([str(py), "-m", "pip", "list", "--format=freeze"], cwd=core_venv).stdout.lower()
    for extra_only in ("megatron", "deepspeed", "transformers", "ray", "tensorboard", "pyarrow", "tokenizers"):
        assert extra_only not in listed, f"{extra_only} came with the core install:\n{listed}"
    done = _run([str(py), "-c", ONE_RANK], cwd=core_venv)
    assert done.returncode == 0 and "core attention ok" in done.stdout and "compat ok" in done.stdout, \
        done.stderr[-3000:]
    where = _run([str(py), "-c", "import distattn; print(distattn.__file__)"], cwd=core_venv).stdout
    assert str(ROOT) not in where and "site-packages" in where, where
    sample = _run([str(py), "-c", "from distattn.planning.doclens import load_doc_lens; print(len(load_doc_lens('sample')))"],
                  cwd=core_venv)
    assert sample.stdout.strip() == "4000", sample.stdout + sample.stderr   # --doclens sample, from the wheel

    dry = _run([str(cli), "train", "tiny", "--dry-run"], cwd=core_venv)
    assert dry.returncode == 0 and "the config is valid" in dry.stdout, dry.stdout + dry.stderr
    run = _run([str(cli), "train", "tiny", "--steps", "1", "--out", str(core_venv / "run")], cwd=core_venv)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (core_venv / "run" / "metrics.jsonl").read_text().count("\n") == 1
    assert (core_venv / "run" / "ckpt" / "step_1" / "manifest.json").exists()


@pytest.mark.parametrize("module, extra", [("distattn.parallel.hf", "hf"), ("distattn.parallel.megatron", "megatron"),
                                           ("distattn.parallel.deepspeed", "deepspeed")])
def test_an_adapter_without_its_framework_names_the_extra(core_venv, module, extra):
    py = core_venv / "venv" / "bin" / "python"
    done = _run([str(py), "-c", f"import {module}"], cwd=core_venv)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and last.startswith("ImportError: ") and f"pip install 'distattn[{extra}]'" in last, \
        done.stderr[-2000:]
