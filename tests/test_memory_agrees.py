"""``distattn simulate`` and ``distattn train --dry-run`` describe the same job alike: the per-GPU memory
(one estimator, :mod:`distattn.sim.memory_model`), the parameter count and MFU's denominator (the model's
FLOPs per token and the GPU's peak) -- Llama-3 8B at 128K tokens on 64 GPUs (the shipped config) and
at 4M tokens on 8."""

import json
import re
from pathlib import Path

import pytest
import torch

from distattn.cli import main as cli_main
from distattn.costmodel.cost import attention_flops
from distattn.planning.masks import mask_area
from distattn.costmodel.model_shape import GPUS, MODELS
from distattn.costmodel.network import default_profile
from distattn.sim.simulate import SimConfig, simulate
from distattn.train.preflight import memory
from distattn.train.config import load_config
from distattn.train.metrics import device_peak_flops

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "llama3-8b-128k-64gpu.yaml"
DEVICE_NAMES = {"h100": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200"}
FOUR_M = {"data.seq_len": 4 << 20, "parallel.dp": 1, "parallel.cp": 8}
# (GPU, overrides of the shipped config): as shipped (cad pooled over 8 replicas, FSDP, bf16, full
# checkpointing) but with stream packing, whose sequences are seq_len long as the simulator's (dp 8's
# default, balanced packing, estimates at data.token_cap); 4M tokens as shipped otherwise (does not
# fit); 4M with usp, offloaded block inputs and a tiled MLP (fits an H200; `distattn simulate` has no
# flags for these: its SimConfig fields)
JOBS = {"128k-64gpu": ("h100", {"data.packing": "stream"}), "4m-8gpu": ("h100", FOUR_M),
        "4m-8gpu-offload": ("h200", {**FOUR_M, "parallel.scheduler": "usp",
                                     "train.activation_checkpointing": "offload", "train.mlp_chunk": 4096})}


def _dry_run(capsys, gpu: str, overrides: dict) -> tuple[int, str]:
    """``distattn train CONFIG KEY=VALUE... --dry-run`` for one GPU of ``gpu``'s memory: (exit code, output)."""
    code = cli_main(["train", str(CONFIG), *(f"{k}={v}" for k, v in overrides.items()), "--dry-run",
                     "--estimate-for", "gpu", "--gpu-memory-gib", f"{GPUS[gpu].memory_gib:g}"])
    return code, capsys.readouterr().out


def _simulated(capsys, tmp_path, gpu: str, cfg) -> dict:
    """The simulator's row for ``cfg``'s job, one document per sequence: ``distattn simulate --json``
    where its flags say the job, else :func:`distattn.sim.simulate.simulate`."""
    m, p, t, seq = MODELS["llama3-8b"], cfg.parallel, cfg.train, cfg.data.seq_len
    if (t.activation_checkpointing, t.mlp_chunk) == ("full", 0):
        (tmp_path / "docs.json").write_text(json.dumps([seq]))
        assert cli_main(["simulate", "--gpus", str(cfg.world_size), "--seq-len", str(seq), "--model", m.name,
                         "--cp", str(p.cp), "--gpu", gpu, "--schedulers", p.scheduler, "--checkpointing", "full",
                         "--packing", "stream", "--draws", "1", "--doclens", str(tmp_path / "docs.json"), "--json"]) == 0
        (row,) = json.loads(capsys.readouterr().out)["results"]
        return row
    sim = SimConfig(m, cfg.world_size, seq, p.cp, gpu=GPUS[gpu], activation_checkpointing=t.activation_checkpointing,
                    mlp_chunk=t.mlp_chunk, packing="stream")
    (row,) = simulate(sim, default_profile(), [p.scheduler], replica_docs=[[seq]] * p.dp)
    return row


@pytest.mark.parametrize("job", list(JOBS))
def test_simulate_and_the_dry_run_agree(job, capsys, tmp_path, monkeypatch):
    gpu, overrides = JOBS[job]
    cfg = load_config(CONFIG, [f"{k}={v}" for k, v in overrides.items()])
    code, text = _dry_run(capsys, gpu, overrides)
    row = _simulated(capsys, tmp_path, gpu, cfg)
    assert (row["gpus"], row["cp"], row["seq_len"]) == (cfg.world_size, cfg.parallel.cp, cfg.data.seq_len)

    # cad's servers: the dry run's parallel.cad_backward (auto) is the simulator's
    backward = memory.cad_backward(cfg, "cuda", int(GPUS[gpu].memory_gib * memory.GIB))
    assert row.get("cad_backward") == backward
    if backward is not None:
        assert f", backward {backward} (cad_backward: auto)" in text
    # per-GPU memory: the dry run's estimate, printed to 0.01 GiB, and whether it fits
    est = memory.estimate(cfg, "cuda", cad_backward=backward)
    assert row["memory_gb"] == est.total / memory.GIB
    (fits, printed), = re.findall(r"^(fits|does NOT fit): ([\d,.]+) GiB per GPU", text, re.MULTILINE)
    assert printed == f"{row['memory_gb']:,.2f}"
    assert (fits == "fits", code == 0) == (row["fits_memory"],) * 2

    # the parameter count
    assert row["params"] == est.params == cfg.model.shape.params
    assert f"model: {row['params'] / 1e9:,.2f} B parameters" in text

    # MFU: the trainer's, for a step of the simulated time -- its model FLOPs (6 N per token and the
    # forward attention over one document per sequence) over its peak for the GPU's name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: DEVICE_NAMES[gpu])
    peak = device_peak_flops(torch.device("cuda"), cfg.train.peak_tflops)
    m, seq, dp = cfg.model, cfg.data.seq_len, cfg.parallel.dp
    area = float(mask_area([seq], [seq], True, None).sum())
    flops = m.shape.model_flops(dp * seq, dp * float(attention_flops(area, m.n_heads, m.dim // m.n_heads)))
    assert row["mfu"] == pytest.approx(flops / (row["step_time_s"] * cfg.world_size * peak), rel=1e-9)


def test_the_simulators_memory_follows_its_job():
    """The sim's column moves with what the estimate counts: GiB that grow with the sequence, shrink
    with checkpointing, and ``fits_memory`` against the GPU's GiB."""
    model, net = MODELS["llama3-8b"], default_profile()

    def row(**kw):
        kw.setdefault("activation_checkpointing", "full")
        return simulate(SimConfig(model, 8, kw.pop("seq_len", 65536), 8, **kw), net, ["zigzag"])[0]

    full, none = row(), row(activation_checkpointing="none")
    assert 0 < full["memory_gb"] < row(seq_len=131072)["memory_gb"] and full["memory_gb"] < none["memory_gb"]
    assert full["fits_memory"] and not row(seq_len=1 << 22)["fits_memory"]
    assert row(elem_bytes=4)["memory_gb"] > full["memory_gb"]
    with pytest.raises(ValueError, match="elem_bytes"):
        row(elem_bytes=1)
