"""Cluster measurement (``distattn.cluster``): nccl-tests parsing (``nccl.py``); network probes and
profiles, nccl-tests build/run scripts and sbatch templates live here too."""

# the collectives our schedulers use: what `distattn cluster probe` and `nccl-tests` measure by default
PROBED = ("all_gather", "reduce_scatter", "all_to_all", "send_recv")
