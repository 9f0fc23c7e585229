"""Crash consistency and a chaos soak of the trainer (harness and tables: tests/chaos.py). By default a
covering slice (4 crash trials, a 40-step soak with at least one interruption of each kind); in full (20 trials,
300 steps) with ``pytest --slow``."""

import pytest

import chaos


def _check_crash(table, trials):
    assert len(table) == trials
    assert {row["killed"] == "all ranks" for row in table} == {True, False}   # all ranks and one rank alone
    for row in table:
        assert row["steps_logged_once"] and row["identical_to_uninterrupted"] and row["final_loss_diff"] == 0, row


def _check_soak(summary, steps):
    ran = [kind for kind in chaos.KINDS if kind in summary]   # full-disk needs a tmpfs mount (root)
    assert summary["steps"] == steps and len(ran) >= len(chaos.KINDS) - 1, summary
    assert all(summary[kind] >= 1 for kind in ran), summary
    assert summary["each_step_logged_once"] and summary["metrics_identical"] and summary["final_loss_diff"] == 0


def test_sigkill_during_a_save_resumes_from_the_newest_complete_checkpoint(tmp_path):
    _check_crash(chaos.crash_trials(tmp_path, 4, say=lambda s: None), 4)


def test_a_run_interrupted_every_few_steps_ends_as_an_uninterrupted_one(tmp_path):
    _check_soak(chaos.soak(tmp_path, 40, gap=6, say=print), 40)


@pytest.mark.slow
def test_crash_consistency_twenty_trials(tmp_path):
    _check_crash(chaos.crash_trials(tmp_path, 20, seed=1, say=print), 20)


@pytest.mark.slow
def test_chaos_soak_300_steps(tmp_path):
    _check_soak(chaos.soak(tmp_path, 300, seed=1, say=print), 300)
