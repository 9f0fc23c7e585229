"""The command line a first user meets: help, clear errors before any work, one run per folder,
one step numbering, configs that fail instead of doing damage."""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distattn.cli import build_parser, main
from distattn.train.config import RunConfig, load_config, validate

ROOT = Path(__file__).resolve().parents[1]
DISTATTN = str(Path(sys.executable).with_name("distattn"))
SMALL = {"model": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128},
         "data": {"seq_len": 512}, "parallel": {"dp": 1, "cp": 2},
         "train": {"steps": 3, "warmup_steps": 1, "ckpt_every": 2}}


def _write(tmp_path, name="cfg.yaml", **changes) -> Path:
    sections = {k: dict(v) for k, v in SMALL.items()}
    sections["train"]["out"] = str(tmp_path / "run")
    for section, values in changes.items():
        sections.setdefault(section, {}).update(values)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(sections))
    return path


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from _subparsers(sub)


# ---- item 14: help a user can learn from, without importing torch ---------------------------
def test_every_flag_has_help_and_every_subcommand_an_example():
    parser = build_parser()
    subs = dict(_subparsers(parser))
    assert {"demo", "train", "launch", "cluster", "nccl-parse", "probe", "nccl-tests", "fit", "bench",
            "simulate"} <= set(subs)
    for name, sub in subs.items():
        assert "examples:" in (sub.epilog or ""), name
        for action in sub._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    assert "(default: 4)" in subs["demo"].format_help()


def test_help_version_and_nccl_parse_do_not_import_torch(tmp_path):
    log = tmp_path / "ag.log"
    log.write_text("#       size         count      type   redop    root     time   algbw   busbw #wrong     time"
                   "   algbw   busbw #wrong\n"
                   "     1048576        262144     float    none      -1    40.00   26.21   22.94      0    39.00"
                   "   26.89   23.53      0\n")
    probe = ("import sys, runpy; sys.argv = ['distattn'] + sys.argv[1:]\n"
             "try:\n    runpy.run_module('distattn.cli', run_name='__main__')\n"
             "except SystemExit as e:\n    print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', e.code)\n")
    for args in (["--help"], ["--version"], ["train", "--help"], ["cluster", "nccl-parse", str(log)]):
        start = time.monotonic()
        out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60)
        assert out.stdout.strip().splitlines()[-1] == "NO-TORCH 0", (args, out.stdout[-500:], out.stderr)
        assert time.monotonic() - start < 10
    version = subprocess.run([DISTATTN, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("distattn 0.")


# ---- item 10: errors before work: one line, exit 2, no rank started -------------------------
@pytest.mark.parametrize("case", ["missing", "syntax", "tag", "scheduler", "data_path", "nccl_log", "doclens",
                                  "resume_nothing"])
def test_errors_are_one_line_exit_2_before_any_rank(tmp_path, capsys, case):
    cfg = _write(tmp_path)
    argv = {"missing": ["train", str(tmp_path / "nope.yaml")],
            "syntax": ["train", str(tmp_path / "syntax.yaml")],
            "tag": ["train", str(tmp_path / "tag.yaml")],
            "scheduler": ["train", str(cfg), "--scheduler", "nosuch"],
            "data_path": ["train", str(_write(tmp_path, "tok.yaml", data={"source": "tokens",
                                                                        "path": str(tmp_path / "corpus")}))],
            "nccl_log": ["cluster", "nccl-parse", str(tmp_path / "missing.log")],
            "doclens": ["simulate", "--gpus", "8", "--seq-len", "64K", "--doclens", str(tmp_path / "no.json")],
            "resume_nothing": ["train", str(cfg), "--resume"]}[case]
    (tmp_path / "syntax.yaml").write_text("model: {dim: 64\n")
    (tmp_path / "tag.yaml").write_text(f"model: !!python/object/apply:os.system ['touch {tmp_path}/pwned']\n")
    start = time.monotonic()
    with pytest.raises(SystemExit) if case in ("nccl_log", "doclens") else _no_exit() as exit_info:
        code = main(argv)
    code = code if exit_info is None else exit_info.value.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "rerun with --resume" not in err and time.monotonic() - start < 5
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


class _no_exit:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---- item 6: config values that would do damage are refused ---------------------------------
@pytest.mark.parametrize("section,values,message", [
    ("train", {"grad_clip": -1}, "train.grad_clip must be > 0"),
    ("model", {"tie_embeddings": "no"}, "model.tie_embeddings must be true or false"),
    ("train", {"lr": "fast"}, "train.lr must be a finite number"),
    ("data", {"seed": "x"}, "data.seed must be an int"),
    ("data", {"seq_len": "1e11"}, "YAML reads numbers like 1e11 as text"),
    ("train", {"weight_decay": -0.1}, "train.weight_decay must be >= 0"),
    ("parallel", {"timeout_s": 0}, "parallel.timeout_s must be > 0"),
    ("parallel", {"ulysses_degree": 3}, "parallel.ulysses_degree"),
    ("model", {"n_layers": 2.5}, "model.n_layers must be an int"),
])
def test_damaging_config_values_are_refused(tmp_path, section, values, message):
    with pytest.raises(ValueError, match=message):
        load_config(_write(tmp_path, **{section: values}))


def test_ints_where_floats_are_meant_are_accepted():
    cfg = validate(RunConfig().replace(train={"lr": 1, "min_lr": 1}))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_a_run_that_cannot_fit_in_memory_is_refused_before_ranks_start(tmp_path, capsys):
    cfg = _write(tmp_path, data={"seq_len": 2**31})   # (the most data.seq_len may be)
    start = time.monotonic()
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "GiB" in err and "data.seq_len" in err and time.monotonic() - start < 5


# ---- items 7, 8, 13: one run per folder, each step once, one numbering -------------------------
def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_one_run_per_folder_one_numbering_and_each_step_once(tmp_path, capfd):
    cfg, out = _write(tmp_path), tmp_path / "run"
    # a fresh process: rank 0 prints the step lines, and a forkserver started by an earlier test
    # would still write them to that test's capture
    first = subprocess.run([DISTATTN, "train", str(cfg)], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    console = [line.split()[1] for line in first.stdout.splitlines() if line.startswith("step")]
    assert console == ["1/3", "2/3", "3/3"]
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["step_2", "step_3"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(out / "tb"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("train/loss")] == [1, 2, 3]

    # a used folder is refused without --resume or --overwrite, and names what it holds
    assert main(["train", str(cfg)]) == 2
    assert "--resume" in capfd.readouterr().err

    # a resumed run says which checkpoint it loads; steps logged after it appear once
    import shutil

    shutil.rmtree(out / "ckpt" / "step_3")
    assert main(["train", str(cfg), "--resume"]) == 0
    assert f"resuming from {out / 'ckpt' / 'step_2'} (step 2 of 3; " in capfd.readouterr().out
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]

    # a finished run says so
    assert main(["train", str(cfg), "--resume"]) == 0
    assert "already finished" in capfd.readouterr().out

    # --overwrite starts again from scratch
    assert main(["train", str(cfg), "--overwrite", "--steps", "1"]) == 0
    assert [r["step"] for r in _rows(out)] == [1] and [p.name for p in (out / "ckpt").iterdir()] == ["step_1"]


def test_a_folder_in_use_is_refused(tmp_path, capsys):
    from distattn.train.preflight.checks import lock_out

    held = lock_out(tmp_path / "run")
    try:
        assert main(["train", str(_write(tmp_path))]) == 2
        assert "in use by pid" in capsys.readouterr().err
    finally:
        held.close()
