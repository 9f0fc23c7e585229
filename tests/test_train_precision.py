"""Issue 19's trainer: activation checkpointing is exact, bf16 tracks fp32 and resumes exactly, the
metrics a pretraining team reads are there (MFU, tokens/s/device, peak memory, comm wait)."""

import json
import shutil

import numpy as np
import pytest
import torch

from distattn.distributed.spawn import run_distributed
from conftest import small_run
from distattn.train.config import ModelConfig, RunConfig
from distattn.train.metrics import RunLog
from distattn.train.ranks import process_group_backend
from distattn.train.trainer import run

SMALL = {"model": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128},
         "data": {"seq_len": 1024},
         "parallel": {"dp": 1, "cp": 2},
         "train": {"steps": 4, "warmup_steps": 1, "ckpt_every": 100}}


def _cfg(tmp_path, name: str, **changes) -> RunConfig:
    return small_run(SMALL, tmp_path / name, **changes)


def _grads_by_checkpointing(scheduler: str, doc_lens: list[int]) -> dict:
    """fp64 model on this rank's shard: loss and every parameter gradient, per checkpointing mode."""
    import torch.distributed as dist

    from distattn import plan as make_plan
    from distattn.planning.labels import next_token_labels
    from distattn.distributed.mesh import ParallelDims
    from distattn.train.model import LocalBatch, Transformer

    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=61)
    world = dist.get_world_size()
    dims = ParallelDims(1, world, 2 if scheduler == "usp" else 1)
    cp_mesh = dims.cp_mesh(dims.build("cpu"))
    torch.manual_seed(0)
    model = Transformer(cfg).double()
    tokens = torch.randint(0, cfg.vocab_size, (sum(doc_lens),))
    labels = next_token_labels(tokens, doc_lens)
    options = {"num_kv_heads": 2} if scheduler == "usp" else {}
    plan = make_plan(doc_lens, cp_mesh, scheduler=scheduler, **options)
    out = {}
    for mode, mlp_chunk in (("none", 0), ("full", 0), ("selective", 0), ("offload", 0), ("none", 29), ("full", 29),
                            ("offload", 29)):
        model.zero_grad(set_to_none=True)
        loss = model(LocalBatch.one(plan.shard(tokens), plan.position_ids(), plan, plan.shard(labels)),
                     checkpointing=mode, loss_chunk=37, mlp_chunk=mlp_chunk)
        loss.backward()
        out[mode + (f"+mlp_chunk {mlp_chunk}" if mlp_chunk else "")] = \
            [loss.item()] + [p.grad.clone() for p in model.parameters()]
    return out


@pytest.mark.parametrize("scheduler,world", [("zigzag", 2), ("cad", 3), ("ulysses", 2), ("usp", 4)])
def test_activation_checkpointing_is_exact(scheduler, world):
    """fp64: full, selective and offload checkpointing, and the MLP 29 tokens at a time (a rank's
    shard is not a multiple of it), give the loss and gradients of no checkpointing (the recomputed
    blocks rerun the same ops: equal to 1e-12), with the distributed attention rerun (full,
    offload: on inputs that went to host memory and came back) or kept (selective)."""
    results = run_distributed(_grads_by_checkpointing, world, scheduler, [300, 17, 211, 64], timeout=300)
    for per_mode in results:
        base = per_mode["none"]
        assert set(per_mode) == {"none", "full", "selective", "offload", "none+mlp_chunk 29", "full+mlp_chunk 29",
                                 "offload+mlp_chunk 29"}
        for mode in set(per_mode) - {"none"}:
            assert abs(per_mode[mode][0] - base[0]) <= 1e-12 * abs(base[0]), (mode, per_mode[mode][0], base[0])
            for got, want in zip(per_mode[mode][1:], base[1:]):
                assert torch.allclose(got, want, rtol=1e-12, atol=1e-14), mode


def _losses(history) -> list[float]:
    return [m["loss"] for m in history]


def test_bf16_tracks_fp32_and_resumes_exactly(tmp_path):
    """The DDP (autocast) and FSDP2 (MixedPrecisionPolicy) bf16 paths: losses within a few % of fp32
    over 10 steps, with full checkpointing; a bf16 run stopped after 4 steps and resumed gives the
    same losses, bit for bit, as the run that went straight through."""
    steps = {"steps": 10, "activation_checkpointing": "full"}
    fp32 = _losses(run(_cfg(tmp_path, "fp32", train=steps)))
    for mode in ("ddp", "fsdp"):
        bf16 = _losses(run(_cfg(tmp_path, f"bf16-{mode}", train={**steps, "dtype": "bf16"},
                                parallel={"dp_mode": mode})))
        rel = np.abs(np.array(bf16) - np.array(fp32)) / np.array(fp32)
        assert rel.max() < 0.03, (mode, bf16, fp32)
        assert bf16[-1] < bf16[0]
    # the learning-rate schedule depends on train.steps: resume the same 6-step run from its step 3
    cfg = _cfg(tmp_path, "resume", train={"steps": 6, "dtype": "bf16", "ckpt_every": 3}, parallel={"dp_mode": "fsdp"})
    straight = _losses(run(cfg))
    shutil.rmtree(tmp_path / "resume" / "ckpt" / "step_6")
    resumed = _losses(run(cfg, resume=True))
    assert resumed == straight[3:], (resumed, straight)


def test_metrics_of_a_step(tmp_path):
    """metrics.jsonl has MFU (None on CPU unless train.peak_tflops says the peak), tokens/s/device,
    peak memory, the scheduler's communication wait and the attention imbalance."""
    cfg = _cfg(tmp_path, "m", train={"steps": 2, "peak_tflops": 1.0}, parallel={"scheduler": "ring"})
    history = run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for m in rows:
        assert 0 < m["mfu"] < 1 and m["peak_memory_gib"] > 0.1 and m["comm_wait_s"] >= 0
        assert m["tokens_per_s_per_device"] == pytest.approx(m["tokens_per_s"] / 2)
        assert m["flops_imbalance_all"] >= 1
    # the model FLOPs: 6 N per token plus 3x the forward attention over the documents' mask area
    assert history[0]["model_tflops"] * 1e12 > 6 * cfg.model.shape.matmul_params * 1024
    no_peak = run(_cfg(tmp_path, "n", train={"steps": 1}))
    assert no_peak[0]["mfu"] is None


def test_model_flops_counts_attention_by_mask_area():
    m = ModelConfig()
    shape = m.shape
    assert shape.model_flops(100, 0.0) == 6 * shape.matmul_params * 100
    assert shape.model_flops(100, 1e9) - shape.model_flops(100, 0.0) == pytest.approx(3 * m.n_layers * 1e9)


def test_progress_bar_and_log_lines(tmp_path, capsys):
    """A terminal gets a tqdm bar that moves every step; a log file gets one line per logged step."""
    row = {"step": 1, "loss": 2.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 10.0,
           "tokens_per_s_per_device": 5.0, "step_time_s": 0.1, "mfu": None, "model_tflops": 1.0,
           "peak_memory_gib": 1.0, "comm_wait_s": 0.01, "flops_imbalance": 1.0, "flops_imbalance_all": 1.0}
    log = RunLog(tmp_path / "bar", steps=3, done=0, bar=True)
    log.step(row, record=True)
    log.step({**row, "step": 2}, record=False)
    log.close()
    err_out = capsys.readouterr()
    assert "2/3" in err_out.out and "mfu n/a" in err_out.out
    lines = (tmp_path / "bar" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1]
    plain = RunLog(tmp_path / "plain", steps=3, done=0, bar=False)
    plain.step(row, record=True)
    plain.step({**row, "step": 2}, record=False)
    plain.close()
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and printed[0].startswith("step     1/3") and "comm 0.010 s" in printed[0]


def test_cpu_offload_trains_as_fsdp_and_resumes(tmp_path):
    """``parallel.cpu_offload`` (FSDP2's CPUOffloadPolicy; on CPU ranks the same code path with the
    shards where they are): on one rank (FSDP2 of one) and on two, the losses and gradient norms of
    the run without it, bit for bit; stopped after 2 of 3 steps and resumed, the same last step."""
    for cp in (1, 2):
        runs = {}
        for off in (False, True):
            cfg = _cfg(tmp_path, f"cp{cp}-{off}", parallel={"cp": cp, "dp_mode": "fsdp", "cpu_offload": off},
                       train={"steps": 3, "ckpt_every": 2})
            runs[off] = [(m["loss"], m["grad_norm"]) for m in run(cfg)]
        assert runs[True] == runs[False], (cp, runs)
    shutil.rmtree(tmp_path / "cp2-True" / "ckpt" / "step_3")
    resumed = [(m["loss"], m["grad_norm"]) for m in run(cfg, resume=True)]
    assert resumed == runs[True][2:], (resumed, runs[True])
    with pytest.raises(ValueError, match="cpu_offload.*dp_mode: fsdp"):
        _cfg(tmp_path, "ddp", parallel={"cpu_offload": True})
    # on GPUs its gradients (and the gradient norm's all-reduce) are in host memory: gloo beside nccl
    assert process_group_backend(cfg, cuda=True) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(_cfg(tmp_path, "plain"), cuda=True) == "nccl"
    assert process_group_backend(cfg, cuda=False) == "gloo"
