"""The multi-rank harness: results, errors with the rank's traceback, timeouts, no hangs."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from distattn.distributed.spawn import RankError, run_distributed


def _sum_ranks(scale):
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), t.item() * scale


def _fail_on_rank_1():
    if dist.get_rank() == 1:
        raise KeyError("boom on purpose")
    return "fine"


def _skip_collective_on_rank_0():
    if dist.get_rank() != 0:
        dist.all_reduce(torch.ones(1))  # rank 0 never joins
    return "done"


def _sleep_forever():
    time.sleep(3600)


def _die_hard():
    if dist.get_rank() == 0:
        os._exit(3)
    return "ok"


def test_returns_results_in_rank_order():
    assert run_distributed(_sum_ranks, 4, 2.0, timeout=120) == [(r, 12.0) for r in range(4)]


def test_rank_error_carries_traceback():
    with pytest.raises(RankError, match="rank 1: KeyError: 'boom on purpose'") as info:
        run_distributed(_fail_on_rank_1, 2, timeout=120)
    assert "_fail_on_rank_1" in info.value.remote_traceback


def test_collective_times_out_instead_of_hanging():
    start = time.monotonic()
    with pytest.raises(RankError):
        run_distributed(_skip_collective_on_rank_0, 3, timeout=120, collective_timeout=3)
    assert time.monotonic() - start < 60


def test_overall_timeout_kills_ranks():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 2 s"):
        run_distributed(_sleep_forever, 2, timeout=2)
    assert time.monotonic() - start < 30


def test_dead_rank_is_reported():
    with pytest.raises(RankError, match="rank 0: process exited with code 3"):
        run_distributed(_die_hard, 2, timeout=60)


def test_bad_world_size():
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        run_distributed(_sum_ranks, 0)
