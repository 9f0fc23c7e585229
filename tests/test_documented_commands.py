"""Every command of the manual -- the fenced ``bash`` blocks of README.md and docs/**/*.md -- works as written
in a fresh shell from the repository's root (issue 79).

"A fresh shell" is ``bash -c COMMAND`` with the system's ``PATH`` alone (no ``.venv/bin`` on it, no
``VIRTUAL_ENV``, no ``PYTHONPATH``), in a copy of the checkout (its tracked and new files as they are in
the working tree, and the checkout's ``.venv`` linked in: what ``scripts/setup.sh``, the one thing the docs
say to do first, leaves). So a command written without its ``.venv/bin/`` prefix fails here as it fails
for a user ("torchrun: command not found"), and what a command writes lands in the copy, not the repo.

The commands are read from the pages, not listed by hand; :data:`COMMANDS` says how each one is tested,
and a command it does not know fails :func:`test_every_documented_command_is_in_the_table`:

- ``run``: as written, to its end (it takes seconds);
- ``start``: as written until it prints its first progress line (``until``), then stopped (its process
  group: the ranks too); ``--slow`` runs it to its end;
- ``slow``: as written under ``--slow`` only; the default run checks it as ``check`` does, ``why`` saying
  what makes it long (one command of each program is started by default; the others only cost time);
- ``check``: never run here, for the reason ``why`` (a GPU, a cluster, the network, CI itself): its
  programs must resolve in a fresh shell (``command -v``) and ``checks`` (its ``--help`` or ``--dry-run``)
  must exit 0.

``given`` is the part of a command the test environment already did (``bash scripts/setup.sh``: this
checkout's ``.venv``), named so that it is visibly skipped, never silently. The inputs a user brings (an
nccl-tests log, two bench results) are written into the copy under the names the pages use.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)   # the checkout's .venv when the tests run from it
FRESH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"   # a login shell's, no venv
# executables a page may write without the .venv/bin/ prefix, and why
BARE = {"bash": "the system shell, running the checkout's scripts",
        "salloc": "Slurm's, on the cluster's PATH (the recipe runs on a login node)"}


@dataclass(frozen=True)
class Way:
    """How one documented command is tested (see the module's docstring)."""

    kind: str                         # "run", "start", "slow" or "check"
    why: str = ""                     # slow, check: why the default run does not run it
    until: str = r"\S"                # start: the first progress line (a regex over a line)
    checks: tuple[str, ...] = ()      # slow, check: commands that show its arguments parse
    given: str = ""                   # the leading part the test environment already did


SETUP = "bash scripts/setup.sh && "
SETUP_SLURM = "bash scripts/setup.sh --with-slurm && "
GPU = "needs a CUDA GPU"
CLUSTER = "needs a multi-node GPU cluster (Slurm, NCCL)"
TRAIN_HEADER = r"^distattn train \S+: \d+ rank"
BENCH_START = r"^world size \d+: \d+ cases"
LAUNCH = ".venv/bin/distattn launch configs/llama3-8b-128k-64gpu.yaml"
LAUNCH_CHECK = LAUNCH + " --nodes 8 --gpus-per-node 8 --dry-run"
# the default run starts one command of each program; the others of the same program only cost time
STARTED_ABOVE = "the same program as a command started above, and minutes as written"

COMMANDS: dict[str, Way] = {
    # README / quick start: setup (done by the test environment), the main job, the tests
    SETUP + ".venv/bin/distattn train configs/tiny.yaml": Way("start", until=TRAIN_HEADER, given=SETUP),
    SETUP_SLURM + ".venv/bin/python -m pytest -q -n 2 --dist loadfile":
        Way("check", "this is CI's own command (.ci/run), which is running these tests", given=SETUP_SLURM,
            checks=(".venv/bin/python -m pytest --version", ".venv/bin/python -c 'import xdist'")),
    ".venv/bin/distattn train configs/tiny.yaml --scheduler cad --steps 100 --out runs/cad":
        Way("slow", STARTED_ABOVE + " (its flags parse in the --resume line's --dry-run below)"),
    ".venv/bin/distattn train configs/tiny.yaml --scheduler cad --steps 200 --out runs/cad --resume":
        Way("slow", "continues the run above", checks=(".venv/bin/distattn train configs/tiny.yaml --scheduler cad "
                                                       "--steps 200 --out runs/cad --resume --dry-run",)),
    ".venv/bin/distattn train configs/tiny.yaml parallel.cp=2 train.lr=1e-4 train.min_lr=1e-5 --print-config":
        Way("run"),
    ".venv/bin/torchrun --nproc-per-node 8 -m distattn.cli train configs/llama3-8b-128k-64gpu.yaml":
        Way("check", "64 GPUs of an 8B model", checks=(".venv/bin/torchrun --help",)),
    LAUNCH + " --backend slurm --nodes 8 --gpus-per-node 8 --dry-run": Way("run"),
    ".venv/bin/torchrun --nproc-per-node 4 examples/core_torchrun.py":
        Way("slow", "tests/test_examples.py runs it as written, in a fresh shell, and checks what it prints"),
    # kernels
    ".venv/bin/python -m distattn.kernels.aot --arch 80,90":
        Way("slow", "minutes of Triton compiles before its first line",
            checks=(".venv/bin/python -m distattn.kernels.aot --help",)),
    ".venv/bin/python -m distattn.kernels.sass --kernel fwd --config 128,64,8,3 --head-dim 128":
        Way("slow", "a Triton compile", checks=(".venv/bin/python -m distattn.kernels.sass --help",)),
    ".venv/bin/python -m distattn.kernels.bench": Way("check", GPU, checks=(".venv/bin/python -m distattn.kernels.bench "
                                                                             "--help",)),
    ".venv/bin/pytest tests/test_gpu.py": Way("slow", "collects the GPU suite (skipped without CUDA)",
                                              checks=(".venv/bin/pytest --version",)),
    "bash scripts/gpu_report.sh": Way("slow", "the report's program, run below with --plan",
                                      checks=("bash -n scripts/gpu_report.sh",)),
    ".venv/bin/python -m distattn.bench.gpu_report --plan": Way("run"),
    # launchers
    ".venv/bin/distattn launch configs/tiny.yaml --backend local --out runs/launched":
        Way("slow", STARTED_ABOVE + " (distattn train)", checks=(".venv/bin/distattn launch configs/tiny.yaml "
                                                                 "--backend local --out runs/launched --dry-run",)),
    LAUNCH + " --backend torchrun --nodes 8 --gpus-per-node 8 --rdzv-host node001":
        Way("check", CLUSTER, checks=(LAUNCH_CHECK + " --backend torchrun --rdzv-host node001",)),
    LAUNCH + " --backend slurm --nodes 8 --gpus-per-node 8 --partition gpu --wait":
        Way("check", CLUSTER, checks=(LAUNCH_CHECK + " --backend slurm --partition gpu",)),
    LAUNCH + " --backend ray --ray-address auto":
        Way("check", "a Ray cluster of 64 GPUs", checks=(LAUNCH + " --backend ray --ray-address auto --dry-run",)),
    # measure the cluster: the recipe
    "MPI=1 bash cluster/build_nccl_tests.sh":
        Way("check", "needs CUDA, NCCL, MPI and the network (it clones nccl-tests)",
            checks=("bash -n cluster/build_nccl_tests.sh",)),
    "salloc --nodes 4 --ntasks-per-node 1 --gpus-per-node 8 --exclusive": Way("check", CLUSTER),
    ".venv/bin/distattn cluster nccl-tests --bin-dir nccl-tests/build --gpus 8 --nodes 4 --launcher "
    "'srun --nodes 4 --ntasks-per-node 1' --out net4.json":
        Way("check", CLUSTER, checks=(".venv/bin/distattn cluster nccl-tests --help",)),
    ".venv/bin/distattn cluster fit net4.json":
        Way("check", "reads the profile the cluster's nccl-tests wrote", checks=(".venv/bin/distattn cluster fit "
                                                                                  "--help",)),
    ".venv/bin/distattn simulate --gpus 32 --seq-len 128K --network net4.json --auto":
        Way("check", "reads the profile the cluster's nccl-tests wrote",
            checks=(".venv/bin/distattn simulate --help",)),
    # measure the cluster: every command
    ".venv/bin/distattn cluster probe --world-size 4 --sizes 4K:16M --out net.json": Way("start"),
    "bash cluster/build_nccl_tests.sh && .venv/bin/distattn cluster nccl-tests --bin-dir nccl-tests/build --gpus 8 "
    "--out net.json": Way("check", "needs CUDA, NCCL and the network (it clones nccl-tests)",
                          checks=("bash -n cluster/build_nccl_tests.sh",
                                  ".venv/bin/distattn cluster nccl-tests --help")),
    ".venv/bin/distattn cluster nccl-parse all_gather.log": Way("run"),
    ".venv/bin/distattn cluster fit net.json":
        Way("slow", "reads the probe's profile, which the default run stops before it is written",
            checks=(".venv/bin/distattn cluster fit --help",)),
    ".venv/bin/distattn cluster fit h100 --check": Way("run"),
    # precision
    ".venv/bin/python -m distattn.bench.precision": Way("start"),
    ".venv/bin/python -m distattn.bench.precision --backend reference --dtypes bf16 --world-sizes 1 64":
        Way("slow", STARTED_ABOVE),
    # bench and simulate
    ".venv/bin/distattn bench --quick --out bench/": Way("start", until=BENCH_START),
    ".venv/bin/distattn bench --out bench/ --world-sizes 1,2,4,8 --seq-lens 4096,8192,16384 --doclens sample":
        Way("slow", STARTED_ABOVE, checks=(".venv/bin/distattn bench --help",)),
    ".venv/bin/distattn simulate --gpus 512 --seq-len 512K --doclens sample --network h100 --sweep":
        Way("slow", STARTED_ABOVE, checks=(".venv/bin/distattn simulate --help",)),
    ".venv/bin/distattn simulate --gpus 256 --seq-len 512K --gpu h200 --tp 8 --sweep --draws 8":
        Way("slow", STARTED_ABOVE, checks=(".venv/bin/distattn simulate --help",)),
    ".venv/bin/distattn simulate --gpus 64 --seq-len 256K --model llama-34b --auto": Way("start"),
    ".venv/bin/distattn simulate --gpus 64 --seq-len 128K --doclens sample --per-batch":
        Way("slow", STARTED_ABOVE, checks=(".venv/bin/distattn simulate --help",)),
    ".venv/bin/distattn simulate --gpus 16 --seq-len 64K --cp 8 --timeline t.csv":
        Way("slow", STARTED_ABOVE, checks=(".venv/bin/distattn simulate --help",)),
    ".venv/bin/distattn simulate --calibrate fit/results.csv --holdout other/results.csv":
        Way("slow", STARTED_ABOVE, checks=(".venv/bin/distattn simulate --help",)),
}

NCCL_LOG = """# nThread 1 nGpus 8 minBytes 1048576 maxBytes 4194304 step: 2(factor) warmup iters: 5 iters: 20
#  Rank  0 Group  0 Pid  41234 on    node01 device  0 [0x18] NVIDIA H100 80GB HBM3
#       size         count      type   redop    root     time   algbw   busbw #wrong     time   algbw   busbw #wrong
     1048576         32768     float    none      -1    20.51   51.12   44.73      0    20.13   52.09   45.58      0
     2097152         65536     float    none      -1    27.80   75.44   66.01      0    27.44   76.43   66.87      0
     4194304        131072     float    none      -1    40.02  104.80   91.70      0    39.61  105.89   92.65      0
# Avg bus bandwidth    : 67.5893
"""


def manual_pages() -> list[tuple[str, str]]:
    """``(path from the checkout, text)`` of README.md, then every docs/ page in name order."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [(str(p.relative_to(ROOT)), p.read_text(encoding="utf-8")) for p in pages]


def fenced_blocks(text: str) -> list[tuple[str, int, str]]:
    """``(language, first line number, code)`` of each fenced block, its indentation removed."""
    blocks = []
    for m in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```", text, re.S | re.M):
        indent = len(m.group(1))
        code = "\n".join(line[indent:] for line in m.group(3).splitlines())
        blocks.append((m.group(2), text[:m.start()].count("\n") + 1, code))
    return blocks


def page_commands(text: str) -> list[tuple[int, str]]:
    """``(line of the page, command)`` of every line of the ``bash`` blocks, comments dropped."""
    commands = []
    for lang, first, code in fenced_blocks(text):
        for offset, line in enumerate(code.splitlines(), 1):
            command = re.sub(r"\s+#.*$", "", line).strip()
            if lang == "bash" and command and not command.startswith("#"):
                commands.append((first + offset, command))
    return commands


def manual_commands() -> list[tuple[str, str]]:
    """``("page:line", command)`` of every distinct command of the manual, where it is first written."""
    seen, out = set(), []
    for page, text in manual_pages():
        for line, command in page_commands(text):
            if command not in seen:
                seen.add(command)
                out.append((f"{page}:{line}", command))
    return out


def executables(command: str) -> list[str]:
    """The program each ``&&``/``;``/``|`` part of ``command`` runs (its leading ``VAR=value`` words skipped)."""
    programs = []
    for part in re.split(r"&&|\|\||;|\|", command):
        words = [w for w in shlex.split(part) if not re.fullmatch(r"[A-Za-z_]\w*=\S*", w)]
        if words:
            programs.append(words[0])
    return programs


def test_every_documented_command_is_in_the_table():
    listed = [command for _, command in manual_commands()]
    missing = [c for c in listed if c not in COMMANDS]
    stale = [c for c in COMMANDS if c not in listed]
    assert not missing, f"commands of the manual this test does not know how to run; add them to COMMANDS: {missing}"
    assert not stale, f"COMMANDS lists commands neither the README nor docs/ has any more: {stale}"
    for command, way in COMMANDS.items():
        assert way.kind in ("run", "start", "slow", "check") and command.startswith(way.given), command
        assert way.kind in ("run", "start") or way.why, f"{command}: a command the default run does not run names why"


def test_every_documented_command_has_the_venv_prefix():
    """A page's command runs from the repo root in a fresh shell: its programs are ``.venv/bin/...``, or a
    system one listed in :data:`BARE`."""
    bare = [(where, command, program) for where, command in manual_commands() for program in executables(command)
            if not program.startswith(".venv/bin/") and program not in BARE]
    assert not bare, f"write these with the .venv/bin/ prefix (the README's rule): {bare}"


def checkout_copy(dest: Path) -> Path:
    """The checkout's tracked and new (not ignored) files as they are in the working tree, its .venv linked
    in, and the inputs users bring."""
    try:
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the manual is tested from one")
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


def fresh_env() -> dict[str, str]:
    """A new login shell's environment: the system PATH, no virtual environment."""
    keep = {k: os.environ[k] for k in ("HOME", "USER", "LOGNAME", "TMPDIR", "LANG") if k in os.environ}
    return {**keep, "PATH": FRESH_PATH}


def run_fresh(cwd: Path, command: str, timeout: float, until: str | None = None) -> tuple[int | None, float, str]:
    """``bash -c command`` in a fresh shell in ``cwd``: ``(exit code, seconds, output)``. With ``until``, stop
    its whole process group at the first line of output matching it (exit code None: stopped there)."""
    started = time.perf_counter()
    proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=fresh_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, matched = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if until is not None and re.search(until, line):
                matched.set()
                return
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if matched.is_set():
        _stop(proc)
        rc = None
    elif reader.is_alive():
        _stop(proc)
        lines.append(f"\n[timed out after {timeout:.0f} s]\n")
        rc = 124
    else:   # its output ended: it exited, or is about to
        rc = proc.wait(timeout)
    return rc, time.perf_counter() - started, "".join(lines)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's process group (its ranks too), SIGKILL 5 s later."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def copy(tmp_path_factory, request):
    """One checkout copy for the module's commands, which run in the pages' order; the table of what ran,
    printed at the end (``pytest -s``)."""
    rows: list[str] = []
    yield checkout_copy(tmp_path_factory.mktemp("checkout")), rows
    print("\n| page:line | how | rc | s |\n|---|---|---|---|\n" + "\n".join(rows))


def _params() -> list:
    return [pytest.param(where, command, COMMANDS.get(command), id=where, marks=[pytest.mark.timeout(1800)])
            for where, command in manual_commands()]


@pytest.mark.parametrize("where, command, way", _params())
def test_documented_command_works_in_a_fresh_shell(where, command, way, copy, request):
    folder, rows = copy
    if way is None:
        pytest.fail(f"{command!r} is not in COMMANDS (test_every_documented_command_is_in_the_table says so too)")
    slow = request.config.getoption("--slow")
    written = command[len(way.given):]
    if way.kind == "check" or (way.kind == "slow" and not slow):
        for program in executables(written):
            rc, _, _ = run_fresh(folder, f"command -v {shlex.quote(program)}", timeout=30)
            assert rc == 0, f"{where}: {program} does not resolve in a fresh shell from the repo root"
        for check in way.checks:
            rc, seconds, out = run_fresh(folder, check, timeout=300)
            rows.append(f"| {where} | check `{check}` | {rc} | {seconds:.1f} |")
            assert rc == 0, f"{where}: `{check}` exited {rc}:\n{out[-3000:]}"
        rows.append(f"| {where} | not run: {way.why} | - | - |")
    elif way.kind == "start" and not slow:
        rc, seconds, out = run_fresh(folder, written, timeout=300, until=way.until)
        rows.append(f"| {where} | started, stopped at its first progress line | {rc} | {seconds:.1f} |")
        # an exit 0 before the line (quicker than expected) passes too
        assert rc in (None, 0), f"{where}: `{written}` exited {rc} after {seconds:.1f} s, before /{way.until}/:\n" \
                                f"{out[-3000:]}"
    else:
        rc, seconds, out = run_fresh(folder, written, timeout=1700)
        rows.append(f"| {where} | as written | {rc} | {seconds:.1f} |")
        assert rc == 0, f"{where}: `{written}` exited {rc} after {seconds:.1f} s:\n{out[-3000:]}"


def test_run_fresh_stops_at_the_first_progress_line_and_sees_no_venv(tmp_path):
    """The harness itself: a fresh shell has no .venv on PATH, and a command is stopped at its line."""
    rc, _, out = run_fresh(tmp_path, "command -v distattn torchrun; echo $VIRTUAL_ENV $PYTHONPATH; echo end",
                           timeout=30)
    assert rc == 0 and out.strip() == "end", out
    rc, seconds, out = run_fresh(tmp_path, "echo starting; echo 'step 1'; sleep 60", timeout=30, until=r"^step \d")
    assert rc is None and seconds < 20 and out.splitlines()[-1] == "step 1", (rc, seconds, out)


def test_every_help_example_has_the_venv_prefix():
    """The ``examples:`` of every ``distattn ... --help`` follow the pages' rule: written from the repo root
    with the ``.venv/bin/`` prefix, so that they run as written in a fresh shell."""
    import argparse

    from distattn.cli import build_parser

    def parsers(parser, path="distattn"):
        yield path, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from parsers(sub, f"{path} {name}")
    bare = []
    for path, parser in parsers(build_parser()):
        examples = (parser.epilog or "").partition("examples:\n")[2]
        bare += [f"{path}: {line.strip()}" for line in examples.splitlines()
                 if line.strip() and not line.strip().startswith(".venv/bin/")]
    assert not bare, f"--help examples without the .venv/bin/ prefix: {bare}"
