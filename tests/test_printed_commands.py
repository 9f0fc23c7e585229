"""What the CLI tells the user to run, or to do, fits the case (issue 79, wording items): a printed
command starts the executable the way the user started it (``.venv/bin/distattn`` typed as a path,
``distattn`` only when PATH finds that one, ``python -m distattn.cli`` for that), so it runs as written
in the same shell; and an output file that cannot be opened gets advice for its errno."""

from __future__ import annotations

import errno
import os
import shlex
import sys
from pathlib import Path

import pytest

from distattn.cli import _shell, run_cmds
from distattn.train import safe_io


def _script(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "distattn"
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_the_command_printed_starts_distattn_as_the_user_did(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = _script(tmp_path / "venv" / "bin")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr(sys, "argv", ["venv/bin/distattn", "train"])        # typed as a path
    assert _shell.distattn_command() == ["venv/bin/distattn"]
    monkeypatch.setattr(sys, "argv", [str(script), "train"])                 # absolute, not on PATH
    assert _shell.distattn_command() == [str(script)]
    monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")             # found on PATH: its name
    assert _shell.distattn_command() == ["distattn"]
    monkeypatch.setattr(sys, "argv", [str(Path(_shell.__file__).with_name("__main__.py")), "train"])
    words = _shell.distattn_command()                                        # python -m distattn.cli
    assert words[1:] == ["-m", "distattn.cli"] and os.path.samefile(words[0], sys.executable)


def test_the_end_of_a_run_prints_commands_that_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _script(tmp_path / ".venv" / "bin")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr(sys, "argv", [".venv/bin/distattn", "train"])
    out = tmp_path / "run dir"
    (out / "tb").mkdir(parents=True)
    monkeypatch.setattr("distattn.train.checkpoint.resume.usable_checkpoint", lambda out: out / "ckpt" / "step_2")
    again = shlex.join([*_shell.distattn_command(), "train", "cfg.yaml", "--out", str(out)])
    lines = run_cmds._done_lines([{"step": 1, "loss": 5.0, "tokens_per_s": 10.0}], out, again)
    further = lines[-1].split("train further: ", 1)[1]
    assert shlex.split(further)[:2] == [".venv/bin/distattn", "train"] and os.access(shlex.split(further)[0],
                                                                                       os.X_OK)
    assert shlex.split(further)[-4:] == [str(out), "--resume", "--steps", "N"]   # (a space in --out, quoted)
    board = shlex.split(next(line for line in lines if "TensorBoard" in line).split(": ", 1)[1])
    assert board[-2:] == ["--logdir", str(out / "tb")]
    assert board[0] == "tensorboard" or os.access(board[0], os.X_OK) or board[1:3] == ["-m", "tensorboard.main"]


@pytest.mark.parametrize("code,advice", [
    (errno.EACCES, "not writable: choose another --out or fix the permissions"),
    (errno.EROFS, "not writable: choose another --out or fix the permissions"),
    (errno.ELOOP, "it is a symbolic link: remove the link"),
])
def test_an_output_file_that_cannot_be_opened_gets_advice_for_its_errno(tmp_path, monkeypatch, code, advice):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / ".lock"))
    monkeypatch.setattr(safe_io.os, "open", refuse)
    with pytest.raises(ValueError) as err:
        safe_io.open_lock(tmp_path / ".lock")
    line = str(err.value)
    assert advice in line and "\n" not in line, line
    assert ("link" in line) == (code == errno.ELOOP), line
