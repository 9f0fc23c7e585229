"""Every command and Python snippet of the manual -- README.md and docs/**/*.md -- runs as written, on a
fresh clone.

The pages' fenced ``bash`` blocks are read line by line, and each command is looked up in
:data:`COMMANDS`. That table says how the test runs the command:
- as written;
- with cheap flags where the command is long (a ``--steps 2``, a ``--dry-run``, smaller sizes);
- or not here, with the reason (a GPU, a cluster, or the setup that ``.ci/run`` itself just did).

A command missing from the table fails the test, so the table cannot drift from the pages; a command
written on several pages runs once. Python blocks run as written in a fresh interpreter (a long one
with :data:`SNIPPET_CHEAP`'s settings). A fragment (a block that imports nothing) runs after the first
snippet of ``docs/guides/core-api.md`` (:data:`USE_PAGE`), whose names it continues, and after its own
lines in :data:`FRAGMENT_SETUP`.

"A fresh clone" here is the checkout's tracked files, copied as they are in the working tree, so an
uncommitted README edit is what gets tested. The commands find ``distattn`` on ``PATH`` (the
checkout's ``.venv``, linked in) and the clone's own package first on ``PYTHONPATH``. The inputs a
user would bring (an nccl-tests log, two bench results) are written into the clone under the names the README uses.

Each command is one test, in the pages' order (the README first), in one clone. The default run covers the commands
that take seconds; ``--slow`` runs every one. ``pytest -s`` prints the table of each command's exit
code and time at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)   # the checkout's .venv when the tests run from it


class Way(NamedTuple):
    """How the test runs one README command: ``run`` (None: not here, ``why`` says why) and whether
    it belongs to the ``--slow`` run only."""

    run: str | None
    why: str = ""
    slow: bool = False


AS_WRITTEN = "AS_WRITTEN"
TINY_2 = "--steps 2"

COMMANDS: dict[str, Way] = {
    # the two first commands: .ci/run is the second, so its setup has just run on a fresh clone
    "bash scripts/setup.sh && .venv/bin/distattn train configs/tiny.yaml":
        Way(f".venv/bin/distattn train configs/tiny.yaml {TINY_2}", "setup.sh: run by .ci/run before the tests"),
    "bash scripts/setup.sh --with-slurm && .venv/bin/python -m pytest -q":
        Way(".venv/bin/python -m pytest -q --collect-only", "this is .ci/run itself: the tests are collected"),
    # the main job
    ".venv/bin/distattn train configs/tiny.yaml --scheduler cad --steps 100 --out runs/cad":
        Way(".venv/bin/distattn train configs/tiny.yaml --scheduler cad --steps 2 --out runs/cad", slow=True),
    ".venv/bin/distattn train configs/tiny.yaml --scheduler cad --steps 200 --out runs/cad --resume":
        Way(".venv/bin/distattn train configs/tiny.yaml --scheduler cad --steps 3 --out runs/cad --resume", slow=True),
    ".venv/bin/distattn train configs/tiny.yaml parallel.cp=2 train.lr=1e-4 train.min_lr=1e-5 --print-config":
        Way(AS_WRITTEN),
    "torchrun --nproc-per-node 8 -m distattn.cli train configs/llama3-8b-128k-64gpu.yaml":
        Way("torchrun --nproc-per-node 2 -m distattn.cli train configs/tiny.yaml parallel.cp=2 --steps 2 "
            "--out runs/torchrun", "64 GPUs: 2 CPU ranks of the tiny config under torchrun instead", slow=True),
    ".venv/bin/distattn launch configs/llama3-8b-128k-64gpu.yaml --backend slurm --nodes 8 --gpus-per-node 8 "
    "--dry-run": Way(AS_WRITTEN),
    # kernels (no GPU here: what runs without one)
    "python -m distattn.kernels.aot --arch 80,90":
        Way("python -m distattn.kernels.aot --arch 90 --kernels fwd --head-dims 64 --dtypes fp16",
            "every kernel x config takes minutes: one kernel, one head dim, one dtype", slow=True),
    "python -m distattn.kernels.sass --kernel fwd --config 128,64,8,3 --head-dim 128": Way(AS_WRITTEN, slow=True),
    "python -m distattn.kernels.bench": Way(None, "needs a CUDA GPU"),
    "pytest tests/test_gpu.py": Way(AS_WRITTEN),
    "bash scripts/gpu_report.sh": Way(AS_WRITTEN),
    "python -m distattn.bench.gpu_report --plan": Way(AS_WRITTEN),
    # launchers
    "distattn launch configs/tiny.yaml --backend local --out runs/launched":
        Way("distattn launch configs/tiny.yaml --backend local --out runs/launched train.steps=2", slow=True),
    "distattn launch CONFIG --backend torchrun --nodes 8 --gpus-per-node 8 --rdzv-host node001":
        Way("distattn launch configs/llama3-8b-128k-64gpu.yaml --backend torchrun --nodes 8 --gpus-per-node 8 "
            "--rdzv-host node001 --dry-run", "8 nodes: the command each node runs, printed"),
    "distattn launch CONFIG --backend slurm --nodes 8 --gpus-per-node 8 --partition gpu --wait":
        Way("distattn launch configs/llama3-8b-128k-64gpu.yaml --backend slurm --nodes 8 --gpus-per-node 8 "
            "--partition gpu --dry-run",
            "8 nodes: the batch script, printed (tests/test_launch.py submits to a real local Slurm)"),
    "distattn launch CONFIG --backend ray --ray-address auto":
        Way("distattn launch configs/llama3-8b-128k-64gpu.yaml --backend ray --ray-address auto --dry-run",
            "a Ray cluster: the job, printed (tests/test_launch.py runs it on a local Ray)"),
    # cluster measurement
    "distattn cluster probe --world-size 4 --sizes 4K:16M --out net.json":
        Way("distattn cluster probe --world-size 4 --sizes 4K:64K --out net.json", "sizes up to 64K, not 16M"),
    "bash cluster/build_nccl_tests.sh && distattn cluster nccl-tests --bin-dir nccl-tests/build --gpus 8 "
    "--out net.json": Way(None, "needs NCCL, CUDA GPUs and the network to fetch nccl-tests"),
    "distattn cluster nccl-parse all_gather.log": Way(AS_WRITTEN),
    "distattn cluster fit net.json": Way(AS_WRITTEN),
    "distattn cluster fit h100 --check": Way(AS_WRITTEN),
    # bench and simulate
    "distattn bench --quick --out bench/":
        Way("distattn bench --quick --out bench/ --world-sizes 2 --seq-lens 512 --schedulers zigzag --repeats 1",
            "a few minutes: one world size, one length, one scheduler", slow=True),
    "distattn bench --out bench/ --world-sizes 1,2,4,8 --seq-lens 4096,8192,16384 --doclens sample":
        Way("distattn bench --out bench/ --world-sizes 1,2 --seq-lens 512 --doclens sample --schedulers ring "
            "--repeats 1 --masks causal-doc", "minutes: two world sizes, one length, one mask", slow=True),
    "distattn simulate --gpus 512 --seq-len 512K --doclens sample --network h100 --sweep":
        Way(AS_WRITTEN, slow=True),
    "distattn simulate --gpus 256 --seq-len 512K --gpu h200 --tp 8 --sweep --draws 8": Way(AS_WRITTEN, slow=True),
    "distattn simulate --gpus 64 --seq-len 256K --model llama-34b --auto": Way(AS_WRITTEN, slow=True),
    "distattn simulate --gpus 64 --seq-len 128K --doclens sample --per-batch": Way(AS_WRITTEN, slow=True),
    "distattn simulate --gpus 16 --seq-len 64K --cp 8 --timeline t.csv": Way(AS_WRITTEN),
    "distattn simulate --calibrate fit/results.csv --holdout other/results.csv": Way(AS_WRITTEN, slow=True),
    # precision
    "python -m distattn.bench.precision":
        Way("python -m distattn.bench.precision --tokens 512 --world-sizes 2 --schedulers zigzag --dtypes bf16 "
            "--no-fp8-table", "12-20 min: one world size, one scheduler, 512 tokens", slow=True),
    "python -m distattn.bench.precision --backend reference --dtypes bf16 --world-sizes 1 64":
        Way("python -m distattn.bench.precision --backend reference --dtypes bf16 --world-sizes 1 4 --tokens 512 "
            "--schedulers ring --no-fp8-table", "world 64: worlds 1 and 4, 512 tokens", slow=True),
}

# Names a fragment uses that neither it nor the "Use" snippet defines (a framework's group, a layout).
FRAGMENT_SETUP = {
    "cp_group": "cp_group = mesh; idx = [list(range(len(q)))[::-1]]",
    "cu_seqlens": "cu_seqlens = torch.tensor([0, *torch.tensor(doc_lens).cumsum(0).tolist()], dtype=torch.int32)\n"
                  "max_seqlen, g = max(doc_lens), mesh",
}

# Cheap settings for a snippet whose run is long, as the commands get them (none today: the Trainer
# snippet trains 3 steps as written).
SNIPPET_CHEAP: dict[str, str] = {}

NCCL_LOG = """# nThread 1 nGpus 8 minBytes 1048576 maxBytes 4194304 step: 2(factor) warmup iters: 5 iters: 20
#  Rank  0 Group  0 Pid  41234 on    node01 device  0 [0x18] NVIDIA H100 80GB HBM3
#       size         count      type   redop    root     time   algbw   busbw #wrong     time   algbw   busbw #wrong
     1048576         32768     float    none      -1    20.51   51.12   44.73      0    20.13   52.09   45.58      0
     2097152         65536     float    none      -1    27.80   75.44   66.01      0    27.44   76.43   66.87      0
     4194304        131072     float    none      -1    40.02  104.80   91.70      0    39.61  105.89   92.65      0
# Avg bus bandwidth    : 67.5893
"""


def readme_blocks(text: str) -> list[tuple[str, int, str]]:
    """``(language, first line number, code)`` of each fenced block, its indentation removed."""
    blocks = []
    for m in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```", text, re.S | re.M):
        indent = len(m.group(1))
        code = "\n".join(line[indent:] for line in m.group(3).splitlines())
        blocks.append((m.group(2), text[:m.start()].count("\n") + 1, code))
    return blocks


def readme_commands(text: str) -> list[tuple[int, str]]:
    """``(line of the page, command)`` of every line of the ``bash`` blocks, comments dropped."""
    commands = []
    for lang, first, code in readme_blocks(text):
        for offset, line in enumerate(code.splitlines(), 1):
            command = re.sub(r"\s+#.*$", "", line).strip()
            if lang == "bash" and command and not command.startswith("#"):
                commands.append((first + offset, command))
    return commands


def fresh_clone(dest: Path) -> Path:
    """The checkout's tracked files, as they are in the working tree, plus the inputs users bring."""
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the README is tested from one")
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    (dest / ".venv").symlink_to(VENV)
    (dest / "all_gather.log").write_text(NCCL_LOG)
    for name, source in (("fit", "fit.csv"), ("other", "holdout.csv")):
        (dest / name).mkdir()
        shutil.copy2(ROOT / "tests" / "data" / "calibration" / source, dest / name / "results.csv")
    return dest


def clone_env(clone: Path) -> dict:
    return {**os.environ, "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(clone), "PYTHONUNBUFFERED": "1"}


def run_in(clone: Path, command: str, timeout: float = 1100) -> tuple[int, float, str]:
    started = time.perf_counter()
    try:
        done = subprocess.run(["bash", "-c", command], cwd=clone, env=clone_env(clone), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        rc, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = 124, f"timed out after {timeout:.0f} s\n{e.stdout or ''}{e.stderr or ''}"
    return rc, time.perf_counter() - started, out


USE_PAGE = "docs/guides/core-api.md"   # its first snippet is the one fragments continue


def manual_pages() -> list[tuple[str, str]]:
    """``(path from the checkout, text)`` of README.md, then every docs/ page in name order."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [(str(p.relative_to(ROOT)), p.read_text(encoding="utf-8")) for p in pages]


def manual_commands() -> list[tuple[str, str]]:
    """``("page:line", command)`` of every distinct command of the manual, where it is first written."""
    seen, out = set(), []
    for page, text in manual_pages():
        for line, command in readme_commands(text):
            if command not in seen:
                seen.add(command)
                out.append((f"{page}:{line}", command))
    return out


def test_every_readme_command_is_in_the_table():
    listed = [command for _, command in manual_commands()]
    missing = [c for c in listed if c not in COMMANDS]
    stale = [c for c in COMMANDS if c not in listed]
    assert not missing, f"commands of the manual this test does not know how to run; add them to COMMANDS: {missing}"
    assert not stale, f"COMMANDS lists commands neither the README nor docs/ has any more: {stale}"


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """One fresh clone for the module's commands, which run in the README's order (a ``--resume`` after
    its run, ``cluster fit net.json`` after the probe wrote it); the table of what ran, printed at the end."""
    rows: list[str] = []
    yield fresh_clone(tmp_path_factory.mktemp("clone")), rows
    print("\n| page:line | command run | rc | s | note |\n|---|---|---|---|---|\n" + "\n".join(rows))


def _command_params() -> list:
    params = []
    for where, command in manual_commands():
        way = COMMANDS.get(command, Way(None, "not in COMMANDS (test_every_readme_command_is_in_the_table fails)"))
        marks = [pytest.mark.slow] if way.slow else []
        params.append(pytest.param(where, command, way, marks=[*marks, pytest.mark.timeout(1200)], id=where))
    return params


@pytest.mark.parametrize("line, command, way", _command_params())
def test_readme_command_runs_on_a_fresh_clone(line, command, way, clone):
    folder, rows = clone
    if way.run is None:
        rows.append(f"| {line} | `{command}` | - | - | not here: {way.why} |")
        pytest.skip(way.why)
    run = command if way.run == AS_WRITTEN else way.run
    rc, seconds, out = run_in(folder, run)
    rows.append(f"| {line} | `{run}` | {rc} | {seconds:.1f} | {way.why} |")
    assert rc == 0, f"{line}: `{run}` exited {rc} after {seconds:.1f} s:\n{out[-3000:]}"


def python_snippets() -> list[tuple[str, str]]:
    """``("page:line", code)`` of each ``python`` block of the manual; a fragment (it imports nothing) after
    the snippet of :data:`USE_PAGE` it continues."""
    blocks = []
    for page, text in manual_pages():
        for lang, first, code in readme_blocks(text):
            for old, new in SNIPPET_CHEAP.items():
                code = code.replace(old, new)
            if lang == "python":
                blocks.append((page, f"{page}:{first}", code))
    use = next(code for page, _, code in blocks if page == USE_PAGE and "distattn.plan(" in code)
    snippets = []
    for _, where, code in blocks:
        if code is use or "import " in code:
            snippets.append((where, code))
            continue
        setup = [lines for name, lines in FRAGMENT_SETUP.items() if name in code]
        snippets.append((where, "\n".join([use, *setup, code])))
    return snippets


@pytest.mark.parametrize("where, code", python_snippets(), ids=lambda x: x if ":" in x and "\n" not in x else "")
def test_readme_python_snippet_runs(where, code, tmp_path):
    clone = fresh_clone(tmp_path)
    (clone / "snippet.py").write_text(code)
    rc, seconds, out = run_in(clone, f"{sys.executable} snippet.py", timeout=600)
    assert rc == 0, f"{where}: the snippet exited {rc} after {seconds:.1f} s:\n{out[-3000:]}"
