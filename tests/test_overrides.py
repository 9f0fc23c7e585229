"""Any config key from the command line: ``distattn train CONFIG section.key=value ...`` (typed and checked
like the file, one-line errors naming the key), ``--print-config``, and ``distattn launch`` passing the
overrides on to every rank's command. Nothing here starts a rank."""

import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from distattn.cli import main
from distattn.train.config import load_config
from distattn.train.config.overrides import parse_overrides

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _printed(capsys, *words) -> dict:
    """``train TINY WORDS --print-config``, parsed back."""
    assert main(["train", TINY, *words, "--print-config"]) == 0, capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def _refused(capsys, command, *words) -> str:
    """The one line ``distattn COMMAND TINY WORDS`` exits 2 with."""
    argv = [command, TINY, *words] + (["--print-config"] if command == "train" else ["--dry-run"])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("word, section, key, value", [
    ("parallel.cp=2", "parallel", "cp", 2),                               # int
    ("train.lr=1e-4", "train", "lr", 1e-4),                               # float, as written on command lines
    ("train.lr=1", "train", "lr", 1.0),                                   # an int where a float is meant
    ("model.tie_embeddings=false", "model", "tie_embeddings", False),     # bool
    ("parallel.scheduler=cad", "parallel", "scheduler", "cad"),           # str
    ("train.out=runs/a b", "train", "out", "runs/a b"),
    ('train.out="123"', "train", "out", "123"),                           # quoted: text, not a number
    ("model.softcap=50", "model", "softcap", 50.0),                       # optional, set
    ("parallel.ulysses_degree=null", "parallel", "ulysses_degree", None),  # optional, unset
    ("train.lr_decay_steps=~", "train", "lr_decay_steps", None),
])
def test_each_type_is_read_as_yaml_and_typed_like_the_file(capsys, word, section, key, value):
    cfg = _printed(capsys, word, "train.min_lr=1.0e-5")
    assert cfg[section][key] == value and type(cfg[section][key]) is type(value)


@pytest.mark.parametrize("value, file_value", [("[1, 2]", [1, 2]), ("{a: 1}", {"a": 1}), ("true", True),
                                               ("64.0", 64.0), ("sixty", "sixty")])
def test_a_wrong_type_is_refused_with_the_files_words(tmp_path, capsys, value, file_value):
    """No key takes a list or mapping: those are read whole (YAML flow style) and refused by the file's check."""
    err = _refused(capsys, "train", f"model.dim={value}")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"model": {"dim": file_value}}))
    with pytest.raises(ValueError) as from_file:
        load_config(path)
    assert err == f"distattn train: error: {from_file.value}\n"
    assert "model.dim must be an int" in err


def test_unknown_keys_and_sections_name_the_key_and_the_closest(capsys):
    assert _refused(capsys, "train", "train.lrr=1e-4") == \
        "distattn train: error: override train.lrr=1e-4: unknown config key 'train.lrr'; did you mean train.lr?\n"
    assert _refused(capsys, "train", "trian.lr=1e-4") == \
        "distattn train: error: override trian.lr=1e-4: unknown config section 'trian'; did you mean train.lr? " \
        "(known: model, data, parallel, train)\n"
    assert "did you mean train.steps?" in _refused(capsys, "train", "data.steps=3")   # the key of another section
    assert "did you mean train.lr?" in _refused(capsys, "train", "lr=1e-4")           # no section
    assert "known keys of model: dim, n_layers" in _refused(capsys, "train", "model.zzz=1")
    assert "override 'parallel.cp' has no '='" in _refused(capsys, "train", "parallel.cp")
    assert "not valid YAML" in _refused(capsys, "train", "model.dim=[1")
    assert "train.steps is given twice on the command line (train.steps=3 and --steps 4)" in \
        _refused(capsys, "train", "train.steps=3", "--steps", "4")
    assert "parallel.cp is given twice" in _refused(capsys, "train", "parallel.cp=2", "parallel.cp=1")
    assert "unknown config key 'parallel.cpp'; did you mean parallel.cp?" in \
        _refused(capsys, "launch", "parallel.cpp=2")


def test_values_are_checked_after_merging_like_the_file(capsys):
    # each alone is in range, together they are not: the check sees the merged config
    assert "train.min_lr (0.0003) must be at most train.lr (0.0001)" in _refused(capsys, "train", "train.lr=1e-4")
    assert "train.lr must be at most 1" in _refused(capsys, "train", "train.lr=2")


def test_print_config_is_the_resolved_config_and_loads_back(tmp_path, capsys):
    out = str(tmp_path / "run")
    printed = _printed(capsys, "parallel.cp=2", "--steps", "7", "model.n_layers=2", "train.lr=1e-3", "--out", out,
                       "--scheduler", "cad")
    expected = load_config(TINY, parse_overrides(["parallel.cp=2", "model.n_layers=2", "train.lr=1e-3"],
                                                 {"train.steps": 7, "train.out": out, "parallel.scheduler": "cad"}))
    assert set(printed) == {"model", "data", "parallel", "train"}
    assert printed["parallel"]["cp"] == 2 and printed["train"]["steps"] == 7 and printed["train"]["lr"] == 1e-3
    assert printed["model"]["softcap"] is None and printed["train"]["out"] == out
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(printed))
    assert load_config(path) == expected                       # the printed config is a config file
    assert not Path(out).exists()                               # nothing started


def test_an_override_equal_to_the_file_changes_nothing(capsys):
    plain = load_config(TINY)
    same = load_config(TINY, ["train.lr=3.0e-3", "train.lr_decay_steps=null", "parallel.cp=4",
                              "model.tie_embeddings=true", "train.out=runs/tiny"])
    assert same == plain
    assert _printed(capsys, "parallel.cp=4") == _printed(capsys)
    assert load_config(TINY, ["train.steps=5"]) == plain.replace(train={"steps": 5})


def test_parse_overrides_accepts_every_yaml_number_a_command_line_gets():
    got = parse_overrides(["train.lr=1e-4", "train.min_lr=5E-6", "train.grad_clip=.5", "model.rope_theta=5e+5",
                           "data.path=.e5"])
    assert got == {"train": {"lr": 1e-4, "min_lr": 5e-6, "grad_clip": 0.5}, "model": {"rope_theta": 5e5},
                   "data": {"path": ".e5"}}


def _dry_run(capsys, *args) -> str:
    assert main(["launch", TINY, *args, "--dry-run"]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


WORDS = ["parallel.cp=2", "train.lr=1e-3", "train.out=runs/a b", "data.path=$(touch pwned)"]


def test_launch_local_passes_the_overrides_on(capsys):
    argv = shlex.split(_dry_run(capsys, "--backend", "local", *WORDS[:2], "--resume", *WORDS[2:]))
    train = argv.index("train")
    assert argv[train + 1] == TINY and argv[train + 2: train + 6] == WORDS and argv[-1] == "--resume"


def test_launch_torchrun_passes_the_overrides_on_and_sizes_by_them(capsys):
    argv = shlex.split(_dry_run(capsys, "--backend", "torchrun", "--out", "runs/o", *WORDS[:1], *WORDS[3:]))
    assert "--nproc-per-node=2" in argv                         # parallel.cp=2 of 4 in the file
    assert argv[argv.index("train") + 1:] == [TINY, WORDS[0], WORDS[3], "--out", "runs/o"]


def test_launch_slurm_script_quotes_the_overrides(tmp_path, capsys):
    script = _dry_run(capsys, "--backend", "slurm", *WORDS)
    assert "--cpus-per-task=2" in script                        # the layout follows the override
    line = next(line for line in script.splitlines() if "distattn.cli train" in line)
    assert shlex.split(line)[-4:] == WORDS                      # as written, one word each, nothing expanded
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    err = _refused(capsys, "launch", "--backend", "slurm", "train.out=a\rb")
    assert "contains the control character '\\r'" in err


def test_launch_ray_applies_the_overrides_to_its_config(capsys):
    out = _dry_run(capsys, "--backend", "ray", "parallel.cp=2", "train.out=runs/a b")
    assert out.startswith("Ray TorchTrainer: 2 workers") and "parallel.cp=2 'train.out=runs/a b'" in out
