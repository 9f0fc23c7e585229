"""The trainer when a run goes wrong: a loss or gradient norm that is not finite, a metrics file torn
by a crash. Each stops or recovers with one line that says what happened and what is kept."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import small_yaml
from distattn.cli import main
from distattn.distributed.spawn import RankError, run_distributed
from distattn.train.config import RunConfig, load_config
from distattn.train.trainer import NonFinite, train

SMALL = {"model": {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64},
         "data": {"seq_len": 256}, "parallel": {"dp": 1, "cp": 2},
         "train": {"steps": 3, "warmup_steps": 1, "ckpt_every": 1}}


def _config(tmp_path, **changes) -> Path:
    return small_yaml(SMALL, tmp_path, **changes)


def _rows(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def _steps_saved(tmp_path) -> list[str]:
    ckpt = tmp_path / "run" / "ckpt"
    return sorted(p.name for p in ckpt.iterdir()) if ckpt.is_dir() else []


def test_a_nan_loss_stops_the_run_in_one_line_and_saves_nothing(tmp_path, capfd):
    # rope_theta 1e-300: the rotary frequencies overflow, the first loss is nan
    assert main(["train", str(_config(tmp_path, model={"rope_theta": 1e-300}))]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step 1: the loss is nan" in err[0] and "newest good checkpoint: none" in err[0], err
    assert _steps_saved(tmp_path) == []


def test_skip_step_logs_the_step_and_goes_on(tmp_path):
    cfg = _config(tmp_path, model={"rope_theta": 1e-300}, train={"on_nonfinite": "skip_step"})
    assert main(["train", str(cfg)]) == 0
    def refuse(constant):   # what a strict JSON parser (JavaScript's, jq's) does with a bare NaN
        raise ValueError(f"not JSON: {constant}")
    text = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=refuse) for line in text]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["skipped"] and r["loss"] is None for r in rows)


def _inf_gradient_at(cfg: RunConfig, bad_step: int):
    """``train`` with the gradient norm made infinite at step ``bad_step`` (as an overflow would)."""
    clip, calls = torch.nn.utils.clip_grad_norm_, [0]

    def clip_or_overflow(*args, **kwargs):
        calls[0] += 1
        norm = clip(*args, **kwargs)
        return norm * math.inf if calls[0] == bad_step else norm
    torch.nn.utils.clip_grad_norm_ = clip_or_overflow
    return train(cfg, False)


@pytest.mark.parametrize("policy", ["stop", "skip_step"])
def test_a_step_gone_bad_mid_run(tmp_path, policy):
    cfg = load_config(_config(tmp_path, train={"steps": 4, "on_nonfinite": policy}))
    if policy == "stop":
        with pytest.raises(RankError, match="NonFinite: step 3: the gradient norm is inf"):
            run_distributed(_inf_gradient_at, 2, cfg, 3, timeout=300)
        assert _steps_saved(tmp_path) == ["step_1", "step_2"]   # the newest good state stays the newest
        assert [r["step"] for r in _rows(tmp_path)] == [1, 2]
        return
    history = run_distributed(_inf_gradient_at, 2, cfg, 3, timeout=300)[0]
    assert [m.get("skipped", False) for m in history] == [False, False, True, False]
    assert math.isinf(history[2]["grad_norm"]) and _steps_saved(tmp_path)[-1] == "step_4"
    assert issubclass(NonFinite, RuntimeError)


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, capfd):
    cfg = _config(tmp_path, train={"steps": 2})
    assert main(["train", str(cfg)]) == 0
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 3, "loss": 5.1')   # a crash while writing step 3's row
    capfd.readouterr()
    assert main(["train", str(cfg), "--resume", "--steps", "3"]) == 0
    out = capfd.readouterr()
    assert "dropped its last line" in out.out + out.err
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3]


def test_a_damaged_metrics_line_before_the_last_is_one_line(tmp_path, capfd):
    cfg = _config(tmp_path, train={"steps": 2})
    assert main(["train", str(cfg)]) == 0
    metrics = tmp_path / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("garbage\n" + lines[1] + "\n")
    capfd.readouterr()
    assert main(["train", str(cfg), "--resume", "--steps", "3"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 1 is damaged" in err[0], err
