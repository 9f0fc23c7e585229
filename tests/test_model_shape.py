"""One description of a model (``distattn.costmodel.model_shape``): the trainer and the simulator count the same
model the same way -- parameters, MFU's model FLOPs and its denominator, the GPUs' peaks."""

from pathlib import Path

import pytest
import torch

from distattn.costmodel.cost import attention_flops
from distattn.planning.masks import mask_area
from distattn.costmodel.model_shape import GPUS, MODELS, gpu_named
from distattn.costmodel.network import default_profile
from distattn.sim.simulate import SimConfig, simulate
from distattn.train.config import load_config
from distattn.train.preflight.memory import estimate
from distattn.train.metrics import device_peak_flops

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_8b_config_is_the_simulators_8b():
    shape = load_config(ROOT / "configs/llama3-8b-128k-64gpu.yaml").model.shape
    preset = MODELS["llama3-8b"]
    for count in ("layer_matmul_params", "block_params", "root_params", "params", "matmul_params"):
        assert getattr(shape, count) == getattr(preset, count), count
    assert preset.layer_matmul_params == 218_103_808 and preset.params == 8_030_261_248


def test_the_memory_estimate_counts_the_same_parameters():
    cfg = load_config(ROOT / "configs/llama3-8b-128k-64gpu.yaml")
    assert estimate(cfg, "cuda").params == MODELS["llama3-8b"].params


@pytest.mark.parametrize("name,gpu", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100-pcie"),
                                      ("NVIDIA H200", "h200"), ("NVIDIA GH200 480GB", "gh200"),
                                      ("NVIDIA A100-SXM4-80GB", "a100"), ("AMD Instinct MI300X", "mi300x")])
def test_one_gpu_table_for_device_names_and_the_simulator(name, gpu):
    assert gpu_named(name) is GPUS[gpu]


def test_the_trainers_peak_is_the_tables():
    assert device_peak_flops(torch.device("cpu")) is None
    assert device_peak_flops(torch.device("cpu"), 123.0) == 123e12
    assert gpu_named("NVIDIA Quadro P1000") is None


def test_the_simulators_mfu_is_the_trainers():
    """Same model FLOPs (6 N per token, N without the embedding lookup, plus 3x the forward attention
    over the mask area) over the same denominator (step time x GPUs x the GPU's peak)."""
    model, docs = MODELS["llama3-8b"], [6000, 2192]
    cfg = SimConfig(model, 2, 8192, 2, gpu=GPUS["h200"])
    (row,) = simulate(cfg, default_profile(), ["ring"], replica_docs=[docs])
    area = float(mask_area(docs, docs, True, None).sum())
    flops = model.model_flops(8192, float(attention_flops(area, model.n_heads, model.head_dim)))
    assert row["mfu"] == pytest.approx(flops / (row["step_time_s"] * 2 * GPUS["h200"].peak_tflops * 1e12), rel=1e-9)
