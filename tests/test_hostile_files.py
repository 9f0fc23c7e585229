"""Files a run reads or writes that somebody else may have placed: lock files that are links, checkpoint
metadata that is not a file, corpus indexes that point outside their folder. Each attack has a target
file; each test asserts the target was neither written nor read, and that the refusal is one clear line."""

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from distattn.cli import main
from distattn.train.checkpoint import dcp as checkpoint, dcp_safe, manifest
from distattn.train.data.sharded import read_index
from distattn.train.preflight.checks import lock_out
from distattn.train.data.prepare import _locked


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    return victim


@pytest.mark.parametrize("how", ["symlink", "link"])
def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(tmp_path, how):
    victim = _victim(tmp_path)
    for lock, take in (("run/.lock", lambda: lock_out(tmp_path / "run").close()),
                       ("prep/.prepare.lock", lambda: _locked(tmp_path / "prep").__enter__())):
        (tmp_path / lock).parent.mkdir()
        getattr(os, how)(victim, tmp_path / lock)
        with pytest.raises(ValueError, match="lock file|plain file of its own"):
            take()
        assert victim.read_text() == "keep me\n"


def test_the_trainer_refuses_a_linked_lock_in_one_line(tmp_path, capsys):
    victim = _victim(tmp_path)
    (tmp_path / "run").mkdir()
    os.symlink(victim, tmp_path / "run" / ".lock")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {{dim: 32, n_layers: 1, n_heads: 2, n_kv_heads: 1, ffn_dim: 64}}\n"
                   f"data: {{seq_len: 256}}\ntrain: {{steps: 1, out: {tmp_path / 'run'}}}\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert ".lock" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert victim.read_text() == "keep me\n"


def _refused_quickly(fn, seconds=20.0):
    """Run ``fn`` in a thread: what it raised, or a failure if it blocked (a FIFO read would)."""
    box = {}

    def run():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["exc"] = exc
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "blocked reading a file that is not a regular file"
    return box.get("exc")


def _sealed(ckpt: Path, metadata_bytes: int = 0) -> Path:
    """A checkpoint folder whose manifest lists one ``.metadata`` (what the save would have written)."""
    ckpt.mkdir()
    manifest.write(ckpt, 5, {".metadata": (metadata_bytes, "0" * 64)}, {})
    return ckpt


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder", "manifest-fifo"])
def test_checkpoint_metadata_that_is_not_a_file_is_refused(tmp_path, kind):
    ckpt = _sealed(tmp_path / "step_5")
    meta = ckpt / ".metadata"
    if kind == "fifo":
        os.mkfifo(meta)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", meta)
    elif kind == "folder":
        meta.mkdir()
    else:
        meta.write_bytes(b"")
        (ckpt / manifest.NAME).unlink()
        os.mkfifo(ckpt / manifest.NAME)
    exc = _refused_quickly(lambda: checkpoint.verify(ckpt))
    assert isinstance(exc, ValueError) and "not a regular file" in str(exc), exc


def test_oversized_metadata_is_refused_before_reading(tmp_path, monkeypatch):
    ckpt = _sealed(tmp_path / "step_5", 4096)
    (ckpt / ".metadata").write_bytes(b"\0" * 4096)
    monkeypatch.setattr(dcp_safe, "METADATA_LIMIT", 1024)
    with pytest.raises(ValueError, match="over the 1,024"):
        checkpoint.verify(ckpt, checksums=False)


def _prepared(directory: Path, shards) -> Path:
    """A prepared corpus of one real shard, its index listing ``shards`` (default: the real one)."""
    directory.mkdir()
    np.arange(10, dtype="<u2").tofile(directory / "shard_00000.bin")
    np.save(directory / "shard_00000.idx.npy", np.array([0, 4, 10], dtype=np.int64))
    real = [{"name": "shard_00000", "tokens": 10, "documents": 2}]
    index = {"format": "distattn-tokens", "version": 1, "dtype": "uint16",
             "shards": real if shards is None else shards}
    (directory / "index.json").write_text(json.dumps(index))
    return directory


def test_index_shards_outside_the_folder_are_refused_unread(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret"
    for suffix in (".bin", ".idx.npy"):   # FIFOs: reading them would block the test
        os.mkfifo(f"{secret}{suffix}")
    assert read_index(_prepared(tmp_path / "ok", None))["shards"][0]["tokens"] == 10
    for i, name in enumerate(["../outside/secret", str(secret), "..", "a/b", "x\\y", "", 7]):
        bad = _prepared(tmp_path / f"bad{i}", [{"name": name, "tokens": 10, "documents": 2}])
        exc = _refused_quickly(lambda: read_index(bad))
        assert isinstance(exc, ValueError) and "not a file name inside" in str(exc), (name, exc)
        assert "\n" not in str(exc)


@pytest.mark.parametrize("shards, message", [("abc", "no list of shards"), ([], "no list of shards"),
                                              (["abc"], "not a file name"),
                                              ([{"name": "s", "tokens": "10", "documents": 2}], "tokens='10'"),
                                              ([{"name": "s", "tokens": 10, "documents": -1}], "documents=-1")])
def test_index_with_wrong_types_is_one_line(tmp_path, shards, message):
    with pytest.raises(ValueError, match=message) as info:
        read_index(_prepared(tmp_path / "p", shards))
    assert "\n" not in str(info.value)


def test_index_that_is_not_a_regular_file_is_refused(tmp_path):
    corpus = tmp_path / "p"
    corpus.mkdir()
    os.mkfifo(corpus / "index.json")
    exc = _refused_quickly(lambda: read_index(corpus))
    assert isinstance(exc, ValueError) and "not a regular file" in str(exc), exc
