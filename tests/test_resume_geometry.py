"""A resume is the run it claims to be (issue 79, item 5): a checkpoint records its batch geometry
(``data.seq_len``, dp, cp, world size, tokens per step, packing), and a resume that changes it -- which
trains other batches, losses 3-5e-2 apart -- is refused in one line naming the keys, old and new, unless
``--allow-reshape``: then the run says so once and the first resumed step's metrics row has ``reshaped``.
A scheduler or ``parallel.nano_batches`` change is exact and resumes silently, as does a checkpoint saved
before the geometry was recorded."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import small_yaml
from distattn.cli import main
from distattn.train.checkpoint import manifest
from distattn.train.checkpoint.manifest import Manifest
from distattn.train.checkpoint.resume import batch_geometry, reshaped, resume_config, run_info
from distattn.train.config import load_config
from distattn.train.trainer import Trainer

SMALL = {"model": {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64},
         "data": {"seq_len": 256}, "parallel": {"dp": 1, "cp": 2},
         "train": {"steps": 2, "warmup_steps": 1, "ckpt_every": 1}}
ONE_RANK = {"parallel": {"dp": 1, "cp": 1, "scheduler": "local"}}


def _cfg(tmp_path: Path, **changes):
    sections = {k: {**v, **changes.get(k, {})} for k, v in SMALL.items()}
    return load_config(small_yaml(sections, tmp_path))


def _saved(cfg, step: int = 2) -> Manifest:
    """The manifest a checkpoint of ``cfg`` at ``step`` holds, read back through the parser."""
    doc = {"format": manifest.FORMAT, "step": step, "files": {}, "run": run_info(cfg)}
    return manifest.parse(json.dumps(doc).encode(), Path(f"step_{step}") / manifest.NAME)


def _refused(cfg, found: Manifest) -> str:
    with pytest.raises(ValueError) as err:
        resume_config(cfg, found)
    line = str(err.value)
    assert "\n" not in line and "--allow-reshape" in line and "different run" in line, line
    return line


def test_a_resume_that_changes_the_batch_geometry_is_refused_naming_the_keys(tmp_path):
    base = _cfg(tmp_path)
    found = _saved(base)
    assert found.run["geometry"] == {"seq_len": 256, "dp": 1, "cp": 2, "world_size": 2, "tokens_per_step": 256,
                                     "packing": "stream"}
    shorter = _cfg(tmp_path, data={"seq_len": 128})
    line = _refused(shorter, found)
    assert "trained with data.seq_len 256 (tokens/step 256); this run has data.seq_len 128 (tokens/step 128)" \
        in line, line
    # dp 2 x cp 1 on the same two ranks: twice the tokens a step, dealt out balanced (dp > 1's default)
    wider = _cfg(tmp_path, parallel={"dp": 2, "cp": 1})
    line = _refused(wider, found)
    assert ("parallel.dp 1, parallel.cp 2, data.packing stream (tokens/step 256); this run has parallel.dp 2, "
            "parallel.cp 1, data.packing balanced (tokens/step 512)") in line, line
    assert "world size" not in line   # (2 ranks either way)
    # allowed on request: the config is the one asked for, the change named for the metrics row
    for cfg in (shorter, wider):
        assert resume_config(cfg, found, allow_reshape=True).data.seq_len == cfg.data.seq_len
    assert reshaped(shorter, found) == ["data.seq_len", "tokens/step"]
    assert reshaped(wider, found) == ["parallel.dp", "parallel.cp", "tokens/step", "data.packing"]


def test_a_scheduler_or_nano_batches_change_and_an_old_checkpoint_resume_silently(tmp_path):
    base = _cfg(tmp_path)
    found = _saved(base)
    for changes in ({"scheduler": "ring"}, {"nano_batches": 2}, {"dp_mode": "fsdp"}):
        cfg = _cfg(tmp_path, parallel=changes)
        assert resume_config(cfg, found).parallel == cfg.parallel and reshaped(cfg, found) == []
    # saved before the geometry was recorded: nothing to compare, as before
    old = Manifest(2, {}, {k: v for k, v in run_info(base).items() if k != "geometry"})
    assert reshaped(_cfg(tmp_path, data={"seq_len": 128}), old) == []
    resume_config(_cfg(tmp_path, data={"seq_len": 128}), old)
    # cp: auto is compared as the run resolves it: world_size / dp ranks per replica
    auto = _cfg(tmp_path, parallel={"cp": "auto", "world_size": 2, "scheduler": "zigzag"})
    assert batch_geometry(auto) == batch_geometry(base) and reshaped(auto, found) == []


@pytest.mark.parametrize("field,value", [("seq_len", "256"), ("dp", 0), ("tokens_per_step", True),
                                         ("packing", 3)])
def test_a_geometry_of_the_wrong_type_is_refused_naming_the_field(tmp_path, field, value):
    doc = {"format": manifest.FORMAT, "step": 2, "files": {}, "run": run_info(_cfg(tmp_path))}
    doc["run"]["geometry"][field] = value
    with pytest.raises(ValueError, match=rf"run\.geometry\.{field} is "):
        manifest.parse(json.dumps(doc).encode(), Path("step_2") / manifest.NAME)
    doc["run"]["geometry"] = [256]
    with pytest.raises(ValueError, match=r"run\.geometry is \[256\], not an object or null"):
        manifest.parse(json.dumps(doc).encode(), Path("step_2") / manifest.NAME)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 2-step run on one rank in this process (checkpoints step_1 and step_2)."""
    folder = tmp_path_factory.mktemp("geometry")
    Trainer(_cfg(folder, **ONE_RANK), progress="none").run()
    return folder


def _copy(trained: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained / "run", tmp_path / "run")
    return small_yaml({k: {**v, **ONE_RANK.get(k, {})} for k, v in SMALL.items()}, tmp_path)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_real_resume_with_another_seq_len_is_refused_then_allowed_and_marked(trained, tmp_path, capfd):
    yaml_path = _copy(trained, tmp_path)
    shorter = [str(yaml_path), "data.seq_len=128", "--resume", "--steps", "4"]
    capfd.readouterr()
    assert main(["train", *shorter]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.seq_len 256 (tokens/step 256); this run has data.seq_len 128" in err[0], err
    assert "--allow-reshape" in err[0]
    # in this process (no rank to start): Trainer's allow_reshape is what --allow-reshape sets
    history = Trainer(load_config(yaml_path, ["data.seq_len=128", "train.steps=4"]), progress="none", resume=True,
                      allow_reshape=True).run()
    assert history[0]["reshaped"] == ["data.seq_len", "tokens/step"] and "reshaped" not in history[1]
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r.get("reshaped") for r in rows] == [None, None, ["data.seq_len", "tokens/step"], None]
    # the checkpoints after it record the new geometry: a further resume needs no flag
    assert manifest.read(tmp_path / "run" / "ckpt" / "step_4").run["geometry"]["seq_len"] == 128
    capfd.readouterr()
    assert main(["ckpt", "verify", str(tmp_path / "run" / "ckpt" / "step_4")]) == 0
    assert "trained with data.seq_len 128, parallel.dp 1, parallel.cp 1, world size 1, data.packing stream " \
        "(tokens/step 128)" in capfd.readouterr().out


def test_a_real_resume_onto_two_replicas_is_refused_then_allowed_by_the_flag(trained, tmp_path, capfd):
    yaml_path = _copy(trained, tmp_path)
    capfd.readouterr()
    assert main(["train", str(yaml_path), "parallel.dp=2", "--resume", "--steps", "3"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parallel.dp 1, world size 1, data.packing stream (tokens/step 256); this run has " \
        "parallel.dp 2, world size 2, data.packing balanced (tokens/step 512)" in err[0], err
    # two ranks start: the flag reaches them through run(). In a process of its own, since the ranks print
    # to the fork server's stdout, which is whatever capture was active when an earlier test started it
    said = subprocess.run([sys.executable, "-m", "distattn.cli", "train", str(yaml_path), "parallel.dp=2", "--resume",
                           "--steps", "3", "--allow-reshape"], capture_output=True, text=True, timeout=300)
    assert said.returncode == 0, said.stderr[-2000:]
    assert (said.stdout + said.stderr).count("--allow-reshape: the checkpoint (step 2) was trained with") == 1, said
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["reshaped"] == ["parallel.dp", "world size", "tokens/step", "data.packing"], rows[-1]
