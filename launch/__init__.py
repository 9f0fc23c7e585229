"""Launchers (``distattn.launch``): local, torchrun and Slurm runs of one config (Ray: to come)."""

from .launchers import LaunchOptions, sbatch_script, torchrun_command

__all__ = ["LaunchOptions", "sbatch_script", "torchrun_command"]
