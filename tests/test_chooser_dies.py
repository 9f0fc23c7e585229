"""Issue 79, item 6: rank 0's chooser child (``parallel.scheduler/cp: auto``) dying or stopping does not
hold the run. Two gloo ranks, a tiny model, plan-ahead on. The chooser is killed after step 1: rank 0
says so once and the steps go on at a fixed-choice step's pace; the chooser restarts once; the restarted
one is stopped (SIGSTOP): it is declared dead within its bound (``floor_s``: its answers take
milliseconds), killed, and every later step runs the fixed choice at once, every rank alike."""

import logging
import os
import re
import signal
import time

import numpy as np

from conftest import DictStore, small_run
from distattn.distributed.spawn import run_distributed
from distattn.train.data.corpus import write_token_file

SEQ = 128
STEPS = 7
FLOOR_S = 5.0     # ChooserProcess's default bound for a chooser whose answers take milliseconds
TIMEOUT_S = 60.0  # parallel.timeout_s: what the other ranks' reads of a choice would wait
CONFIG = {"model": {"dim": 16, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 32},
          "data": {"source": "tokens", "seq_len": SEQ, "seed": 0},
          "parallel": {"dp": 1, "cp": "auto", "world_size": 2, "scheduler": "auto", "backend": "reference",
                       "plan_ahead": True, "timeout_s": TIMEOUT_S},
          "train": {"steps": STEPS, "warmup_steps": 1, "ckpt_every": 100, "log_every": 1}}


def _corpus(path) -> str:
    """A step (128 tokens) holds one document of ~90 tokens and a few short ones."""
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(2 * STEPS):
        docs.append(rng.integers(0, 256, int(rng.integers(70, 100))))
        docs += [rng.integers(0, 256, int(n)) for n in rng.integers(4, 20, 4)]
    write_token_file(path, docs)
    return str(path)


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append((record.created, record.getMessage()))


def _rank(cfg) -> dict:
    import torch.distributed as dist

    from distattn.train.trainer import Trainer

    lines = _Lines()
    logger = logging.getLogger("distattn.train.chooser")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    events = {}

    def hurt_the_chooser(m):   # rank 0, after each step: SIGKILL once, then SIGSTOP the restarted child
        # every rank waiting here for the next step's choice (until the stop) fixes what each step sees,
        # whatever the machine's pace: killed after step 1, step 3's choice finds it gone (the fixed one,
        # shared); the restarted child is ready after step 2, answers step 4's choice and is stopped after
        # step 3; step 5's choice waits out its bound on the thread (step 5 runs late), then step 6's batch
        if m["step"] <= 3:
            trainer.ahead.wait()
        if dist.get_rank() != 0 or "stopped" in events:
            return
        chooser = trainer.auto.chooser
        if "killed" not in events:
            events["killed"] = (m["step"], chooser.pid)
            os.kill(chooser.pid, signal.SIGKILL)
        elif "stopped" not in events and chooser.pid != events["killed"][1]:
            if chooser.answers:   # (an answer behind it: its bound is the floor, not its start-up's)
                events["stopped"] = (m["step"], time.time(), chooser.pid)
                os.kill(chooser.pid, signal.SIGSTOP)
            else:
                chooser.started(TIMEOUT_S)
    trainer = Trainer(cfg, [hurt_the_chooser], progress="none")
    try:
        history = trainer.run()
    finally:
        logger.removeHandler(lines)
    gone = trainer.auto.chooser.pid if dist.get_rank() == 0 else None
    return {"history": history, "lines": lines.records, "events": events, "pid_after": gone}


def test_a_dead_or_stopped_chooser_gives_way_to_the_fixed_choice_at_once(tmp_path):
    cfg = small_run(CONFIG, tmp_path / "run", data={"path": _corpus(tmp_path / "corpus")})
    ranks = run_distributed(_rank, 2, cfg, timeout=120, collective_timeout=TIMEOUT_S)
    zero = ranks[0]
    steps, lines, events = zero["history"], zero["lines"], zero["events"]
    assert len(steps) == STEPS and "killed" in events and "stopped" in events, (events, lines)
    exited = [text for _, text in lines if "chooser exited" in text]
    silent = [(when, text) for when, text in lines if "gave no answer" in text]
    assert len(exited) == 1 and "running the fixed choice while it restarts (once)" in exited[0], lines
    assert "(code -9)" in exited[0]
    # the stopped one: declared dead within its bound (not parallel.timeout_s), killed, never restarted
    assert len(silent) == 1 and "running the fixed choice for the rest of the run" in silent[0][1], lines
    bound = float(re.search(r"gave no answer in ([0-9.]+) s", silent[0][1]).group(1))
    assert FLOOR_S <= bound < TIMEOUT_S / 4 and silent[0][0] - events["stopped"][1] < bound + 4, (silent, events)
    assert zero["pid_after"] is None and len(lines) == 2
    assert [events["killed"][0], events["stopped"][0]] == [1, 3], events
    # no step waited for a choice that would not come (timeout_s): a fixed choice's pace but for step 6,
    # whose batch waited out the stopped chooser's bound
    times = [m["step_time_s"] for m in steps]
    assert bound - 1 < times[5] < bound + 4, times
    assert max(times[1:5] + times[6:]) < 3.0, times
    assert steps[4]["choice_late"], [m["choice_late"] for m in steps]
    # every rank ran the same choice each step; after the second loss, the fixed one
    assert [m["choice"] for m in ranks[1]["history"]] == [m["choice"] for m in steps]
    assert steps[2]["choice"] == [["zigzag", 2]] and not steps[2]["choice_late"]   # (rank 0 shared it)
    assert steps[-1]["choice"] == [["zigzag", 2]] and steps[-1]["predicted_step_s"] is None
    assert all(np.isfinite(m["loss"]) for m in steps)


def test_a_failed_choice_fails_every_rank_at_once():
    """Rank 0's chooser raising (an error in the search, not a death): the others read that error where the
    choice would be and raise it too, instead of waiting out the store's timeout for a key never set."""
    import json

    import pytest

    from distattn.train.auto_plan import SharedChoice

    def decide():
        raise RuntimeError("the chooser process (parallel.scheduler/cp: auto) failed: ValueError: doc_lens")
    store = DictStore()   # (a key never set fails at once: a real store's get would wait)
    zero, other = SharedChoice(store, 0), SharedChoice(store, 0)
    with pytest.raises(RuntimeError, match="failed: ValueError"):
        zero.next(0, decide)
    with pytest.raises(RuntimeError, match="step 1's choice failed on rank 0: RuntimeError: .*ValueError: doc_lens"):
        other.next(1, decide)
    assert "error" in json.loads(store["distattn/auto/0"])
    # the next step goes on as usual
    assert zero.next(0, lambda: ([["zigzag", 2, [0], False, 1]], None)) == other.next(1, decide)
