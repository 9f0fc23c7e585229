"""The trainer as an object (``distattn.train.trainer.Trainer``): embedded in a script in three lines with
a callback per step, resumed, its plans reused from its plan cache, and the one resume decision."""

import json
from unittest import mock

import pytest
import torch.distributed as dist

import distattn.runtime.plan_cache as plan_cache
from distattn.train.checkpoint import resume as resuming

# one rank, one small layer, 64-token sequences: ~1 s a step on a CPU core. Most stdlib files are longer
# than 64 bytes, so most batches are one document of 64 tokens: steps whose plans the cache holds already
SMALL = ["parallel.cp=1", "model.n_layers=1", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2",
         "model.ffn_dim=64", "data.seq_len=64", "train.warmup_steps=1", "train.ckpt_every=100"]


def _overrides(out, steps: int) -> list[str]:
    return [*SMALL, f"train.steps={steps}", f"train.out={out}"]


def test_three_lines_train_with_a_callback(tmp_path):
    out = tmp_path / "run"
    seen = []
    overrides = _overrides(out, 3)
    had_group = dist.is_initialized()   # (a one-rank group an earlier test of this process made: the trainer's)

    # docs/guides/embed.md, "The trainer as an object": its lines
    from distattn.train.config import load_config
    from distattn.train.trainer import Trainer
    history = Trainer(load_config("tiny", overrides), callbacks=[seen.append]).run()

    assert [m["step"] for m in seen] == [1, 2, 3] and seen == history
    assert all(m["loss"] > 0 and m["grad_norm"] > 0 and m["tokens_per_s"] > 0 for m in seen), seen
    # the callback got what metrics.jsonl holds (log_every 1), and the last step was checkpointed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == seen
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["step_3"]
    assert dist.is_initialized() == had_group   # a one-rank process group the trainer made is gone


def test_on_step_resume_and_plans_from_the_cache(tmp_path):
    from distattn.train.config import load_config
    from distattn.train.trainer import Trainer

    out = tmp_path / "run"
    made = []
    real = plan_cache.make_plan

    def counting(*args, **kwargs):
        made.append(args[0])
        return real(*args, **kwargs)

    first = Trainer(load_config("tiny", _overrides(out, 2)))
    steps = []
    first.on_step(lambda m: steps.append(m["step"]))
    first.run()
    assert steps == [1, 2]

    # a second run of the same folder: continues at step 3 with the checkpoint's weights and data
    resumed = Trainer(load_config("tiny", _overrides(out, 6)), resume=True)
    note = resumed.on_step(lambda m: steps.append(m["step"]))
    assert note in resumed.callbacks   # (usable as a decorator)
    with mock.patch.object(plan_cache, "make_plan", counting):
        history = resumed.run()
    assert steps == [1, 2, 3, 4, 5, 6] and [m["step"] for m in history] == [3, 4, 5, 6]
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["step_2", "step_6"]
    # every step's plan came through the cache: the documents of each plan made differ, and steps
    # of documents planned already (one whole 64-token document) made none
    assert len(made) == len({tuple(docs) for docs in made}) < 4, made


def test_several_ranks_without_a_launcher_are_refused(tmp_path, monkeypatch):
    from distattn.train.config import load_config
    from distattn.train.trainer import Trainer

    monkeypatch.delenv("RANK", raising=False)
    cfg = load_config("tiny", [f"train.out={tmp_path}"])   # cp 4
    had_group = dist.is_initialized()   # a one-rank group of an earlier test: refused with the same hint
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 4"):
        Trainer(cfg).run()
    assert dist.is_initialized() == had_group


def test_resume_is_decided_in_one_place(tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    explicit = tmp_path / "ckpt" / "step_5"
    assert resuming.resume_from(tmp_path, explicit) is explicit and resuming.resume_from(tmp_path, True) is True
    assert resuming.resume_from(tmp_path, False) is False
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")   # a torchrun restart: resumes when there is a checkpoint
    assert resuming.resume_from(tmp_path, False) is False
    with mock.patch.object(resuming, "usable_checkpoint", return_value=explicit):
        assert resuming.resume_from(tmp_path, False) is True
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
        assert resuming.resume_from(tmp_path, False) is False
