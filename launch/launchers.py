"""Commands that run one config: locally, under torchrun, or as a Slurm batch job (submitted and watched).

Each function builds the command or script from the config and options; ``--dry-run`` prints it.
The training entry point is always ``distattn train CONFIG [section.key=value ...]`` (``python -m
distattn.cli train``): every rank gets the command line's overrides as they were written, and reads
them as ``distattn train`` does.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Sequence

from ..train.config import RunConfig

# Slurm's --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or no limit
_SLURM_TIME = re.compile(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|unlimited|infinite", re.IGNORECASE)
# #SBATCH values that need no quotes (no blank, quote, backslash or '#', which starts a comment there)
_SBATCH_PLAIN = re.compile(r"[\w.,:%/@+=-]+")
# what torchrun's endpoint parser accepts as a host
_HOST = re.compile(r"[\w.:-]+")


def check_text(option: str, value: str) -> str:
    """``value`` unchanged, or ``ValueError`` naming ``option`` when it holds a control character: in a
    script a newline ends the ``#SBATCH`` comment or the command, and what follows runs as shell."""
    if not isinstance(value, str):
        raise ValueError(f"{option} must be a string, got {value!r}")
    bad = next((c for c in value if ord(c) < 32 or 127 <= ord(c) < 160 or c in "\u2028\u2029"), None)
    if bad is not None:
        raise ValueError(f"{option} {value!r} contains the control character {bad!r}; remove it (a newline in a "
                         f"script value would start a new shell line)")
    return value


def sbatch_quote(value: str) -> str:
    """``value`` as one argument of an ``#SBATCH`` line: sbatch splits those lines itself, with double quotes
    grouping and a backslash escaping the next character (not the shell's rules: this is a comment to bash)."""
    if _SBATCH_PLAIN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _is_loopback(host: str) -> bool:
    """Loopback, or the unspecified address (0.0.0.0, ::): a peer cannot connect to either."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
        return address.is_loopback or address.is_unspecified
    except ValueError:
        return host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost")


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


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
    cpus_per_task: int | None = None   # slurm: None is one core per rank of a node (the one task per node)
    signal_lead: int = 120             # slurm: seconds before the time limit for SIGUSR1 (checkpoint, exit); 0: none

    def per_node(self, cfg: RunConfig) -> int:
        return self.gpus_per_node or cfg.world_size // self.nodes

    def check(self, cfg: RunConfig) -> None:
        for option, value in (("--nodes", self.nodes), ("--gpus-per-node", self.gpus_per_node),
                              ("--port", self.port), ("--max-restarts", self.max_restarts)):
            if type(value) is not int:
                raise ValueError(f"{option} must be an integer, got {value!r}")
        if self.nodes < 1 or self.gpus_per_node < 0:
            raise ValueError(f"--nodes must be >= 1 and --gpus-per-node >= 0, got {self.nodes}, {self.gpus_per_node}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"--port must be a TCP port, 1-65535, got {self.port}")
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        self._check_slurm_numbers()
        if not _SLURM_TIME.fullmatch(check_text("--time", self.time)):
            raise ValueError(f"--time {self.time!r} is not a Slurm time limit; use MINUTES, HH:MM:SS or "
                             f"DAYS-HH:MM:SS, e.g. --time 02:00:00")
        for option, value in (("--partition", self.partition), ("--account", self.account)):
            if value is not None and not check_text(option, value).strip():
                raise ValueError(f"{option} is empty; leave it out to use the cluster's default")
        check_text("--log-dir", self.log_dir)
        per_node = self.per_node(cfg)
        if per_node * self.nodes != cfg.world_size:
            raise ValueError(f"the config needs dp * cp = {cfg.world_size} ranks but --nodes {self.nodes} x "
                             f"{per_node} per node = {per_node * self.nodes}; change --nodes/--gpus-per-node or "
                             f"parallel.dp/cp")
        if not self.gpus_per_node:
            self._check_cpu_ranks(cfg, per_node)

    def _check_slurm_numbers(self) -> None:
        if self.cpus_per_task is not None and (type(self.cpus_per_task) is not int or self.cpus_per_task < 1):
            raise ValueError(f"--cpus-per-task must be an integer >= 1 (cores for a node's ranks), got "
                             f"{self.cpus_per_task!r}; leave it out for one core per rank")
        # Slurm keeps the lead in 16 bits
        if type(self.signal_lead) is not int or not 0 <= self.signal_lead <= 65535:
            raise ValueError(f"--signal-lead must be whole seconds, 0-65535 (0: no warning), got {self.signal_lead!r}")

    def cpus(self, cfg: RunConfig) -> int:
        """``--cpus-per-task`` of the one task per node (the torchrun agent and its ranks)."""
        return self.cpus_per_task or max(1, self.per_node(cfg))

    def _check_cpu_ranks(self, cfg: RunConfig, per_node: int) -> None:
        """Without --gpus-per-node every rank is a CPU process: refuse a node of them that cannot fit in
        memory -- a GPU config (64 ranks of an 8B model) launched without --nodes/--gpus-per-node."""
        from ..train.preflight.checks import rank_memory_bytes

        need, total = per_node * rank_memory_bytes(cfg), _physical_memory()
        if total is not None and need > total:
            raise ValueError(f"without --gpus-per-node each of the {cfg.world_size} ranks is a CPU process: "
                             f"--nodes {self.nodes} puts {per_node} on a node, which needs about "
                             f"{need / 2**30:,.0f} GiB (this machine has {total / 2**30:,.0f} GiB). For GPUs pass "
                             f"--nodes N --gpus-per-node G with N x G = {cfg.world_size}"
                             + (" (e.g. --nodes 8 --gpus-per-node 8)" if cfg.world_size == 64 else "")
                             + "; for CPU ranks spread them over more --nodes")


def _train_args(out: str | None, resume: bool, overrides: Sequence[str], allow_reshape: bool = False) -> list[str]:
    """What follows ``train CONFIG``, each free of control characters (a script holds them)."""
    return [*(check_text("override", word) for word in overrides),
            *(["--out", check_text("--out", out)] if out else []), *(["--resume"] if resume else []),
            *(["--allow-reshape"] if allow_reshape else [])]


def local_command(config: str, out: str | None = None, resume: bool = False,
                  overrides: Sequence[str] = (), allow_reshape: bool = False) -> list[str]:
    """``distattn train`` in this Python: it starts the dp * cp local ranks itself."""
    return [sys.executable, "-m", "distattn.cli", "train", check_text("config", config),
            *_train_args(out, resume, overrides, allow_reshape)]


def rdzv_address(opts: LaunchOptions, rdzv_host: str | None) -> str:
    """The rendezvous host for torchrun: ``rdzv_host``, or 127.0.0.1 for one node; ``ValueError`` when a
    multi-node job has none or names this machine's loopback, which the other nodes cannot reach."""
    if rdzv_host is None:
        if opts.nodes > 1:
            raise ValueError(f"--rdzv-host is required with --nodes {opts.nodes}: pass the first node's hostname "
                             f"or IP (e.g. --rdzv-host node001) and run the same command on every node")
        return "127.0.0.1"
    host = check_text("--rdzv-host", rdzv_host).strip()
    if not _HOST.fullmatch(host.strip("[]")):
        raise ValueError(f"--rdzv-host {rdzv_host!r} is not a hostname or IP address")
    if opts.nodes > 1 and _is_loopback(host.strip("[]")):
        raise ValueError(f"--rdzv-host {host} is a loopback or unspecified address, which the other "
                         f"{opts.nodes - 1} node(s) cannot reach; pass the first node's hostname or IP")
    # one name, one address: "localhost" may resolve to ::1 first on one side and 127.0.0.1 on the other
    return "127.0.0.1" if host.lower() == "localhost" else host.strip("[]")


def torchrun_command(config: str, cfg: RunConfig, opts: LaunchOptions, out: str | None = None,
                     resume: bool = False, rdzv_host: str | None = None, overrides: Sequence[str] = (),
                     allow_reshape: bool = False) -> list[str]:
    """The torchrun command for one node of the job (run it on every node). Its stores listen only on the
    rendezvous host (``distattn.launch.torchrun``); ``rdzv_host`` None means one node on 127.0.0.1.
    ``cfg`` is the config with ``overrides`` applied (it sets the ranks per node)."""
    from .torchrun import BACKEND as RDZV_BACKEND   # (not at import: see distattn.launch.__getattr__)

    opts.check(cfg)
    host = rdzv_address(opts, rdzv_host)
    endpoint = f"[{host}]:{opts.port}" if ":" in host else f"{host}:{opts.port}"
    # one node: the workers' bootstrap store listens on the rendezvous host too
    local = [f"--local-addr={host}"] if opts.nodes == 1 else []
    return [sys.executable, "-m", "distattn.launch.torchrun", f"--nnodes={opts.nodes}",
            f"--nproc-per-node={opts.per_node(cfg)}", f"--rdzv-backend={RDZV_BACKEND}", f"--rdzv-endpoint={endpoint}",
            *local, f"--max-restarts={opts.max_restarts}",
            "-m", "distattn.cli", "train", check_text("config", config),
            *_train_args(out, resume, overrides, allow_reshape)]


def sbatch_script(config: str, cfg: RunConfig, opts: LaunchOptions, out: str | None = None,
                  resume: bool = False, overrides: Sequence[str] = (), allow_reshape: bool = False) -> str:
    """The sbatch script (from ``cluster/templates/sbatch.sh.tmpl``). Every value is checked for control
    characters and quoted: ``#SBATCH`` values for sbatch's parser, command arguments (overrides
    included) for bash."""
    from .torchrun import BACKEND as RDZV_BACKEND

    opts.check(cfg)
    config_path = str(Path(check_text("config", config)).resolve())
    train_args = " ".join(shlex.quote(a) for a in _train_args(out, resume, overrides, allow_reshape))   # (--out checked first)
    extra = [f"#SBATCH --gpus-per-node={opts.gpus_per_node}"] if opts.gpus_per_node else []
    extra += [f"#SBATCH --partition={sbatch_quote(opts.partition)}"] if opts.partition else []
    extra += [f"#SBATCH --account={sbatch_quote(opts.account)}"] if opts.account else []
    # no "B:": Slurm signals the steps' processes (agent and ranks), not the batch shell
    extra += [f"#SBATCH --signal=USR1@{opts.signal_lead}"] if opts.signal_lead else []
    per_node = opts.per_node(cfg)
    # absolute: the script may be submitted from another folder; Slurm expands %x, %j... (%% is a literal %)
    log_dir = str(Path(opts.log_dir).resolve())
    template = files("distattn.cluster").joinpath("templates", "sbatch.sh.tmpl").read_text()
    return template.format(
        job_name=sbatch_quote(f"distattn-{Path(config).stem}"), nodes=opts.nodes,
        cpus_per_task=opts.cpus(cfg), time=sbatch_quote(opts.time),
        output=sbatch_quote(f"{log_dir.replace('%', '%%')}/%x-%j.out"),
        error=sbatch_quote(f"{log_dir.replace('%', '%%')}/%x-%j.err"), log_dir=shlex.quote(log_dir),
        shared=_shared_paths(config_path, cfg, out),
        extra_sbatch="\n".join(extra), port=opts.port, python=shlex.quote(check_text("python", sys.executable)),
        rdzv_backend=RDZV_BACKEND, nproc_per_node=per_node, max_restarts=opts.max_restarts,
        config=shlex.quote(config_path),
        train_args=train_args)


def _shared_paths(config_path: str, cfg: RunConfig, out: str | None) -> str:
    """The header's lines naming what every node reads or writes by the same path (one per line)."""
    data = [cfg.data.path] if cfg.data.path else [b.path for b in cfg.data.blend or ()]
    paths = [("the config", config_path), ("train.out", str(Path(out or cfg.train.out).resolve())),
             *(("the data", str(Path(d).resolve())) for d in data if d),
             ("Python (its venv)", str(Path(sys.executable).parent.parent))]
    return "\n".join(f"#   {what}: {check_text(what, path)}" for what, path in paths)


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
