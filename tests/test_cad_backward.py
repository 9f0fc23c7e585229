"""``cad``'s attention servers keep nothing they received (``backward="resend"``, DistCA's) or keep it
(``"keep"``): the same numbers either way -- the backward hands the workers the very rows they would
have kept -- in the trainer (8 gloo ranks, 2 replicas pooled, rows relayed between nodes of 2 ranks,
ping-pong, FSDP2, selective checkpointing, 3 steps with a resume), and in fp64 over a model's step;
``parallel.cad_backward: auto`` keeps where the memory estimate fits; what each keeps, per the model."""

from dataclasses import replace
from unittest import mock

import numpy as np
import pytest
import torch

import distattn
from distattn.costmodel.network import default_profile
from distattn.planning.schedule import AttnShape
from distattn.distributed.spawn import run_distributed
from distattn.train.config import RunConfig, validate

MODEL = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64}


def _cfg(out: str, backward: str, steps: int, **train) -> RunConfig:
    return validate(RunConfig().replace(
        model=MODEL, data={"seq_len": 2048},
        parallel={"dp": 2, "cp": 4, "scheduler": "cad", "dp_mode": "fsdp", "cad_backward": backward, "nano_batches": 2},
        train={"steps": steps, "lr_decay_steps": 3, "warmup_steps": 1, "ckpt_every": 2, "log_every": 100,
               "activation_checkpointing": "selective", "out": out, **train}))


def _trainer_worker(out: str):
    """Per mode, in fp64 (the trainer's fp32 model made with fp64 as torch's default dtype): the losses
    and gradient norms of 3 steps (resend: 2 steps, then a resume for the third), the final weights, and
    the most hops a plan's rows took."""
    from distattn.runtime.plan_cache import PlanCache
    from distattn.train.trainer import Trainer

    torch.set_default_dtype(torch.float64)

    hops, real_plan = [], PlanCache.plan

    def plan(cache, *args, **kwargs):
        p = real_plan(cache, *args, **kwargs)
        hops.append(max(p.schedule.hops))
        return p
    nodes_of_two = replace(default_profile(), gpus_per_node=2)   # 4 nodes: rows relayed (group-cast)
    got = {}
    with mock.patch("distattn.schedulers.cad.scheduler.default_profile", lambda: nodes_of_two), \
            mock.patch.object(PlanCache, "plan", plan):
        for backward in ("keep", "resend"):
            if backward == "resend":
                history = Trainer(_cfg(f"{out}/{backward}", backward, 2), progress="none").run()
                trainer = Trainer(_cfg(f"{out}/{backward}", backward, 3), resume=True, progress="none")
            else:
                trainer, history = Trainer(_cfg(f"{out}/{backward}", backward, 3), progress="none"), []
            history = history + trainer.run()
            weights = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
                       for p in trainer.model.parameters()]
            got[backward] = ([(m["step"], m["loss"], m["grad_norm"]) for m in history], weights,
                             trainer.cad_backward)
    return got, max(hops)


def test_resend_equals_keep_in_the_trainer(tmp_path):
    """fp64: losses, gradient norms and weights within 1e-12. (Each mode's placement prices rows at its
    own bytes, so the two may place a task differently and add a sum in another order: equal to
    rounding, not bit for bit.) An error in what the workers get would move the loss at once."""
    for got, hops in run_distributed(_trainer_worker, 8, str(tmp_path), timeout=600):
        assert hops > 1   # relays: rows crossed nodes through a node peer
        keep, resend = got["keep"], got["resend"]
        assert (keep[2], resend[2]) == ("keep", "resend")
        assert [s for s, _, _ in resend[0]] == [1, 2, 3]
        np.testing.assert_allclose([m[1:] for m in resend[0]], [m[1:] for m in keep[0]], rtol=1e-12, atol=0)
        for a, b in zip(keep[1], resend[1], strict=True):
            assert a.dtype == torch.float64
            assert (a - b).abs().max() <= 1e-12 * a.abs().max()


def _fp64_worker(backward_modes):
    """fp64: a model's step (3 layers, ping-pong, sinks) per mode: loss and every gradient."""
    import torch.distributed as dist

    from distattn.train.config import ModelConfig
    from distattn.train.model import LocalBatch
    from distattn.train.model.transformer import Transformer
    from distattn.train.plan_ahead import agreed_nano_batches

    docs = [300, 17, 211, 64, 150, 9]
    cfg = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=61, attention_sinks=True)
    torch.manual_seed(0)
    model = Transformer(cfg).double()
    tokens = torch.randint(0, cfg.vocab_size, (sum(docs),), generator=torch.Generator().manual_seed(1))
    parts = agreed_nano_batches(docs, 2, 0.0, False, "cpu")
    net = replace(default_profile(), gpus_per_node=2)
    out = {}
    for backward in backward_modes:
        plans = [distattn.plan(d, dist.group.WORLD, scheduler="cad", backend="reference", backward=backward,
                               network=net, epsilon=0.01) for d, _, _ in parts]
        model.zero_grad(set_to_none=True)
        loss = model(LocalBatch.shard(tokens, docs, parts, plans), checkpointing="selective", loss_chunk=37)
        loss.backward()
        out[backward] = (loss.item(), [p.grad.clone() for p in model.parameters()])
    return out


def test_resend_equals_keep_in_fp64():
    """fp64, relays and ping-pong: within 1e-12 (measured: bit for bit)."""
    for out in run_distributed(_fp64_worker, 4, ("keep", "resend"), timeout=300):
        (loss_k, grads_k), (loss_r, grads_r) = out["keep"], out["resend"]
        assert abs(loss_r - loss_k) <= 1e-12 * abs(loss_k)
        for a, b in zip(grads_k, grads_r, strict=True):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)


def test_what_each_keeps():
    """resend keeps a rank's own q, k, v, out and lse (what zigzag keeps); keep the worker's rows,
    several ranks' worth where one long document's tasks spread; dout counts in the backward's buffers,
    not in what is kept."""
    docs = [6000, 500, 300, 200, 100, 92]
    shape = AttnShape(32, 8, 128, 2)
    zig = distattn.plan(docs, 8, scheduler="zigzag").schedule.saved_bytes(shape)
    resend = distattn.plan(docs, 8, scheduler="cad", backward="resend").schedule
    keep = distattn.plan(docs, 8, scheduler="cad", backward="keep").schedule
    assert resend.saved_bytes(shape).max() == zig.max()
    assert keep.saved_bytes(shape).max() > 1.2 * zig.max()
    assert resend.keeps_local_out and not keep.keeps_local_out
    q_rows, _ = keep._received_rows()
    dout = q_rows * shape.row_bytes(shape.num_heads)
    assert np.all(keep.buffer_bytes(shape) >= dout) and np.all(resend.buffer_bytes(shape) > keep.buffer_bytes(shape))
    with pytest.raises(ValueError, match="backward must be one of 'resend', 'keep'"):
        distattn.plan(docs, 8, scheduler="cad", backward="auto")
    with pytest.raises(ValueError, match=r"unexpected option\(s\) \['backward'\] for scheduler='zigzag'"):
        distattn.plan(docs, 8, scheduler="zigzag", backward="keep")


def test_auto_keeps_where_it_fits():
    from distattn.train.preflight import memory

    cfg = validate(RunConfig().replace(parallel={"dp": 1, "cp": 4, "scheduler": "cad"}))
    assert cfg.parallel.cad_backward == "auto"
    keep = memory.estimate(cfg, "cpu", cad_backward="keep").total
    assert memory.cad_backward(cfg, "cpu", keep) == "keep"
    assert memory.cad_backward(cfg, "cpu", keep - 1) == "resend"
    assert memory.cad_backward(cfg, "cpu", None) == "resend"
    assert memory.cad_backward(cfg.replace(parallel={"cad_backward": "keep"}), "cpu", 1) == "keep"
    assert memory.cad_backward(cfg.replace(parallel={"scheduler": "zigzag"}), "cpu", keep) is None
    with pytest.raises(ValueError, match="parallel.cad_backward must be resend, keep or auto"):
        validate(cfg.replace(parallel={"cad_backward": "sometimes"}))
