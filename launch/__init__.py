"""Launchers (``distattn.launch``): local, torchrun, Slurm and Ray runs of one config.

torchrun runs through ``python -m distattn.launch.torchrun`` (:mod:`.torchrun`), whose rendezvous
stores listen on the rendezvous host only, not on every interface.
"""

from .launchers import (LaunchOptions, check_text, local_command, rdzv_address, sbatch_quote, sbatch_script,
                        slurm_job_state, submit_sbatch, torchrun_command, wait_slurm_job)
from .ray_launch import RayOptions, ray_train


def __getattr__(name: str):
    # RDZV_BACKEND (.torchrun's BACKEND) looked up when asked: `python -m distattn.launch.torchrun` imports
    # this package first, and runpy warns on stderr when the package has already imported the module
    if name == "RDZV_BACKEND":
        from .torchrun import BACKEND

        return BACKEND
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LaunchOptions", "RDZV_BACKEND", "RayOptions", "check_text", "local_command", "ray_train", "rdzv_address",
           "sbatch_quote", "sbatch_script", "slurm_job_state", "submit_sbatch", "torchrun_command", "wait_slurm_job"]
