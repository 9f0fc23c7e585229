"""Issue 55: ``parallel.scheduler: auto`` and ``parallel.cp: auto`` in the trainer, 8 gloo ranks, fp64, a
corpus of one long document among many short ones a step. Each step lays the ranks out as CP groups of
mixed sizes with schedulers of their own; the losses, gradient norms and weights are those of the same
global batches trained by a fixed (zigzag, cp 4) configuration (<= 1e-12); a run stopped and resumed
gives the uninterrupted one's; the metrics carry each step's choice and its predicted step time; a
choice not ready when its step starts gives way to the fixed choice, planned then, logged, with the
same losses (that 8-rank run with --slow); groups running cad (issue 67), some ranks in one nano-batch
and some in two in the same step, train exactly too. Rank 0's chooser runs in a child process, with
choose_step's answers."""

import logging
from concurrent.futures import Future
from unittest import mock

import numpy as np
import pytest
import torch

from conftest import DictStore, small_run
from distattn.distributed.spawn import run_distributed
from distattn.train.data.corpus import write_token_file

SEQ = 256
SMALL = {"model": {"dim": 32, "n_layers": 1, "n_heads": 8, "n_kv_heads": 4, "ffn_dim": 64},
         "data": {"source": "tokens", "seq_len": SEQ, "seed": 0},
         "parallel": {"dp": 2, "cp": "auto", "world_size": 8, "scheduler": "auto", "dp_mode": "fsdp",
                      "backend": "reference", "plan_ahead": False},
         "train": {"steps": 3, "warmup_steps": 1, "ckpt_every": 2, "log_every": 1}}


def _corpus(path) -> str:
    """A step (2 x 256 tokens) holds one document of ~200 tokens and some twenty of ~5-20."""
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(12):
        docs.append(rng.integers(0, 256, int(rng.integers(170, 230))))
        docs += [rng.integers(0, 256, int(n)) for n in rng.integers(4, 20, 25)]
    write_token_file(path, docs)
    return str(path)


def _runs(auto, fixed, first, resumed, late, cad) -> dict:
    from distattn.train import auto_plan
    from distattn.train.trainer import Trainer

    def weights(trainer):
        return {k: v.full_tensor().clone() if hasattr(v, "full_tensor") else v.clone()
                for k, v in trainer.model.state_dict().items()}

    torch.set_default_dtype(torch.float64)
    try:
        out = {}
        for name, cfg in (("auto", auto), ("fixed", fixed)):
            t = Trainer(cfg)
            out[name] = t.run()
            out[name + "_weights"] = weights(t)
        real = Trainer._choice

        def late_at_2(trainer, ready, refined, step):   # every rank: step 2's choice is not ready
            return real(trainer, ready, Future() if step == 2 else refined, step)
        if late is not None:
            with mock.patch.object(Trainer, "_choice", late_at_2):
                out["late"] = Trainer(late).run()
        # cad in the mix. Steps 1 and 3: over each group's own ranks, the longest piece alone on ranks 0-3
        # (one document: one nano-batch), the rest dealt over ranks 4-7 alone (two documents or more
        # each: two). Step 2: cad pooled over two groups of 4, as a fixed cad runs (two nano-batches)
        class Chooser:
            def __init__(self, *args, **kwargs):
                self.calls = 0

            def choose(self, lens, fixed):
                self.calls += 1
                order = sorted(range(len(lens)), key=lambda i: -lens[i])
                if self.calls == 2:
                    return [["cad", 4, sorted(order[k::2]), True, 2] for k in range(2)], 1.0, 0.0
                return [["cad", 4, [order[0]], False, 2]] + [["cad", 1, sorted(order[1 + k::4]), False, 2]
                                                            for k in range(4)], 1.0, 0.0

            def close(self):
                pass
        real_choose, parts = auto_plan.AutoPlanner.choose, []

        def choose(planner, fixed):
            got = real_choose(planner, fixed)
            parts.append(len(got.plans))
            return got
        with mock.patch.object(auto_plan, "ChooserProcess", Chooser), \
                mock.patch.object(auto_plan.AutoPlanner, "choose", choose):
            t = Trainer(cad)
            out["cad"] = t.run()
            out["cad_weights"] = weights(t)
        out["cad_parts"] = parts
        out["first"] = Trainer(first).run()
        t = Trainer(resumed, resume=True)
        out["resumed"] = t.run()
        out["resumed_weights"] = weights(t)
        return out
    finally:
        torch.set_default_dtype(torch.float32)


def test_auto_trains_mixed_groups_exactly_and_resumes(tmp_path, request):
    path = _corpus(tmp_path / "corpus")
    auto = small_run(SMALL, tmp_path / "auto", data={"path": path}, train={"lr_decay_steps": 3})
    fixed = small_run(SMALL, tmp_path / "fixed", data={"path": path, "packing": "stream"},
                      parallel={"cp": 4, "world_size": None, "scheduler": "zigzag"})
    first = small_run(SMALL, tmp_path / "resume", data={"path": path}, train={"steps": 2, "lr_decay_steps": 3})
    resumed = small_run(SMALL, tmp_path / "resume", data={"path": path}, train={"lr_decay_steps": 3})
    # the late choice's run of 8 ranks with --slow; by default test_a_late_choice_runs_the_fixed_one_and_says_so
    # takes Trainer._choice's same fallback
    slow = request.config.getoption("--slow")
    late = small_run(SMALL, tmp_path / "late", data={"path": path}, train={"lr_decay_steps": 3}) if slow else None
    cad = small_run(SMALL, tmp_path / "cad", data={"path": path}, train={"lr_decay_steps": 3})
    assert auto.world_size == fixed.world_size == 8
    ranks = run_distributed(_runs, 8, auto, fixed, first, resumed, late, cad, timeout=900)
    got = ranks[0]

    # mixed groups: some step runs CP groups of different sizes, and every choice tiles the 8 ranks
    choices = [m["choice"] for m in got["auto"]]
    assert all(sum(cp for _, cp in c) == 8 for c in choices), choices
    assert any(len({cp for _, cp in c}) > 1 for c in choices), choices
    assert all(m["predicted_step_s"] > 0 for m in got["auto"])
    # 3 steps: too few behind any of them to calibrate the model to this machine (step_calibration.FIRST)
    assert all(m["predicted_step_s"] == m["model_step_s"] for m in got["auto"])
    assert [m["choice"] for m in got["fixed"]] == [[["zigzag", 4]] * 2] * 3

    # exact: the same tokens and normalisation, computed by other groups
    for a, f in zip(got["auto"], got["fixed"], strict=True):
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - f[key]) <= 1e-12 * abs(f[key]), (key, a[key], f[key])
    for key, want in got["fixed_weights"].items():
        assert torch.allclose(got["auto_weights"][key], want, rtol=1e-12, atol=1e-14), key

    # a late choice: step 2 runs the fixed choice, planned then (the only plans of that step), exactly
    assert ("late" in got) == slow
    if slow:
        assert [m["choice_late"] for m in got["late"]] == [False, True, False]
        assert got["late"][1]["choice"] == [["zigzag", 4]] * 2
        for a, f in zip(got["late"], got["fixed"], strict=True):
            assert abs(a["loss"] - f["loss"]) <= 1e-12 * abs(f["loss"]), (a["loss"], f["loss"])

    # cad in the mix: ranks of one nano-batch and of two in one step, FSDP2 gathering each block once;
    # and cad pooled over every group
    assert [r["cad_parts"] for r in ranks] == [[1, 2, 1]] * 4 + [[2, 2, 2]] * 4
    mixed = [["cad", 4]] + [["cad", 1]] * 4
    assert [m["choice"] for m in got["cad"]] == [mixed, [["cad", 4]] * 2, mixed]
    for a, f in zip(got["cad"], got["fixed"], strict=True):
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - f[key]) <= 1e-12 * abs(f[key]), (key, a[key], f[key])
    for key, want in got["fixed_weights"].items():
        assert torch.allclose(got["cad_weights"][key], want, rtol=1e-12, atol=1e-14), key

    # resume: steps 1-2, then step 3 from the checkpoint, as the straight run
    assert [m["loss"] for m in got["first"] + got["resumed"]] == [m["loss"] for m in got["auto"]]
    for key, want in got["auto_weights"].items():
        assert torch.equal(got["resumed_weights"][key], want), key


def test_a_late_choice_runs_the_fixed_one_and_says_so(caplog):
    from distattn.train.plan_ahead import StepPlans
    from distattn.train.trainer import Trainer

    fixed = StepPlans(None, [], [], [], 0.0, choice=[["zigzag", 4], ["zigzag", 4]])
    chosen = StepPlans(None, [], [], [], 0.0, choice=[["ulysses", 8]])
    trainer = Trainer.__new__(Trainer)
    trainer.device = torch.device("cpu")
    trainer.ahead, trainer.auto = mock.Mock(), mock.Mock()
    trainer.auto.fallback.side_effect = lambda plans: ("planned now", plans)
    pending, done = Future(), Future()   # still being chosen; chosen
    done.set_result(chosen)
    # one process: the all-reduce of the readiness flag leaves it as it is
    with mock.patch.object(torch.distributed, "all_reduce", lambda t, op=None: None), \
            caplog.at_level(logging.WARNING, logger="distattn.train.auto_plan"):
        assert trainer._choice(fixed, pending, 7) == (("planned now", fixed), True)
        assert trainer._choice(fixed, done, 8) == (chosen, False)
    assert "step 7" in caplog.text and "fixed choice (zigzag, cp 4)" in caplog.text and "step 8" not in caplog.text


@pytest.mark.parametrize("change, words", [
    ({"cp": "auto", "world_size": None}, "parallel.world_size"),
    ({"cp": "auto", "world_size": 6, "dp": 4}, "multiple of parallel.dp"),
    ({"cp": "auto", "world_size": 8, "scheduler": "cad"}, "cannot share"),
    ({"cp": "auto", "world_size": 8, "ulysses_degree": 2, "scheduler": "usp"}, "parallel.ulysses_degree"),
    ({"cp": 4, "world_size": 8, "dp": 1}, "parallel.world_size"),
    ({"cp": "four"}, "parallel.cp"),
    ({"cp": 2, "world_size": None, "scheduler": "zigzag", "network": "x"}, "parallel.network"),
])
def test_auto_refuses_what_it_cannot_run(change, words, tmp_path):
    base = {**SMALL, "data": {"seq_len": SEQ}}
    with pytest.raises(ValueError, match=words):
        small_run(base, tmp_path, parallel=change)


def test_rank_0_chooses_and_the_others_read_its_choice():
    from distattn.train.auto_plan import KEPT_STEPS, SharedChoice

    store, made = DictStore(), []

    def decide():
        made.append(1)
        return [["zigzag", 4, [0, 1]], ["ring", 1, [2]]], 0.5
    zero, other = SharedChoice(store, 3), SharedChoice(store, 3)
    for _ in range(KEPT_STEPS + 2):
        mine = zero.next(0, decide)
        assert other.next(5, lambda: pytest.fail("only rank 0 chooses")) == mine
    assert len(made) == KEPT_STEPS + 2
    assert sorted(store) == [f"distattn/auto/{s}" for s in range(5, 3 + KEPT_STEPS + 2)]
    # the run ends: rank 0 marks the steps it will not choose, and a rank waiting for one stops
    zero.abandon(0)
    with pytest.raises(RuntimeError, match="abandoned"):
        other.next(5, decide)


def test_rank_0_serves_the_choice_at_the_address_that_routes_to_the_master(monkeypatch):
    import socket

    from distattn.train.auto_plan import _own_address

    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert _own_address() == "127.0.0.1"   # local processes (file:// rendezvous)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert _own_address() == "127.0.0.1"
    monkeypatch.setenv("MASTER_ADDR", "no-such-host.invalid")
    assert _own_address() == socket.gethostname()


def test_the_chooser_process_answers_as_choose_step_does():
    """Rank 0's chooser runs in a child process: the same layout and prediction as choose_step in this
    one; an error there is raised here, named; close ends the child."""
    from distattn.costmodel.model_shape import MODELS
    from distattn.costmodel.network import profile_of
    from distattn.sim.job import SimConfig
    from distattn.sim.per_batch import MIXED, choose_step
    from distattn.train.chooser import ChooserProcess

    job, network = SimConfig(MODELS["llama3-8b"], 16, 65536, 1), profile_of(None)
    lens = [40000, 9000, 5000, 3000, 2000, 1536] + [4096] * 16 + [32768]
    chooser = ChooserProcess(job, network, MIXED, (1, 2, 4, 8, 16))
    try:
        fixed = [("zigzag", 8, 1), ("cad", 8, 1)]
        layout, predicted, seconds = chooser.choose(lens, fixed)
        here = choose_step(job, lens, network, MIXED, None, fixed=fixed)
        assert layout == here.layout() and predicted == here.predicted_step_s and seconds > 0
        with pytest.raises(RuntimeError, match="the chooser process .* failed: ValueError: doc_lens"):
            chooser.choose([], None)
        assert chooser.choose(lens, None)[1] > 0   # (still answering after an error)
    finally:
        chooser.close()
    assert chooser._proc.returncode == 0


def test_bench_auto_corpus_runs_and_summary(tmp_path):
    from distattn.bench.auto import FIXED, configs, corpus, summary

    docs = corpus(1024, 3, seed=0)
    assert sum(map(len, docs)) == 4 * 2 * 1024 and sum(len(d) == 768 for d in docs) == 4
    runs = configs(tmp_path / "c", tmp_path, 1024, 3)
    assert runs["auto"].parallel.auto and runs["auto"].world_size == 8
    assert all(runs[f"{n} cp 4"].world_size == 8 for n in FIXED)
    rows = [{n: {"step_time_s": 1.0 + (n != "auto"), "predicted_step_s": 2e-4, "planning_s": 0.0,
                 "plan_made_s": 0.2, "choice_late": False} for n in runs} for _ in range(3)]
    lines = summary(rows, {n: [4e-4] * 3 for n in runs if n != "auto"})
    assert lines[-1].endswith("2.00x") and "late (the fixed choice ran) on 0 of 3 steps" in lines[-2]


def test_a_choice_in_words_counts_alike_groups():
    from distattn.train.auto_plan import describe_choice

    assert describe_choice([["ulysses", 4], ["ring", 1], ["ring", 1]]) == "1 x ulysses cp 4, 2 x ring cp 1"
