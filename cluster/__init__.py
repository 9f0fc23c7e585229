"""Cluster measurement (``distattn.cluster``): nccl-tests, torch.distributed microbenchmarks, network profiles."""
