"""A checkpoint's manifest.json is read against a schema: a hostile or edited one is one line naming
the folder and the field (no RecursionError, no TypeError later in a resume), and a resume falls back
to the next older checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from ckpt_tools import save_tiny
from distattn.train.checkpoint import dcp as checkpoint, manifest
from distattn.train.safe_io import read_regular

_HASH = "0" * 64


def _edit(ckpt: Path, change) -> None:
    """Rewrite ``ckpt``'s manifest with ``change(doc)`` applied (an edit by hand or by a hostile party)."""
    path = ckpt / manifest.NAME
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def _set(*keys_then_value):
    """An edit setting ``doc[k1][k2]... = value`` (the last argument)."""
    *keys, value = keys_then_value

    def change(doc):
        for key in keys[:-1]:
            doc = doc.setdefault(key, {})
        doc[keys[-1]] = value
    return change


def _refused(ckpt: Path, field: str) -> str:
    with pytest.raises(ValueError) as err:
        manifest.read(ckpt)
    line = str(err.value)
    assert "\n" not in line and str(ckpt) in line and field in line, line
    return line


_IDENTITY = [{"files": {"a.txt": {"size": 3, "mtime": 1.5, "sha256": "ab"}}}, None, {"index_sha256": "cd"}]

BAD = [
    ("format", _set("format", 2)),
    ("format", _set("format", True)),
    ("step", _set("step", 10**18)),
    ("step", _set("step", 4)),
    ("step", _set("step", True)),
    ("step", _set("step", -1)),
    ("step", _set("step", 5.0)),
    ("step", lambda doc: doc.pop("step")),
    ("files", _set("files", [])),
    ("files", _set("files", "../etc", {"bytes": 1, "sha256": _HASH})),
    ("files", _set("files", "a/b", {"bytes": 1, "sha256": _HASH})),
    ("files", _set("files", "", {"bytes": 1, "sha256": _HASH})),
    ("files", _set("files", "..", {"bytes": 1, "sha256": _HASH})),
    ("files['x'].bytes", _set("files", "x", {"bytes": -1, "sha256": _HASH})),
    ("files['x'].bytes", _set("files", "x", {"bytes": "1", "sha256": _HASH})),
    ("files['x'].sha256", _set("files", "x", {"bytes": 1, "sha256": "A" * 64})),
    ("files['x']", _set("files", "x", [1, _HASH])),
    ("run", _set("run", [])),
    ("run.model", _set("run", "model", [256])),
    ("run.model.dim", _set("run", "model", "dim", [256])),
    ("run.data", _set("run", "data", "stdlib")),
    ("run.data.path", _set("run", "data", "path", 3)),
    ("run.data.blend", _set("run", "data", "blend", {"a": 1})),
    ("run.data.identity", _set("run", "data", "identity", "abc")),
    ("run.data.identity[0].files['a'].size", _set("run", "data", "identity", [{"files": {"a": {"size": "big"}}}])),
    ("run.lr_decay_steps", _set("run", "lr_decay_steps", "abc")),
    ("run.lr_decay_steps", _set("run", "lr_decay_steps", 0)),
    ("nested", _set("run", "data", "blend", [[[[[[[["deep"]]]]]]]])),
]


@pytest.mark.parametrize("field,change", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_a_manifest_that_breaks_the_schema_is_one_line_naming_the_field(tmp_path, field, change):
    ckpt = save_tiny(tmp_path / "step_5", step=5)
    _edit(ckpt, change)
    _refused(ckpt, field)


@pytest.mark.parametrize("text", ["[" * 200_000 + "]" * 200_000, '{"a":' * 50_000 + "1" + "}" * 50_000,
                                  '{"format": 1, "step": NaN}', "\xff"])
def test_a_deeply_nested_or_unparsable_manifest_is_one_line_not_a_crash(tmp_path, text):
    ckpt = save_tiny(tmp_path / "step_5", step=5)
    (ckpt / manifest.NAME).write_bytes(text.encode("latin-1"))
    _refused(ckpt, manifest.NAME)


def test_what_a_save_writes_passes_and_the_step_is_only_tied_to_a_step_N_folder(tmp_path):
    from distattn.train.checkpoint.resume import run_info
    from distattn.train.config import load_config

    ckpt = save_tiny(tmp_path / "step_5", step=5)
    assert manifest.read(ckpt).run == {}                       # a save without a run: allowed
    run = run_info(load_config("tiny"))
    _edit(ckpt, _set("run", run))
    assert manifest.read(ckpt).run == run
    _edit(ckpt, _set("run", "data", "identity", _IDENTITY))
    assert manifest.read(ckpt).run["data"]["identity"] == _IDENTITY
    for name in ("step_7.partial", "copied"):                  # a save in progress, a folder someone named
        other = Path(shutil.copytree(ckpt, tmp_path / name))
        assert manifest.read(other).step == 5
    _refused(Path(shutil.copytree(ckpt, tmp_path / "step_6")), "step_6")


def test_a_symlinked_manifest_is_refused_not_followed(tmp_path):
    ckpt = save_tiny(tmp_path / "step_5", step=5)
    real = tmp_path / "elsewhere.json"
    os.replace(ckpt / manifest.NAME, real)
    os.symlink(real, ckpt / manifest.NAME)
    assert "symbolic link" in _refused(ckpt, manifest.NAME)
    assert read_regular(ckpt / manifest.NAME, 1 << 20, "x")    # other readers still follow by default


def test_a_bad_newest_manifest_makes_a_resume_take_the_older_checkpoint(tmp_path, capsys):
    from distattn.cli import main

    root = tmp_path / "ckpt"
    save_tiny(root / "step_2", step=2)
    _edit(save_tiny(root / "step_4", step=4), _set("step", 10**18))
    said = []
    assert checkpoint.newest_usable(root, say=said.append) == root / "step_2"
    assert len(said) == 1 and "skipped step_4: " in said[0] and "step is 1000000000000000000" in said[0]
    assert main(["ckpt", "verify", str(root / "step_4")]) == 1
    out = capsys.readouterr()
    failed = [line for line in out.out.splitlines() if "step_4" in line and "step is" in line]
    assert len(failed) == 1 and "Traceback" not in out.out + out.err


def test_resume_config_names_a_model_recorded_without_its_shape_keys(tmp_path):
    from distattn.train.checkpoint.resume import resume_config, run_info
    from distattn.train.config import load_config

    cfg = load_config("tiny")
    run = run_info(cfg)
    with pytest.raises(ValueError, match=r"refusing to resume step 3: its manifest records no model\.dim, "):
        resume_config(cfg, SimpleNamespace(run={}, step=3))   # `run = {}` must not skip the shape check
    assert resume_config(cfg, SimpleNamespace(run=run, step=3)).train.lr_decay_steps == cfg.train.steps
    partial = {**run, "model": {"dim": run["model"]["dim"]}, "lr_decay_steps": None}
    with pytest.raises(ValueError, match=r"refusing to resume step 3: its manifest records no model\.n_layers, "
                                         r"model\.n_heads") as err:
        resume_config(cfg, SimpleNamespace(run=partial, step=3))
    assert "\n" not in str(err.value)
    odd = {**run, "model": {**run["model"], "dim": "256"}, "data": {}}
    with pytest.raises(ValueError, match=r"its manifest records model\.dim as '256', not the type"):
        resume_config(cfg, SimpleNamespace(run=odd, step=3))


def test_ckpt_verify_fails_what_no_resume_takes(tmp_path, capsys):
    from distattn.cli import main
    from distattn.train.checkpoint.resume import run_info
    from distattn.train.config import load_config

    run = run_info(load_config("tiny"))
    save_tiny(tmp_path / "step_1", run=run)
    save_tiny(tmp_path / "step_2", run={})
    save_tiny(tmp_path / "step_3", run={**run, "model": {**run["model"], "dim": "64"}})
    assert main(["ckpt", "verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert sorted(line.split()[0] for line in out) == ["FAIL", "FAIL", "ok"], out
    assert any("step_2: no run can resume it: its manifest records no model.dim" in line for line in out), out
    assert any("step_3: no run can resume it: its manifest records model.dim as '64'" in line for line in out), out
