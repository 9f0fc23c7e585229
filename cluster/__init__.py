"""Cluster measurement (``distattn.cluster``): nccl-tests parsing (``nccl.py``); network probes and
profiles, nccl-tests build/run scripts and sbatch templates live here too."""
