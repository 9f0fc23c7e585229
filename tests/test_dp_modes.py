"""Issue 78: ``parallel.dp_mode`` ``ddp``, ``fsdp``, ``hsdp`` (``dp_shard`` 2 and 4) and ``zero1`` on 8
gloo ranks in fp64 train alike -- the same losses, gradient norms and final weights (<= 1e-12
relative), with two nano-batches -- and a checkpoint saved under ``hsdp`` resumes under ``zero1`` and
under ``fsdp`` (one saved under ``zero1``, under ``hsdp``) with the uninterrupted run's next losses.
Counted on gloo: ``hsdp`` gathers parameters only inside its shard groups, as often with two
nano-batches as with one; ``zero1`` sends one gradient reduce-scatter and one parameter all-gather per
bucket per step whatever the layer count, each reduce-scatter from inside the backward as its bucket
fills. The default run is cp 4 with two nano-batches; ``--slow`` adds cp 2 and one nano-batch."""

from pathlib import Path

import pytest
import torch

from conftest import small_run
from distattn.distributed.spawn import run_distributed

SMALL = {"model": {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64},
         "data": {"seq_len": 256},
         "parallel": {"dp": 2, "cp": 4, "scheduler": "cad", "backend": "reference", "plan_ahead": False,
                      "nano_batches": 2},
         "train": {"steps": 3, "warmup_steps": 1, "ckpt_every": 2}}
MODES = {"ddp": {}, "fsdp": {"dp_mode": "fsdp"}, "hsdp 2": {"dp_mode": "hsdp", "dp_shard": 2},
         "hsdp 4": {"dp_mode": "hsdp", "dp_shard": 4}, "zero1": {"dp_mode": "zero1"}}


def _weights(trainer) -> dict:
    """Whole fp64 weights by parameter name (DDP's ``module.`` prefix dropped)."""
    return {k.removeprefix("module."): (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in trainer.model.state_dict().items()}


def _train(cfgs: dict, resumes: dict) -> dict:
    from distattn.train.trainer import Trainer

    torch.set_default_dtype(torch.float64)
    try:
        out = {}
        for name, cfg in cfgs.items():
            trainer = Trainer(cfg)
            history = trainer.run()
            out[name] = ([m["loss"] for m in history], [m["grad_norm"] for m in history], _weights(trainer))
        for name, (cfg, ckpt) in resumes.items():
            history = Trainer(cfg, resume=Path(ckpt)).run()
            out[name] = [m["loss"] for m in history]
        return out
    finally:
        torch.set_default_dtype(torch.float32)


def _relative(a, b) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.mark.parametrize("cp,nano", [(4, 2), pytest.param(2, 2, marks=pytest.mark.slow),
                                     pytest.param(4, 1, marks=pytest.mark.slow),
                                     pytest.param(2, 1, marks=pytest.mark.slow)])
def test_every_dp_mode_trains_alike_and_resumes_across_modes(tmp_path, cp, nano):
    layout = {"dp": 8 // cp, "cp": cp, "nano_batches": nano}
    cfgs = {name: small_run(SMALL, tmp_path / name.replace(" ", ""), parallel={**layout, **mode})
            for name, mode in MODES.items()}
    # (saved, resumed under): hsdp's second step resumed under zero1 and fsdp, and zero1's under hsdp
    pairs = [("hsdp 4", "zero1"), ("hsdp 4", "fsdp"), ("zero1", "hsdp 2")]
    resumes = {f"{mode} from {saved}": (small_run(SMALL, tmp_path / f"{mode} from {saved}".replace(" ", ""),
                                                  parallel={**layout, **MODES[mode]}),
                                        tmp_path / saved.replace(" ", "") / "ckpt" / "step_2") for saved, mode in pairs}
    got = run_distributed(_train, 8, cfgs, resumes, timeout=900)[0]

    losses, norms, weights = got["ddp"]
    assert len(losses) == 3
    for name in MODES:
        theirs = got[name]
        assert _relative(theirs[0], losses) <= 1e-12, (name, theirs[0], losses)
        assert _relative(theirs[1], norms) <= 1e-12, (name, theirs[1], norms)
        assert theirs[2].keys() == weights.keys(), name
        for key, w in weights.items():
            assert float((theirs[2][key] - w).norm() / w.norm()) <= 1e-12, (name, key)
    for name in resumes:   # the third step, from another mode's checkpoint of the second
        assert _relative(got[name], losses[2:]) <= 1e-12, (name, got[name], losses)


class _Count:
    """The collectives a step sends: FSDP2's through ``torch.distributed`` (with their groups' ranks),
    ZeRO-1's through the names :mod:`distattn.train.zero1` calls; ``phase`` tags each call."""

    def __init__(self, monkeypatch):
        import torch.distributed as dist

        from distattn.train import zero1

        self.calls, self.phase = [], None
        for module in (dist, zero1):
            for name in ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single",
                         "reduce_scatter_tensor"):
                if hasattr(module, name):
                    monkeypatch.setattr(module, name, self._wrap(getattr(module, name), name, module is zero1))

    def _wrap(self, fn, name, zero):
        import torch.distributed as dist

        def counted(*args, group=None, **kwargs):
            ranks = tuple(dist.get_process_group_ranks(group or dist.group.WORLD))
            self.calls.append(("gather" if "gather" in name else "scatter", ranks, self.phase, zero))
            return fn(*args, group=group, **kwargs)
        return counted


def _counted(modes: dict) -> dict:
    """Each mode's trainer for 2 steps, its collectives counted per step."""
    import pytest as _pytest

    from distattn.train import zero1
    from distattn.train.trainer import Trainer

    out = {}
    with _pytest.MonkeyPatch.context() as mp:
        count = _Count(mp)
        real_clip = zero1.Zero1.clip_grad_norm_

        def clip(self, max_norm):
            count.phase = "clip"
            return real_clip(self, max_norm)
        mp.setattr(zero1.Zero1, "clip_grad_norm_", clip)
        for name, (cfg, bucket) in modes.items():
            mp.setattr(zero1, "BUCKET_ELEMENTS", bucket)
            trainer = Trainer(cfg).setup()
            steps, losses = [], []
            for _ in range(2):
                count.calls, count.phase = [], "forward and backward"
                losses.append(trainer.step()["loss"])
                steps.append(count.calls)
            count.calls, count.phase = [], "close"
            trainer.close()   # (sends and waits for the last step's all-gathers still queued)
            steps[-1] += count.calls
            buckets = len(trainer.optimizer.buckets) if isinstance(trainer.optimizer, zero1.Zero1) else None
            out[name] = (steps, buckets, losses)
    return out


def test_collectives_hsdp_inside_shard_groups_zero1_once_per_bucket(tmp_path):
    base = {**SMALL, "parallel": {**SMALL["parallel"], "scheduler": "zigzag"}}   # two nano-batches
    hsdp = {"dp_mode": "hsdp", "dp_shard": 2}
    modes = {"hsdp": (small_run(base, tmp_path / "h", parallel=hsdp), 40_000_000),
             "hsdp, one nano-batch": (small_run(base, tmp_path / "h1", parallel={**hsdp, "nano_batches": 1}), 40_000_000)}
    for layers in (1, 3):
        modes[f"zero1 {layers}"] = (small_run(base, tmp_path / f"z{layers}", model={"n_layers": layers},
                                              parallel={"dp_mode": "zero1"}), 40_000_000)
    modes["zero1 buckets"] = (small_run(base, tmp_path / "zb", model={"n_layers": 3}, parallel={"dp_mode": "zero1"}),
                              8_000)
    got = run_distributed(_counted, 8, modes, timeout=600)[0]

    steps = got["hsdp"][0]
    gathers = {ranks for step in steps for kind, ranks, _, _ in step if kind == "gather"}
    assert gathers and all(len(r) == 2 and r[0] % 2 == 0 and r[1] == r[0] + 1 for r in gathers), gathers
    # two nano-batches gather each block once per pass, as one does (model.fsdp_once.GatherOnce)
    assert [len(step) for step in steps] == [len(step) for step in got["hsdp, one nano-batch"][0]], got
    for name in ("zero1 1", "zero1 3", "zero1 buckets"):
        steps, buckets, _ = got[name]
        assert (buckets == 1) == (name != "zero1 buckets"), (name, buckets)
        for step in steps:
            mine = [(kind, phase) for kind, ranks, phase, zero in step if zero]
            assert sum(kind == "scatter" for kind, _ in mine) == buckets, (name, mine)
            assert all(ranks == tuple(range(8)) for kind, ranks, _, zero in step if zero)
        # a step's all-gathers go out from its optimizer step (two buckets ahead) and the next forward
        gathers = [phase for step in steps for kind, _, phase, zero in step if zero and kind == "gather"]
        assert len(gathers) == 2 * buckets, (name, gathers)
    # several buckets: each sent by the backward's hooks as its last gradient came, none left for the clip
    steps, buckets, losses = got["zero1 buckets"]
    scatters = [phase for kind, _, phase, zero in steps[1] if zero and kind == "scatter"]
    assert scatters == ["forward and backward"] * buckets, scatters
    # ... and step 1's later buckets are gathered from step 2's forward, behind its earlier blocks
    gathers = [phase for kind, _, phase, zero in steps[1] if zero and kind == "gather"]
    assert gathers.count("forward and backward") == buckets - 2, gathers
    assert losses == pytest.approx(got["zero1 3"][2], rel=1e-6)   # (fp32) the same training in one bucket
