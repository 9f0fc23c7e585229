"""A real single-node Slurm (Debian's slurmctld/slurmd 22.05) with its state in a temp dir, for tests.

No munge: ``AuthType=auth/none`` and ``CredType=cred/none``; processes are tracked by
``proctrack/linuxproc`` so no cgroups are needed. Both daemons run in the foreground (``-D``)
as children of the test and are stopped by PID. Clients find the cluster through ``SLURM_CONF``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "sbatch", "scontrol")


def available() -> bool:
    return all(shutil.which(d) for d in DAEMONS) and os.geteuid() == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """``with LocalSlurm(tmp) as env: subprocess.run(["sbatch", ...], env=env)``."""

    def __init__(self, root: Path, cpus: int = 8):
        self.root = Path(root)
        self.cpus = cpus
        self.procs: list[subprocess.Popen] = []

    def _config(self) -> str:
        host = socket.gethostname().split(".")[0]
        r = self.root
        # CPUs may exceed the machine's (config_overrides): a CPU job asks for one core per rank
        return f"""ClusterName=distattn-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
JobCompType=jobcomp/none
MinJobAge=3600
InactiveLimit=0
KillWait=5
NodeName={host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""

    def __enter__(self) -> dict:
        for d in ("state", "spool"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        conf = self.root / "slurm.conf"
        conf.write_text(self._config())
        self.env = dict(os.environ, SLURM_CONF=str(conf))
        for daemon in ("slurmctld", "slurmd"):
            log = open(self.root / f"{daemon}.stdout", "w")
            self.procs.append(subprocess.Popen([daemon, "-D", "-f", str(conf)], env=self.env, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                break
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed", "allocated"):
                return self.env
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"local Slurm did not come up; logs:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log"))
                         if p.exists())

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
