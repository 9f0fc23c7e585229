"""``distattn cluster nccl-tests``: run nccl-tests binaries and turn their output into a network profile.

Build the binaries with ``cluster/build_nccl_tests.sh``. One binary per collective our schedulers use
(``all_gather_perf``, ``reduce_scatter_perf``, ``alltoall_perf``, ``sendrecv_perf``) is run over
``min_bytes..max_bytes`` (factor 2) with ``-g gpus`` GPUs per process, behind an optional launcher
prefix (``srun ...``/``mpirun ...``) for multi-node runs. The world size of each run is read from
its ``# Rank N`` device lines; out-of-place times become the profile's rows.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from .nccl import strip_launcher_prefix, parse_nccl_tests
from ..costmodel.network import Measurement, NetworkProfile

BINARIES = {"all_gather": "all_gather_perf", "reduce_scatter": "reduce_scatter_perf",
            "all_to_all": "alltoall_perf", "send_recv": "sendrecv_perf"}


def ranks_in_output(text: str) -> int:
    return len({m.group(1) for line in text.splitlines()
                if (m := re.match(r"#\s*Rank\s+(\d+)\s", strip_launcher_prefix(line).strip()))})


def measurements_from_output(op: str, text: str, world_size: int | None = None) -> list[Measurement]:
    """Rows of one nccl-tests run; ``world_size`` defaults to the ranks it lists. ``N/A`` rows are left
    out; negative or non-finite figures and zero times raise ``ValueError`` (parser and Measurement)."""
    n = world_size or ranks_in_output(text)
    if n < 1:
        raise ValueError(f"{op}: no '# Rank N ... device' lines in the nccl-tests output; pass the world size")
    return [Measurement(op, n, int(r["size"]), float(r["time_us"])) for r in parse_nccl_tests(text)["rows"]
            if r["time_us"] is not None and r["size"]]


def run_nccl_tests(bin_dir: str | Path, gpus: int, min_bytes: int, max_bytes: int, ops=tuple(BINARIES),
                   launcher: str = "", nodes: int = 1, log_dir: str | Path | None = None,
                   timeout_s: float = 1800.0, progress=None) -> NetworkProfile:
    bin_dir = Path(bin_dir)
    missing = [BINARIES[op] for op in ops if not (bin_dir / BINARIES[op]).exists()]
    if missing:
        raise ValueError(f"--bin-dir {bin_dir}: no {', '.join(missing)}; build them with "
                         f"`bash cluster/build_nccl_tests.sh` (needs CUDA and NCCL) and pass its build/ folder")
    if gpus < 1 or min_bytes < 1 or max_bytes < min_bytes:
        raise ValueError("--gpus must be >= 1 and the sizes 1 <= LO <= HI")
    rows = []
    for op in ops:
        cmd = shlex.split(launcher) + [str(bin_dir / BINARIES[op]), "-b", str(min_bytes), "-e", str(max_bytes),
                                       "-f", "2", "-g", str(gpus)]
        if progress is not None:
            progress(f"running {shlex.join(cmd)}")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            (Path(log_dir) / f"{BINARIES[op]}.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"distattn: {BINARIES[op]} exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
        try:
            got = measurements_from_output(op, done.stdout)
            if not got:  # every row N/A: nothing to fit, and the summary below would fail on max([])
                raise ValueError("no row has both a size and a time")
        except ValueError as exc:
            raise ValueError(f"{BINARIES[op]} output: {exc}") from None
        rows += got
        if progress is not None:
            best = max(got, key=lambda m: m.size_bytes).row()
            progress(f"  {op}: {len(got)} sizes on {got[0].world_size} ranks, {best['busbw_gbs']:.1f} GB/s bus "
                     f"bandwidth at {best['size_bytes']:,} B")
    per_node = max(1, rows[0].world_size // nodes) if rows else gpus
    return NetworkProfile(tuple(rows), source=f"nccl-tests {bin_dir}", backend="nccl", gpus_per_node=per_node)
