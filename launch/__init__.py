"""Launchers (``distattn.launch``): local, torchrun, Slurm and Ray runs of one config."""
