"""Attention sinks (and softcap) in the model and the trainer: the CP model matches the single-rank
model (loss and every gradient, the sinks' included, summed over the ranks as DDP/FSDP do); a short
run trains the sinks under DDP and FSDP2, checkpoints carry them and resume exactly."""

import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist

from distattn.distributed.spawn import run_distributed
from conftest import small_run
from distattn.train.config import ModelConfig, RunConfig, validate
from distattn.train.trainer import run

SMALL = {"model": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128,
                   "attention_sinks": True},
         "data": {"seq_len": 512},
         "parallel": {"dp": 1, "cp": 2},
         "train": {"steps": 4, "warmup_steps": 1, "ckpt_every": 100}}


def _cfg(tmp_path, name: str, **changes) -> RunConfig:
    return small_run(SMALL, tmp_path / name, **changes)


def _model_vs_single_rank(scheduler: str, doc_lens: list[int], softcap) -> dict[str, float]:
    """fp64 model with random sinks: this CP group's loss and gradients summed over the ranks vs the
    same model on one rank (a plan over a one-rank group). Returns the relative errors by name."""
    from distattn import plan as make_plan
    from distattn.planning.labels import next_token_labels
    from distattn.distributed.mesh import ParallelDims
    from distattn.train.model import LocalBatch, Transformer

    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=61,
                      attention_sinks=True, softcap=softcap)
    world, rank = dist.get_world_size(), dist.get_rank()
    dims = ParallelDims(1, world, 2 if scheduler == "usp" else 1)
    cp_mesh = dims.cp_mesh(dims.build("cpu"))
    singles = [dist.new_group([r]) for r in range(world)]  # every rank makes every group
    torch.manual_seed(0)
    model = Transformer(cfg).double()
    with torch.no_grad():
        for layer in model.layers:
            layer.sinks.copy_(torch.randn(cfg.n_heads, dtype=torch.float64))
    tokens = torch.randint(0, cfg.vocab_size, (sum(doc_lens),))
    labels = next_token_labels(tokens, doc_lens)
    results = []
    for mesh, opts in ((singles[rank], {}), (cp_mesh, {"num_kv_heads": 2} if scheduler == "usp" else {})):
        plan = make_plan(doc_lens, mesh, scheduler=scheduler, backend="reference", **opts)
        model.zero_grad(set_to_none=True)
        loss = model(LocalBatch.one(plan.shard(tokens), plan.position_ids(), plan, plan.shard(labels)), loss_chunk=37)
        loss.backward()
        got = {"loss": loss.detach().reshape(1), **{n: p.grad.clone() for n, p in model.named_parameters()}}
        if mesh is cp_mesh:
            for t in got.values():
                dist.all_reduce(t)  # DDP/FSDP sum (then average) every replicated parameter's gradient
        results.append(got)
    single, cp = results
    errs = {n: float((cp[n] - single[n]).abs().max() / single[n].abs().max()) for n in single}
    assert all(single[n].abs().max() > 0 for n in single if n.endswith("sinks"))
    return errs


@pytest.mark.parametrize("scheduler,world,softcap", [("zigzag", 2, None), ("cad", 3, 3.0), ("usp", 4, None),
                                                     ("ulysses", 2, 3.0), ("allgather", 3, None)])
def test_cp_model_matches_single_rank(scheduler, world, softcap):
    for errs in run_distributed(_model_vs_single_rank, world, scheduler, [40, 17, 3, 64, 1], softcap, timeout=300):
        assert set(errs) >= {"loss", "layers.0.sinks", "layers.1.sinks"}
        assert max(errs.values()) < 1e-10, errs


def _sinks_of(ckpt) -> np.ndarray:
    """The layers' sinks as saved in a trainer checkpoint (read without a process group)."""
    import torch.distributed.checkpoint as dcp

    from distattn.train.checkpoint.dcp_safe import SafeLoadPlanner, SafeReader

    state = {"model": {f"layers.{i}.sinks": torch.zeros(SMALL["model"]["n_heads"]) for i in range(2)}}
    dcp.load(state, storage_reader=SafeReader(str(ckpt)), planner=SafeLoadPlanner(ckpt), no_dist=True)
    return torch.stack(list(state["model"].values())).numpy()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # _sinks_of reads in this process
def test_training_moves_the_sinks_ddp_fsdp_and_resume(tmp_path):
    """dp 2 x cp 2 (zigzag), DDP and FSDP2: the same losses, the loss goes down, the sinks leave their
    zero init (identically under both: each rank's share, reduced like any parameter's gradient);
    a run stopped at step 2 and resumed gives the uninterrupted run's losses."""
    par = {"dp": 2, "cp": 2, "scheduler": "zigzag"}
    runs = {}
    for mode in ("ddp", "fsdp"):
        cfg = _cfg(tmp_path, mode, parallel={**par, "dp_mode": mode}, train={"ckpt_every": 2})
        runs[mode] = [m["loss"] for m in run(cfg)]
    assert runs["ddp"][-1] < runs["ddp"][0], runs
    assert np.allclose(runs["ddp"], runs["fsdp"], rtol=1e-4), runs
    sinks = {mode: _sinks_of(tmp_path / mode / "ckpt" / "step_4") for mode in runs}
    assert np.abs(sinks["ddp"]).min() > 0, sinks
    assert np.allclose(sinks["ddp"], sinks["fsdp"], rtol=1e-3, atol=1e-6), sinks
    assert not np.allclose(_sinks_of(tmp_path / "ddp" / "ckpt" / "step_2"), sinks["ddp"])
    cfg = _cfg(tmp_path, "fsdp", parallel={**par, "dp_mode": "fsdp"}, train={"ckpt_every": 2})
    shutil.rmtree(tmp_path / "fsdp" / "ckpt" / "step_4")
    resumed = [m["loss"] for m in run(cfg, resume=True)]
    assert resumed == runs["fsdp"][2:], (resumed, runs["fsdp"])
    assert np.array_equal(_sinks_of(tmp_path / "fsdp" / "ckpt" / "step_4"), sinks["fsdp"])


def test_config_keys():
    assert not ModelConfig().attention_sinks and ModelConfig().softcap is None
    cfg = validate(RunConfig().replace(model={"softcap": 30}))
    assert cfg.model.softcap == 30.0 and isinstance(cfg.model.softcap, float)
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="model.softcap"):
            validate(RunConfig().replace(model={"softcap": bad}))
    with pytest.raises(ValueError, match="model.attention_sinks"):
        validate(RunConfig().replace(model={"attention_sinks": "yes"}))
    from distattn.train.model.transformer import Transformer

    names = [n for n, _ in Transformer(ModelConfig(n_layers=2, attention_sinks=True)).named_parameters()]
    assert [n for n in names if "sinks" in n] == ["layers.0.sinks", "layers.1.sinks"]
    assert not any("sinks" in n for n, _ in Transformer(ModelConfig(n_layers=2)).named_parameters())
