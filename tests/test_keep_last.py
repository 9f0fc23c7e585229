"""``train.keep_last`` and a full disk (issue 79, item 9): once a save has verified, rank 0 deletes the
complete checkpoints beyond the newest N -- never the newest, never one that fails verification (it is
not counted either), never a user's file or folder -- and a save the disk has no room for says which
disk, how much it needs and that ``train.keep_last`` would keep the folder small."""

from __future__ import annotations

import errno
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from ckpt_tools import save_tiny, tiny_state
from conftest import small_yaml
from distattn.train.checkpoint import dcp as checkpoint, disk, retention
from distattn.train.checkpoint.resume import check_room
from distattn.train.config import load_config
from distattn.train.safe_io import WriteFailed
from distattn.train.trainer import Trainer

SMALL = {"model": {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64},
         "data": {"seq_len": 256}, "parallel": {"dp": 1, "cp": 1, "scheduler": "local"},
         "train": {"steps": 3, "warmup_steps": 1, "ckpt_every": 1, "keep_last": 2}}


def test_a_run_keeps_the_last_two_checkpoints_and_what_the_user_put_there(tmp_path):
    cfg = load_config(small_yaml(SMALL, tmp_path))
    ckpt = tmp_path / "run" / "ckpt"

    def users_things(metrics):   # after step 1, before its save: a note and a folder of the user's
        if metrics["step"] == 1:
            ckpt.mkdir(parents=True, exist_ok=True)
            (ckpt / "notes.txt").write_text("keep me")
            (ckpt / "step_1_eval").mkdir()
            (ckpt / "step_1_eval" / "scores.json").write_text("{}")
    Trainer(cfg, [users_things], progress="none").run()
    assert sorted(p.name for p in ckpt.iterdir()) == ["notes.txt", "step_1_eval", "step_2", "step_3"]
    assert (ckpt / "notes.txt").read_text() == "keep me" and (ckpt / "step_1_eval" / "scores.json").is_file()
    for name in ("step_2", "step_3"):
        checkpoint.verify(ckpt / name)


def _verified(root: Path, steps) -> None:
    for step in steps:
        save_tiny(root / f"step_{step}", step)


def test_one_that_fails_verification_is_neither_counted_nor_deleted(tmp_path):
    root = tmp_path / "ckpt"
    _verified(root, [1, 2, 3, 4, 5])
    shard = next(p for p in (root / "step_4").iterdir() if p.suffix == ".distcp")
    with open(shard, "r+b") as f:   # truncated: its size no longer matches the manifest
        f.truncate(shard.stat().st_size - 1)
    (root / "step_9.partial").mkdir()                  # an unfinished save: not a checkpoint
    (root / "step_2.deleting").mkdir()                 # a deletion a kill cut short: finished now
    os.symlink(root / "step_1", root / "step_8")       # a link: the user's, never counted or deleted
    said = []
    gone = retention.keep_newest(root, 2, root / "step_5", said.append)
    assert [p.name for p in gone] == ["step_2", "step_1"]
    assert sorted(p.name for p in root.iterdir()) == ["step_3", "step_4", "step_5", "step_8", "step_9.partial"]
    assert said == ["train.keep_last 2: deleted step_2, step_1 (kept the newest 2 that verify)"]
    # a save that does not verify deletes nothing
    (root / "step_5" / "stray.bin").write_bytes(b"x")
    assert retention.keep_newest(root, 1, root / "step_5", said.append) == []
    assert "deleted no checkpoint, step_5 does not verify" in said[-1]


Usage = namedtuple("Usage", "total used free")


def _one_line(text: str, *parts: str) -> None:
    assert "\n" not in text and all(part in text for part in parts), text


def test_a_full_disk_names_the_disk_what_the_save_needs_and_keep_last(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    _verified(root, [1])
    where = disk.disk_name(root)
    assert "mounted at " in where

    def enospc(*args, **kwargs):   # the disk fills under the write, after the room check passed
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(root / "step_2.partial" / "__0_0.distcp"))
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.dcp, "save", enospc)
        with pytest.raises(WriteFailed) as err:
            save_tiny(root / "step_2", 2)
    _one_line(str(err.value), f"saving checkpoint {root / 'step_2'} failed: No space left on device",
              f"on {where}", "the checkpoint needs about 1.0 MiB", f"{root} holds 1 checkpoint(s)",
              "set train.keep_last (e.g. 2)")
    assert sorted(p.name for p in root.iterdir()) == ["step_1"]   # nothing of the failed save stays

    def short_write(*args, **kwargs):   # how torch's zip writer reports a write the disk cut short
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    full = Usage(1 << 30, 1 << 30, 4096)
    real_usage = shutil.disk_usage
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.dcp, "save", short_write)
        patch.setattr(checkpoint, "_make_room", lambda *a: None)       # (the check before it saw room)
        patch.setattr(shutil, "disk_usage", lambda p: full if str(root) in str(p) else real_usage(p))
        with pytest.raises(WriteFailed) as err:
            checkpoint.save(root / "step_2", *tiny_state(), 2, [1, 2, 3], keep_last=3)
    _one_line(str(err.value), "unexpected pos 704 vs 598; not enough free space: the disk filled while writing",
              f"on {where}", "lower train.keep_last (now 3)")

    # the check before any rank starts says the same
    cfg = load_config(small_yaml(SMALL, tmp_path))
    with monkeypatch.context() as patch:
        patch.setattr(shutil, "disk_usage", lambda p: full)
        with pytest.raises(ValueError) as err:
            check_room(cfg, root, None)
    _one_line(str(err.value), "MiB free but a checkpoint of this model takes about", f"(on {where})",
              "lower train.keep_last (now 2)")
