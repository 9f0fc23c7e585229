"""Launchers (``distattn.launch``): local, torchrun, Slurm and Ray runs of one config."""

from .launchers import (LaunchOptions, sbatch_script, slurm_job_state, submit_sbatch, torchrun_command,
                        wait_slurm_job)
from .ray_launch import RayOptions, ray_train

__all__ = ["LaunchOptions", "RayOptions", "ray_train", "sbatch_script", "slurm_job_state", "submit_sbatch",
           "torchrun_command", "wait_slurm_job"]
