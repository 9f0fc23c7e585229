"""distattn.distributed.timing: call counts, warm-up, setup outside the timed span, results, slowest-rank reductions."""

import time

import pytest
import torch.distributed as dist

from distattn.distributed.spawn import run_distributed
from distattn.distributed.timing import Timing, slowest_median, slowest_rank, time_calls, time_interleaved


def test_counts_warmup_and_result():
    calls = []
    t = time_calls(lambda: calls.append(len(calls)) or len(calls), repeats=3, warmup=2)
    assert len(calls) == 5 and len(t.seconds) == 3 and t.result == 5


def test_setup_is_untimed_and_passed():
    t = time_calls(lambda x: x * 2, repeats=2, setup=lambda: time.sleep(0.05) or 21)
    assert t.result == 42 and max(t.seconds) < 0.04


def test_interleaved_order_and_median():
    order = []
    a, b = time_interleaved([lambda: order.append("a"), lambda: order.append("b")], repeats=2, warmup=1)
    assert order == ["a", "b"] * 3 and len(a.seconds) == len(b.seconds) == 2
    assert Timing([3.0, 1.0, 2.0]).median == 2.0


def test_bad_counts():
    with pytest.raises(ValueError):
        time_calls(lambda: None, repeats=0)
    with pytest.raises(ValueError):
        time_calls(lambda: None, repeats=1, warmup=-1)


def test_no_process_group_passes_through():
    assert slowest_rank([1.0, 2.0]) == [1.0, 2.0] and slowest_median([3.0, 1.0, 2.0]) == 2.0


def _ranks():
    r = dist.get_rank()
    t = time_calls(lambda: time.sleep(0.01 * (r + 1)), repeats=3, warmup=1, barrier=True)
    return slowest_rank([float(r), 10.0 - r]), slowest_median(t.seconds), t.median


def test_slowest_rank_over_gloo():
    res = run_distributed(_ranks, 2, timeout=120)
    assert [r[0] for r in res] == [[1.0, 10.0], [1.0, 10.0]]
    assert res[0][1] == res[1][1] == max(r[2] for r in res) and res[0][1] >= 0.02
