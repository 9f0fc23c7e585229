"""Crash consistency and a chaos soak of the trainer (harness and tables: tests/chaos.py). By default a
covering slice (2 crash trials: all ranks killed, then one rank; an 18-step soak interrupted every 2 steps,
checkpointing every 2, that meets every kind of interruption once); in full (20 trials, 300 steps, a
checkpoint every 5) with ``pytest --slow``."""

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
    # one trial of each kind (all ranks killed, one rank alone): the slice of test_crash_consistency_twenty_trials
    _check_crash(chaos.crash_trials(tmp_path, 2, say=lambda s: None), 2)


def test_a_run_interrupted_every_few_steps_ends_as_an_uninterrupted_one(tmp_path):
    # the slice of test_chaos_soak_300_steps: every kind of interruption (kill-rank, term-group, kill-parent,
    # bit-flip, full-disk) lands at least once, _check_soak asserts it; a checkpoint every 2 steps keeps the
    # bit-flip's older checkpoint close. The kinds come in that order, each 2 steps past the most yet logged
    # (SIGTERM's kinds log one more, finishing their step): full-disk comes at step 2+3+2+3+2 = 12 of 18,
    # with room for five late steps (on a loaded machine, e.g. `pytest -n 2`, an interruption can land a step
    # after the one aimed at: 14 steps with room for one was not enough); each_once: no sixth interruption
    _check_soak(chaos.soak(tmp_path, 18, gap=2, ckpt_every=2, say=print, each_once=True), 18)


@pytest.mark.slow
def test_crash_consistency_twenty_trials(tmp_path):
    _check_crash(chaos.crash_trials(tmp_path, 20, seed=1, say=print), 20)


@pytest.mark.slow
def test_chaos_soak_300_steps(tmp_path):
    _check_soak(chaos.soak(tmp_path, 300, seed=1, say=print), 300)
