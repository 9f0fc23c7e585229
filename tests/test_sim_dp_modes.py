"""Issue 78: the simulator prices each data-parallel mode (``parallel.dp_mode``) on the links it crosses,
``--sweep`` tries them, and ``--auto`` recommends a config ``distattn train`` accepts. Small clusters:
seconds each, but the end-to-end one (an --auto query, then the trainer's --dry-run on its config)."""

import json
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from distattn.costmodel.model_shape import MODELS
from distattn.costmodel.network import default_profile
from distattn.planning.program import CHAIN, START, WAIT
from distattn.sim import micro, sweep
from distattn.sim.dp import ZERO1_BUCKET_PARAMS, ZERO1_IN_FLIGHT, buckets, dp_seconds, parameters
from distattn.sim.job import Links, attention_kernel
from distattn.sim.simulate import SimConfig, simulate
from distattn.sim.step import step_ops
from distattn.sim.workload import draw_chunks

M8B = MODELS["llama3-8b"]
REPO = Path(__file__).resolve().parents[1]


def _ops(cfg: SimConfig, micro_batches: int = 1, name: str = "zigzag", layers: int | None = None) -> list:
    """One step's operations of ``cfg`` (its checkpointing) with ``micro_batches`` micro-batches alike."""
    links = Links.of(default_profile(), cfg.gpus_per_node, cfg.tp)
    chunks = draw_chunks(cfg.dp, cfg.seq_len, None, 1)
    mb = micro.micro_batch(cfg, name, chunks, attention_kernel(cfg), links)["micro"]
    return step_ops([mb] * micro_batches, layers or cfg.model.n_layers, cfg.activation_checkpointing, cfg.ranks,
                    dp_seconds(cfg, links.cp))


def _starts(ops, tag: str) -> list:
    return [op for op in ops if op.op in (START, CHAIN) and op.key is not None and tag in op.key]


def test_rows_name_their_mode_and_what_its_transfers_add():
    cfg = SimConfig(M8B, 16, 65536, 8, activation_checkpointing="full")
    for mode, shard, named in (("ddp", None, None), ("fsdp", None, None), ("zero1", None, None), ("hsdp", None, 8),
                               ("hsdp", 4, 4)):
        r = simulate(replace(cfg, dp_mode=mode, dp_shard=shard), default_profile(), ["zigzag"])[0]
        assert (r["dp_mode"], r["dp_shard"]) == (mode, named)
        assert 0 <= r["dp_exposed_s"] <= r["exposed_comm_s"] + 1e-9 and r["dp_exposed_s"] < r["step_time_s"]
    # the data-parallel transfers left out (a step of attention's alone): nothing they add
    alone = simulate(replace(cfg, dp_transfers=False), default_profile(), ["zigzag"])[0]
    assert alone["dp_exposed_s"] == 0 and alone["step_time_s"] <= r["step_time_s"]
    # one rank: nothing to reduce
    one = simulate(SimConfig(M8B, 1, 8192, 1, activation_checkpointing="full"), default_profile(), ["zigzag"])[0]
    assert one["dp_exposed_s"] == 0
    with pytest.raises(ValueError, match="--dp-shard is the ranks sharding each block under --dp-mode hsdp"):
        replace(cfg, dp_shard=8).check()
    with pytest.raises(ValueError, match="--dp-shard 3 must divide the dp x cp = 16 ranks"):
        replace(cfg, dp_mode="hsdp", dp_shard=3).check()
    # the sweep's modes: hsdp over half a node, a node, two nodes -- fewer than every rank (that is fsdp)
    assert sweep.dp_modes(SimConfig(M8B, 512, 524288, 32)) == [("ddp", None), ("fsdp", None), ("zero1", None),
                                                                ("hsdp", 4), ("hsdp", 8), ("hsdp", 16)]
    assert sweep.dp_modes(SimConfig(M8B, 8, 65536, 8))[3:] == [("hsdp", 4)]


def test_hsdp_gathers_inside_a_node_on_nvlink_and_reduces_across_replicas_on_the_nic():
    links = Links.of(default_profile(), 8, 1)
    cfg = SimConfig(M8B, 64, 65536, 8, dp_mode="hsdp", activation_checkpointing="none")
    dp = dp_seconds(cfg, links.cp)
    block = M8B.block_params
    assert (dp.gather.link, dp.gather.span, dp.reduce.link, dp.reduce.span) == ("nvlink", 8, "nvlink", 8)
    assert dp.gather.seconds[0] == pytest.approx(float(links.cp.time("all_gather", 8, block * 2)))
    assert dp.reduce.seconds[0] == pytest.approx(float(links.cp.time("reduce_scatter", 8, block * 4)))
    # each block's fp32 shard all-reduced over the 8 replicas, one rank of each node
    assert (dp.replicate.link, dp.replicate.span) == ("nic", None)
    assert dp.replicate.seconds[0] == pytest.approx(float(links.cp.time("all_reduce", 8, block * 4 / 8, 8)))
    # fsdp: every rank's, over the NIC -- slower gathers than a node's
    fsdp = dp_seconds(replace(cfg, dp_mode="fsdp"), links.cp)
    assert fsdp.gather.link == "nic" and fsdp.gather.seconds[0] > dp.gather.seconds[0]
    # two nodes' shard: its gathers cross the NIC
    assert dp_seconds(replace(cfg, dp_shard=16), links.cp).gather.link == "nic"
    # in the step: each gather on NVLink, each reduce-scatter chained to its all-reduce on the NIC
    ops = _ops(replace(cfg, seq_len=16384), layers=4)
    gathers = _starts(ops, "agf") + _starts(ops, "agb")
    assert len(gathers) == 2 * 4 and {op.link for op in gathers} == {"nvlink"} and {op.span for op in gathers} == {8}
    chained = [op for op in ops if op.op == CHAIN and op.dp]
    assert len(chained) == 4 + 1 and {op.link for op in chained} == {"nic"}   # every block, and the root
    assert all(op.after[-1] != "ar" and op.key == (*op.after, "ar") for op in chained)


def test_zero1_reduces_and_gathers_each_bucket_once_a_step():
    cfg = SimConfig(M8B, 16, 32768, 8, dp_mode="zero1", activation_checkpointing="selective", nano_batches=2)
    fills, _ = buckets(parameters(M8B), ZERO1_BUCKET_PARAMS)
    count = sum(len(f) for f in fills)
    assert sum(p for f in fills for p in f) == M8B.params and count > 4 * M8B.n_layers   # an MLP matrix: one
    for micro_batches in (1, 2):
        for at in (cfg, replace(cfg, nano_batches=1), replace(cfg, activation_checkpointing="full")):
            ops = _ops(at, micro_batches)
            reduces, gathers = _starts(ops, "rs-bucket"), _starts(ops, "ag-bucket")
            assert len(reduces) == len(gathers) == count                   # once per bucket per step
            assert len({op.key for op in reduces}) == len({op.key for op in gathers}) == count
            assert {op.link for op in reduces + gathers} == {"nic"} and {op.span for op in reduces} == {cfg.ranks}
            # two gathers sent before the step (the optimizer step before it), in forward order, each
            # waited for once; the backward and the forward hold at most ZERO1_IN_FLIGHT of each in flight
            first_run = next(i for i, op in enumerate(ops) if op.op != START)
            assert [op.key for op in ops[:first_run]] == [("ag-bucket", k) for k in range(ZERO1_IN_FLIGHT)]
            assert [op.key for op in gathers] == [("ag-bucket", k) for k in range(count)]
            waits = [op.key for op in ops if op.op == WAIT and op.key[0] == "ag-bucket"]
            assert waits == [("ag-bucket", k) for k in range(count)]
            assert ops.index(next(op for op in ops if op.key == ("ag-bucket", count - 1) and op.op == WAIT)) < \
                ops.index(next(op for op in ops if op.key is not None and op.key[0] == "rs-bucket"))
            for kind in ("rs-bucket", "ag-bucket"):
                flight = 0
                for op in ops:
                    if op.key is not None and op.key[0] == kind:
                        flight += 1 if op.op == START else -1
                        assert flight <= ZERO1_IN_FLIGHT
    # ddp: one all-reduce per 25 MB bucket a step, in the last micro-batch's backward
    ddp = _starts(_ops(replace(cfg, dp_mode="ddp"), 2), "ar-bucket")
    assert len(ddp) == sum(len(f) for f in buckets(parameters(M8B), 25 * 2**20 / 4)[0])


def test_zero1_buckets_are_the_trainers():
    """The simulator's buckets are the trainer's (distattn.train.zero1: whole parameters, backward order)."""
    torch = pytest.importorskip("torch")
    from distattn.train.config.sections import ModelConfig
    from distattn.train.model.transformer import Transformer
    from distattn.train import zero1

    assert (zero1.BUCKET_ELEMENTS, zero1.IN_FLIGHT) == (ZERO1_BUCKET_PARAMS, ZERO1_IN_FLIGHT)
    mc = ModelConfig(dim=512, n_layers=3, n_heads=8, n_kv_heads=2, ffn_dim=1536, vocab_size=5000, tie_embeddings=False)
    with torch.device("meta"):
        model = Transformer(mc)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for limit in (10**6, 3 * 10**6, 10**9):
        theirs = zero1.Zero1._fill(types.SimpleNamespace(world=1), named[::-1], limit)
        fills, _ = buckets(parameters(mc.shape), limit)
        assert [p for f in fills for p in f] == [sum(s.param.numel() for s in b.slots) for b in theirs]


def test_the_bound_is_at_its_best_mode_and_bounds_every_row():
    cfg = SimConfig(M8B, 8, 16384, 1, batch=8)
    modes = sweep.dp_modes(cfg)
    got = {r["scheduler"]: r for r in sweep.rows(cfg, default_profile(), ["zigzag", "ulysses", "ideal"],
                                                 sweep.pool_batches(None), 1, True, scored=1, modes=modes)}
    ideal = got.pop("ideal")
    assert {(t["dp_mode"], t["dp_shard"]) for t in ideal["sweep"]} == set(modes)
    fastest = min(t["step_time_s"] for t in ideal["sweep"] if t["step_time_s"] is not None)
    assert ideal["step_time_s"] == fastest
    for r in got.values():
        assert ideal["step_time_s"] <= r["step_time_s"] * (1 + 1e-9), r["scheduler"]
        assert {(t["dp_mode"], t["dp_shard"]) for t in r["sweep"]} == set(modes)


def test_auto_recommends_what_the_trainer_runs(monkeypatch):
    cfg = SimConfig(M8B, 8, 4096, 1)

    def fake(at, network, names, batches, draws, sweep_cp):   # wlb the fastest everywhere
        return [{"scheduler": n, "cp": at.cp, "dp": at.dp, "tp": 1, "fits": True, "step_time_s": 1.0,
                 "tokens_per_s_per_gpu": 9.0 if n == "wlb" else 1.0 + (at.dp_mode == "zero1"), "dp_mode": at.dp_mode,
                 "dp_shard": at.dp_shard} for n in names]
    monkeypatch.setattr(sweep, "rows", fake)
    best, rows = sweep.recommend(cfg, None, ["zigzag", "wlb"], modes=sweep.dp_modes(cfg))
    assert best["scheduler"] == "zigzag" and best["dp_mode"] == "zero1"
    assert {r["scheduler"] for r in rows} == {"zigzag", "wlb"}   # wlb stays for comparison
    assert len(rows) == 2 * 4   # one row a scheduler and CP size: its best mode
    with pytest.raises(ValueError, match="'wlb' is not a scheduler distattn train runs"):
        sweep.trainer_config(next(r for r in rows if r["scheduler"] == "wlb"), cfg)


def test_auto_config_is_accepted_by_train_dry_run(tmp_path):
    """A 64-GPU query's recommendation, as `key=value` overrides: the trainer takes it (the tiny config's
    model) and, on the simulated model, agrees that it fits."""
    run = [sys.executable, "-m", "distattn.cli"]
    out = subprocess.run([*run, "simulate", "--gpus", "64", "--seq-len", "16K", "--draws", "1", "--auto", "--json",
                          "--schedulers", "zigzag", "cad", "wlb"],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    for r in got["results"]:
        assert {"dp_mode", "dp_shard", "dp_exposed_s"} <= set(r)
        assert (r["dp_shard"] is None) == (r["dp_mode"] != "hsdp")
    best = got["recommended"]
    config = best["config"]
    assert best["scheduler"] in ("zigzag", "cad") and config["parallel.scheduler"] == best["scheduler"]
    assert config["parallel.dp"] * config["parallel.cp"] == 64 and config["parallel.dp_mode"] == best["dp_mode"]
    words = [f"{k}={v}" for k, v in config.items()]
    for base in ("configs/tiny.yaml", "configs/llama3-8b-128k-64gpu.yaml"):
        dry = subprocess.run([*run, "train", base, *words, f"train.out={tmp_path / 'run'}", "--dry-run"],
                             capture_output=True, text=True, timeout=300, cwd=REPO)
        assert dry.returncode == 0, (base, words, dry.stdout[-2000:], dry.stderr[-2000:])
    text = subprocess.run([*run, "simulate", "--gpus", "8", "--seq-len", "8K", "--draws", "1", "--auto",
                           "--schedulers", "zigzag", "wlb"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert text.returncode == 0, text.stderr[-3000:]
    lines = text.stdout.strip().splitlines()
    assert lines[-2].startswith("config: parallel.scheduler=zigzag ") and "parallel.dp_mode=" in lines[-2]
    assert lines[-1].startswith("recommended: zigzag")
    assert np.isfinite(best["step_time_s"])
