"""A run never deletes what it did not write (issue 57): a checkpoint a resume skips, or anything in
the way of a save, is moved to ``step_N.rejected`` with a ``REJECTED`` note; only a checkpoint that
verifies (a trainer wrote exactly its files) is replaced."""

from __future__ import annotations

import torch.distributed as dist

from ckpt_tools import save_tiny
from distattn.train.checkpoint import dcp as checkpoint
from distattn.train.config import RunConfig
from distattn.train.preflight import checks as preflight
from distattn.train.safe_io import move_aside


def test_move_aside_keeps_everything_and_never_takes_a_used_name(tmp_path):
    for n in range(3):
        folder = tmp_path / "step_4"
        folder.mkdir()
        (folder / "NOTES.txt").write_text(f"mine {n}")
        where = move_aside(folder, "a reason")
        assert where.name == ("step_4.rejected" if n == 0 else f"step_4.rejected.{n}")
        assert (where / "NOTES.txt").read_text() == f"mine {n}"
        assert (where / "REJECTED").read_text() == "a reason\n"
    assert not (tmp_path / "step_4").exists()


def _two_checkpoints(root):
    save_tiny(root / "step_2", step=2)
    save_tiny(root / "step_4", step=4)
    (root / "step_4" / "NOTES.txt").write_text("the user's")


def test_a_resume_moves_what_it_skips_aside_and_says_where(tmp_path):
    root = tmp_path / "ckpt"
    _two_checkpoints(root)
    said = []
    assert checkpoint.newest_usable(root, say=said.append) == root / "step_2"   # without aside: nothing moves
    assert (root / "step_4" / "NOTES.txt").exists()
    assert checkpoint.newest_usable(root, say=said.append, aside=True) == root / "step_2"
    assert f"(moved to {root / 'step_4.rejected'})" in said[-1] and "NOTES.txt is not in" in said[-1]
    assert (root / "step_4.rejected" / "NOTES.txt").read_text() == "the user's"
    assert "NOTES.txt is not in" in (root / "step_4.rejected" / "REJECTED").read_text()
    found, _ = checkpoint.candidates(root)   # a .rejected folder is never a candidate
    assert found == [root / "step_2"]


def test_the_cli_resume_moves_skipped_checkpoints_aside(tmp_path):
    _two_checkpoints(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "step_6").mkdir()   # an older version's checkpoint: no manifest
    said = []
    cfg = RunConfig().replace(train={"out": str(tmp_path)})
    assert preflight.prepare_out(cfg, True, False, say=said.append, checksums=False) == tmp_path / "ckpt" / "step_2"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == \
        ["step_2", "step_4.rejected", "step_6.rejected"]
    assert "step_6.rejected" in said[0] and "step_4.rejected" in said[0]


def test_a_save_moves_what_is_in_its_way_aside_and_replaces_only_a_verified_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    _two_checkpoints(root)
    save_tiny(root / "step_4", step=4)   # over a checkpoint with a user's file in it
    assert (root / "step_4.rejected" / "NOTES.txt").read_text() == "the user's"
    assert checkpoint.verify(root / "step_4").step == 4
    save_tiny(root / "step_4", step=4)   # over one that verifies: replaced, nothing set aside
    assert sorted(p.name for p in root.iterdir()) == ["step_2", "step_4", "step_4.rejected"]
    (root / "step_6").mkdir()            # an older version's save, without a manifest
    (root / "step_6" / "model.pt").write_bytes(b"weights")
    save_tiny(root / "step_6", step=6)
    assert (root / "step_6.rejected" / "model.pt").read_bytes() == b"weights"
    assert "manifest.json is missing" in (root / "step_6.rejected" / "REJECTED").read_text()


def test_the_ranks_agreement_moves_a_skipped_checkpoint_aside_on_rank_0(tmp_path):
    root = tmp_path / "ckpt"
    _two_checkpoints(root)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        said = []
        assert checkpoint.agreed_checkpoint(root, say=said.append) == root / "step_2"
    finally:
        dist.destroy_process_group()
    assert "(moved to" in said[0] and (root / "step_4.rejected" / "NOTES.txt").exists()



def test_ckpt_verify_tells_a_live_save_from_an_abandoned_one(tmp_path, capsys):
    from distattn.cli import main
    from distattn.train.preflight.checks import lock_out

    from distattn.train.checkpoint.resume import run_info
    from distattn.train.config import load_config

    root = tmp_path / "ckpt"
    save_tiny(root / "step_2", step=2, run=run_info(load_config("tiny")))
    (root / "step_4.partial").mkdir()
    assert main(["ckpt", "verify", str(root)]) == 0
    assert "step_4.partial: a save that did not finish, abandoned: the run stopped" in capsys.readouterr().out
    assert main(["ckpt", "verify", str(root / "step_4.partial")]) == 1
    assert "abandoned" in capsys.readouterr().out
    lock = lock_out(tmp_path)   # the run's lock, held as a live run holds it
    try:
        assert main(["ckpt", "verify", str(root)]) == 0
        assert "step_4.partial: a save that did not finish, being written by a live run" in capsys.readouterr().out
        assert main(["ckpt", "verify", str(root / "step_4.partial")]) == 0
        assert "being written by a live run" in capsys.readouterr().out
    finally:
        lock.close()
    assert main(["ckpt", "verify", str(root)]) == 0
    assert "abandoned" in capsys.readouterr().out
