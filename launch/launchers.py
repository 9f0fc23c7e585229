"""Commands that run one config: locally, under torchrun, or as a Slurm batch job (submitted and watched).

Each function builds the command or script from the config and options; ``--dry-run`` prints it.
The training entry point is always ``distattn train CONFIG`` (``python -m distattn.cli train``).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from ..train.config import RunConfig


@dataclass(frozen=True)
class LaunchOptions:
    nodes: int = 1
    gpus_per_node: int = 0          # 0: CPU processes (gloo)
    port: int = 29500
    time: str = "01:00:00"
    partition: str | None = None
    account: str | None = None
    max_restarts: int = 0
    log_dir: str = "logs"

    def check(self, cfg: RunConfig) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0:
            raise ValueError(f"--nodes must be >= 1 and --gpus-per-node >= 0, got {self.nodes}, {self.gpus_per_node}")
        per_node = self.gpus_per_node or cfg.world_size // self.nodes
        if per_node * self.nodes != cfg.world_size:
            raise ValueError(f"the config needs dp * cp = {cfg.world_size} ranks but --nodes {self.nodes} x "
                             f"{per_node} per node = {per_node * self.nodes}; change --nodes/--gpus-per-node or "
                             f"parallel.dp/cp")


def _train_args(out: str | None, resume: bool) -> list[str]:
    return (["--out", out] if out else []) + (["--resume"] if resume else [])


def torchrun_command(config: str, cfg: RunConfig, opts: LaunchOptions, out: str | None = None,
                     resume: bool = False, rdzv_host: str = "localhost") -> list[str]:
    """``torchrun`` for one node of a multi-node job (run it on every node)."""
    opts.check(cfg)
    per_node = opts.gpus_per_node or cfg.world_size // opts.nodes
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={opts.nodes}", f"--nproc-per-node={per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_host}:{opts.port}", f"--max-restarts={opts.max_restarts}",
            "-m", "distattn.cli", "train", config, *_train_args(out, resume)]


def sbatch_script(config: str, cfg: RunConfig, opts: LaunchOptions, out: str | None = None,
                  resume: bool = False) -> str:
    """The sbatch script (from ``cluster/templates/sbatch.sh.tmpl``)."""
    opts.check(cfg)
    extra = [f"#SBATCH --gpus-per-node={opts.gpus_per_node}"] if opts.gpus_per_node else []
    extra += [f"#SBATCH --partition={opts.partition}"] if opts.partition else []
    extra += [f"#SBATCH --account={opts.account}"] if opts.account else []
    per_node = opts.gpus_per_node or cfg.world_size // opts.nodes
    template = files("distattn.cluster").joinpath("templates", "sbatch.sh.tmpl").read_text()
    return template.format(
        job_name=f"distattn-{Path(config).stem}", nodes=opts.nodes,
        cpus_per_task=max(1, per_node), time=opts.time, log_dir=opts.log_dir, extra_sbatch="\n".join(extra),
        port=opts.port, python=shlex.quote(sys.executable), nproc_per_node=per_node,
        max_restarts=opts.max_restarts, config=shlex.quote(str(Path(config).resolve())),
        train_args=" ".join(shlex.quote(a) for a in _train_args(out, resume)))


_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
          "DEADLINE")


def submit_sbatch(path: str | Path) -> str:
    """``sbatch`` the script; returns the job id."""
    if shutil.which("sbatch") is None:
        raise ValueError("--backend slurm: sbatch is not on PATH; run on a Slurm login node or use --dry-run")
    job = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, timeout=60)
    if job.returncode != 0:
        raise ValueError(f"sbatch refused the job: {job.stderr.strip()} (check --partition, --account, --time, "
                         f"--nodes and --gpus-per-node against the cluster)")
    return job.stdout.strip().split(";")[0]


def slurm_job_state(job_id: str) -> str:
    """The job's state from ``scontrol show job`` (``PENDING``, ``RUNNING``, ``COMPLETED``, ...)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=60)
    for token in out.stdout.split():
        if token.startswith("JobState="):
            return token.split("=", 1)[1]
    return "UNKNOWN"


def wait_slurm_job(job_id: str, timeout_s: float, poll_s: float = 2.0, on_change=None) -> str:
    """Poll until the job ends (or ``timeout_s``); returns the last state seen."""
    deadline = time.monotonic() + timeout_s
    state = ""
    while True:
        new = slurm_job_state(job_id)
        if new != state and on_change is not None:
            on_change(new)
        state = new
        if state in _ENDED or time.monotonic() > deadline:
            return state
        time.sleep(poll_s)
