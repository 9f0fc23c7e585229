"""An embedded trainer is as quiet as its program's logging (issue 58): ``Trainer(progress=...)`` chooses
rank 0's per-step display, ``"auto"`` makes it a record of the ``distattn`` logger at INFO off a
terminal, and a run without TensorBoard says so once, as a warning."""

from __future__ import annotations

import io
import logging
import os
import sys

import pytest

import distattn
from distattn.train import metrics, trainer
from distattn.train.config import load_config
from distattn.train.trainer import Trainer

# one rank in this process, one small layer, 64-token sequences: about a second a step on a CPU core
SMALL = ["parallel.cp=1", "model.n_layers=1", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2",
         "model.ffn_dim=64", "data.seq_len=64", "train.warmup_steps=1", "train.ckpt_every=100"]


def _config(out, steps: int = 2):
    return load_config("tiny", [*SMALL, f"train.steps={steps}", f"train.out={out}"])


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def restored_logging():
    """The ``distattn`` logger as it was before the test (an in-process CLI test configures it too)."""
    logger = logging.getLogger("distattn")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield logger
    logger.handlers[:], logger.level, logger.propagate = saved


def test_configure_logging_error_makes_a_two_step_run_print_nothing(tmp_path, capfd):
    distattn.configure_logging("ERROR")
    history = Trainer(_config(tmp_path / "run")).run()
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert [m["step"] for m in history] == [1, 2]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2   # the files still get them


def test_progress_line_prints_the_step_lines_whatever_the_level(tmp_path, capfd):
    distattn.configure_logging("ERROR")
    Trainer(_config(tmp_path / "run"), progress="line").run()
    out, err = capfd.readouterr()
    lines = out.splitlines()
    assert [line.split()[:2] for line in lines] == [["step", "1/2"], ["step", "2/2"]], out
    assert "loss" in lines[0] and "eta" in lines[0] and err == ""


def test_auto_embedded_steps_are_info_records_and_a_missing_tensorboard_one_warning(tmp_path, capfd, monkeypatch,
                                                                                      restored_logging):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # a core install: no tensorboard
    stream, seen = io.StringIO(), _Records()
    distattn.configure_logging("INFO", stream=stream)
    restored_logging.addHandler(seen)
    Trainer(_config(tmp_path / "run")).run()   # not a terminal (captured), not the CLI
    steps = [r for r in seen.records if r.getMessage().startswith("step ")]
    assert [(r.name, r.levelno) for r in steps] == [("distattn.train.metrics", logging.INFO)] * 2
    tb = tmp_path / "run" / "tb"
    warned = [r.getMessage() for r in seen.records if r.levelno == logging.WARNING]
    assert warned == [f"TensorBoard is not installed: no events under {tb} (pip install 'distattn[viz]')"]
    assert not tb.exists()
    shown = stream.getvalue().splitlines()
    assert shown[0] == warned[0] and [line.split()[:2] for line in shown[1:]] == [["step", "1/2"], ["step", "2/2"]]
    assert capfd.readouterr() == ("", "")   # all of it went to the configured stream


def test_auto_is_a_bar_on_a_terminal_unless_logging_hides_info(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

        def fileno(self) -> int:
            return 1

    width = [80]
    monkeypatch.setattr(metrics.os, "get_terminal_size", lambda fd: os.terminal_size((width[0], 24)))
    monkeypatch.setattr(sys, "stdout", Terminal())
    distattn.configure_logging("INFO")
    assert metrics.resolve_progress("auto") == "bar" and metrics.progress_display("auto") == (True, None)
    width[0] = 0   # a terminal of no width (script -q -c CMD, some CI consoles): a bar would draw nothing
    assert metrics.resolve_progress("auto") == "log" and not metrics.bar_can_draw()
    width[0] = 80
    distattn.configure_logging("ERROR")
    assert metrics.resolve_progress("auto") == "log"
    assert metrics.progress_display("auto") == (False, logging.getLogger("distattn.train.metrics").info)
    assert metrics.progress_display("none") == (False, None) and metrics.progress_display("bar")[0]


def test_a_bad_progress_is_one_value_error_naming_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"^progress must be one of 'auto', 'bar', 'line', 'log', 'none', got 'loud'$"):
        Trainer(_config(tmp_path), progress="loud")
    with pytest.raises(ValueError, match="progress must be one of"):
        trainer.run(_config(tmp_path), progress="quiet")


def test_local_ranks_get_the_progress_decided_here(tmp_path, monkeypatch):
    """``run`` without a launcher: the ranks are handed ``"auto"`` already decided (their stdout is the fork
    server's), and each rank's Trainer gets it."""
    import distattn.distributed.spawn

    monkeypatch.delenv("RANK", raising=False)
    handed, made = [], []
    monkeypatch.setattr(distattn.distributed.spawn, "run_distributed", lambda fn, n, *args, **kw: handed.append(args) or [[]])
    monkeypatch.setattr(trainer, "train", lambda cfg, resume, stop, progress, allow_reshape: made.append(progress) or [])
    cfg = _config(tmp_path)
    distattn.configure_logging("ERROR")
    trainer.run(cfg)
    trainer.run(cfg, progress="line")
    assert [args[2] for args in handed] == ["log", "line"]
    trainer._rank_entry(cfg, False, "none")
    assert made == ["none"]


def test_an_embedded_trainer_refuses_a_folder_holding_a_run_as_the_cli_does(tmp_path):
    distattn.configure_logging("ERROR")
    out = tmp_path / "run"
    Trainer(_config(out, steps=1)).run()
    rows = (out / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=rf"^train.out {out} already holds a run \(metrics.jsonl.*--overwrite"):
        Trainer(_config(out, steps=1)).run()
    assert (out / "metrics.jsonl").read_text() == rows   # nothing appended
    Trainer(_config(out, steps=1), overwrite=True).run()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1   # a new run, not a second row
    with pytest.raises(ValueError, match="pass one of them"):
        Trainer(_config(out), resume=True, overwrite=True)
