"""Issue 54: the simulator measured against the strongest baseline, in the step that fits, over many
draws, on measured links: its pieces one by one (kernel speed, link queues and slowdown, the step's
recomputation and FSDP traffic, the fitting setting, packing, the sweep, DistCA's sampling) and the
CLI end to end. Small clusters: seconds."""

import json
from dataclasses import replace

import numpy as np
import pytest

from distattn.costmodel.model_shape import GPUS, MODELS
from distattn.costmodel.network import default_profile
from distattn.planning.program import RUN, START, WAIT
from distattn.sim import fit, sweep
from distattn.sim.kernel import AttentionKernel
from distattn.sim.replay import Op, _slowed, replay
from distattn.sim.simulate import SimConfig, simulate, simulate_row
from distattn.sim.workload import assign, default_batch, draw_chunks

M8B = MODELS["llama3-8b"]


def test_kernel_speed_by_segment_shape():
    """Our kernels at the GPU report's level (FA2's backward: derived from its forward and f+b), priced
    per segment by the tile model: a whole long document runs at the level, a short one slower, the
    last rows of a long one (a ring's chunk, a CAD task) forward at the long one's speed and backward
    slower; a rank's rate is its FLOPs over its call's seconds; H200 shares H100's."""
    k = AttentionKernel.measured(GPUS["h100"], 128)
    assert k.tflops("forward", [32768], 32).tolist() == pytest.approx([435.0])
    assert k.tflops("backward", 32768, 32) == pytest.approx(2.5 / (3.5 / 309 - 1 / 340))   # FA2's, derived
    assert k.tflops("forward", 256, 32) < 0.5 * 435 and AttentionKernel.measured(GPUS["h200"], 128) == k
    short, long, tail = 256 * 257 // 2, 32768 * 32769 // 2, 256 * (65536 - 128)
    segments = (np.array([0, 0, 1]), np.array([256, 32768, 256]), np.array([short, long, tail]),
                np.array([256, 32768, 65536]))
    fwd, bwd = (k.rank_rates(segments, 3, d, 32) for d in ("forward", "backward"))
    seconds = k.rank_seconds(segments, 3, "forward", 32)
    assert fwd[0] == pytest.approx(4 * 32 * 128 * (short + long) / seconds[0])
    assert 0.8 * fwd[0] < fwd[1] and bwd[1] < 0.6 * k.tflops("backward", 65536, 32) * 1e12
    assert fwd[2] == fwd.max() and bwd[2] == bwd.max()   # nothing to run: the best rank's rate
    assert "attn_latency_h100.csv" in k.source and "GPU report" in k.source


def test_links_queue_apart_and_transfers_slow_compute():
    one = np.ones(2)
    nic = [Op(START, one, ("a",), span=2, link="nic"), Op(START, one, ("b",), span=2, link="nvlink"),
           Op(WAIT, 0 * one, ("a",)), Op(WAIT, 0 * one, ("b",))]
    assert replay(nic, 2).end.tolist() == [1.0, 1.0]                   # two links: at once
    same = [Op(START, one, ("a",), span=2, link="nic"), Op(START, one, ("b",), span=2, link="nic"),
            Op(WAIT, 0 * one, ("a",)), Op(WAIT, 0 * one, ("b",))]
    assert replay(same, 2).end.tolist() == [2.0, 2.0]                  # one link: in turn
    hidden = [Op(START, one, ("a",), span=2), Op(RUN, 2 * one), Op(WAIT, 0 * one, ("a",))]
    assert replay(hidden, 2).end.tolist() == [2.0, 2.0]
    # compute under a 1 s transfer runs 1.5x slower: 1 s of wall does 2/3 s of work, 4/3 s remain
    assert replay(hidden, 2, slowdown=0.5).end.tolist() == pytest.approx([1 + 4 / 3] * 2)
    assert _slowed(np.array([1.0, 1.0]), np.array([0.0, 5.0]), 0.25).tolist() == [1.0, 1.25]


def _counts(cfg, name="cad", docs=None):
    """(all-gathers, reduce-scatters, attention forward stages run) of one simulated step."""
    import distattn.sim.simulate as sim

    seen = []
    real = sim.step_ops

    def spy(*args, **kw):
        ops = real(*args, **kw)
        seen.extend(ops)
        return ops
    sim.step_ops = spy
    try:
        result, _ = simulate_row(cfg, default_profile(), name, docs or [[3000, 2000, 1500, 1692]] * cfg.dp)
    finally:
        sim.step_ops = real
    keys = [op.key for op in seen if op.op == START and op.key is not None]
    return (sum(1 for k in keys if "agf" in k or "agb" in k), sum(1 for k in keys if "rs" in k),
            sum(1 for k in keys if len(k) == 6 and k[3] in ("f", "r")), result)


def test_step_recomputes_and_gathers_as_the_trainer_does():
    cfg = SimConfig(M8B, 16, 8192, 8, activation_checkpointing="none", nano_batches=2)
    layers = M8B.n_layers
    ag, rs, _, _ = _counts(cfg)
    # pieces called apart (ping-pong across layers): the trainer keeps each block gathered from its
    # first piece to its last, both passes, and reduces it once (counted on gloo:
    # tests/test_fsdp_gather_once.py)
    assert (ag, rs) == (2 * layers, layers)
    ag, rs, _, _ = _counts(cfg.__class__(**{**cfg.__dict__, "activation_checkpointing": "full"}))
    assert (ag, rs) == (2 * layers, layers)                      # a block called whole: once a pass
    one = SimConfig(M8B, 16, 8192, 8, activation_checkpointing="none", dp_transfers=False)
    full = replace(one, activation_checkpointing="full")
    selective = replace(one, activation_checkpointing="selective")
    _, _, starts_none, none = _counts(one)
    _, _, starts_full, whole = _counts(full)
    assert starts_full == 2 * starts_none > 0                     # full reruns attention's transfers too
    assert whole["compute_s"] > _counts(selective)[3]["compute_s"] > none["compute_s"]


def test_the_cheapest_setting_that_fits():
    cfg = SimConfig(M8B, 64, 131072, 8)
    chosen = fit.choose(cfg, "zigzag", 163840)
    assert chosen.fits and chosen.memory_gib <= 80 and chosen.checkpointing == "selective"
    assert fit.memory_gib(cfg, "zigzag", "none", 0, 163840) > 80        # the cheaper one does not fit
    forced = fit.choose(SimConfig(M8B, 64, 131072, 8, activation_checkpointing="none"), "zigzag", 163840)
    assert (forced.checkpointing, forced.fits) == ("none", False)
    assert not fit.choose(SimConfig(M8B, 8, 1 << 23, 8), "zigzag", 1 << 23).fits
    tp = fit.memory_gib(SimConfig(M8B, 64, 131072, 1, tp=8), "zigzag", "full", 0, 131072)
    assert tp < fit.memory_gib(SimConfig(M8B, 8, 131072, 1), "zigzag", "full", 0, 131072)
    # a row that fits no setting has no time, unless one was asked for
    row, run = simulate_row(SimConfig(M8B, 8, 1 << 23, 8), default_profile(), "zigzag", [[1 << 23]])
    assert row["step_time_s"] is None and not row["fits"] and run is None


def test_draws_pack_the_same_stream():
    pool = np.array([100, 3000, 50_000, 7])
    a, b = draw_chunks(4, 8192, pool, 3), draw_chunks(4, 8192, pool, 3)
    assert a == b and [sum(c) for c in a] == [8192] * 4 and draw_chunks(4, 8192, pool, 4) != a
    stream = assign(a, 2, 2, "stream", 1e-4, 1e-4)
    assert [stream.micro[j][r] for r in range(2) for j in range(2)] == a and stream.held_tokens == 0
    balanced = assign(a, 2, 2, "balanced", 1e-4, 1e-4)
    flat = sorted(n for j in balanced.micro for r in j for n in r)
    assert flat == sorted(n for c in a for n in c) and balanced.imbalance <= stream.imbalance
    assert max(sum(d) for j in balanced.micro for d in j) <= 1.25 * 8192
    assert default_batch(512, 1 << 19) == 16 and default_batch(8, 1 << 20) == 1


def test_sweep_draws_and_paired_ratios():
    cfg = SimConfig(M8B, 16, 65536, 8, batch=default_batch(16, 65536))
    assert sweep.candidates(cfg, "cad") == [4, 8, 16]   # dp must divide the batch of 4 sequences
    # ulysses splits a TP rank's 4 query heads over at most 4 CP ranks
    assert sweep.candidates(SimConfig(M8B, 128, 65536, 1, tp=8, batch=8), "ulysses") == [2, 4]   # (dp <= 8)
    got = sweep.rows(cfg, default_profile(), ["wlb", "cad", "ideal"], sweep.pool_batches(None), 3, True)
    rows = {r["scheduler"]: r for r in got}
    for r in got:
        assert r["draws"] == 3 and r["step_time_p10_s"] <= r["step_time_s"] <= r["step_time_p90_s"]
        tried, sizes = list(dict.fromkeys(t["cp"] for t in r["sweep"])), sweep.candidates(cfg, r["scheduler"])
        assert tried == sizes[:len(tried)]   # from the smallest; cut where one is 1.5x slower than the best
        best = min(t["step_time_s"] for t in r["sweep"] if t["fits"])
        last = min(t["step_time_s"] for t in r["sweep"] if t["cp"] == tried[-1] and t["fits"])   # its best setting
        assert len(tried) == len(sizes) or last > sweep.GIVE_UP * best
        # 3 draws: every size was scored on all of them, so the row's median is its size's median
        assert r["step_time_s"] == min(t["step_time_s"] for t in r["sweep"] if t["fits"])
        assert all(isinstance(r[k], int) for k in ("seq_len", "batch", "micro_batches", "nano_batches"))
    assert rows["wlb"]["speedup_vs_wlb"] == 1 and rows["ideal"]["over_ideal"] == 1
    assert rows["cad"]["over_ideal"] >= 1 and rows["cad"]["speedup_vs_wlb"] > 0


def test_tensor_parallel_rows():
    with pytest.raises(ValueError, match="--tp 3 must divide --gpus-per-node 8"):
        SimConfig(M8B, 24, 65536, 1, tp=3).check()
    cfg = SimConfig(M8B, 64, 131072, 2, tp=8, batch=4, activation_checkpointing="full")
    cfg.check()
    rows = {r["scheduler"]: r for r in simulate(cfg, default_profile(), ["zigzag", "cad"])}
    for r in rows.values():
        assert (r["tp"], r["cp"], r["dp"], r["micro_batches"]) == (8, 2, 4, 1) and 0 < r["mfu"] < 1


def test_distca_documents_as_their_code_draws_them():
    from distattn.sim.published import distca_documents, distca_sequences, distca_setups

    lens = list(range(1000, 80000, 7)) + [70000, 100000]
    pretrain = distca_documents("pretrain", lens, 262144)
    assert len(pretrain) == 10000 and all(n % 4 == 0 for n in pretrain)   # elongated x4 at 256K
    prolong = distca_documents("prolong", lens, 131072)
    long = [n for n in lens if n >= 65536]
    assert len(prolong) == 4 * len(long) + len([n for n in lens if n < 65536]) // 2
    assert all(n >= 65536 for n in prolong[:4 * len(long)])               # the long copies first
    assert 0 < sum(n == 131072 for n in prolong[:4 * len(long)]) < 4 * len(long)
    seqs = distca_sequences([17, 40, 100], 64)
    assert seqs == [[32, 32], [16, 48], [64]] and all(sum(s) == 64 for s in seqs)
    assert len(distca_setups()) == 36 and distca_setups(quick=True)[0][:4] == ("llama3-8b", 131072, 64, 8)


def test_ring_flash_rows_split_every_document_as_its_varlen_zigzag_does():
    """ring-flash-attention's varlen zigzag splits each document zigzag (our per-document layout): on
    its benchmark's document mixes it keeps nearly the one-document share; llama3's all-gather, which
    splits the packed sequence, does not."""
    from distattn.sim.published import ring_flash_rows

    one, varlen, llama3 = (r["share"] for r in ring_flash_rows(default_profile()))
    assert 0.5 < one <= 1 and one - 0.1 < varlen <= 1 and llama3 < varlen - 0.1


def test_simulate_cli_draws_sweep_json_and_verbose(tmp_path, capsys):
    from distattn.cli import main

    csv = tmp_path / "links.csv"
    rows = ["op,ngpu,nodes,dtype,size_bytes,time_us,algbw_gbs,busbw_gbs,source"]
    for op, n, nodes, bw in (("all_gather", 8, 1, 300), ("reduce_scatter", 8, 1, 300), ("alltoall", 8, 1, 300),
                             ("all_gather", 16, 2, 40), ("reduce_scatter", 16, 2, 40), ("alltoall", 16, 2, 40),
                             ("sendrecv", 8, 1, 200), ("sendrecv", 16, 2, 40), ("all_reduce", 16, 2, 40)):
        for size in (1 << 20, 1 << 26):
            rows.append(f"{op},{n},{nodes},float,{size},{10 + size / bw / 1e3},0,0,test")
    csv.write_text("\n".join(rows) + "\n")
    code = main(["simulate", "--gpus", "16", "--seq-len", "64K", "--draws", "2", "--sweep", "--schedulers", "cad",
                 "wlb", "--network", str(csv), "--verbose", "--json"])
    out = capsys.readouterr()
    assert code == 0
    results = {r["scheduler"]: r for r in json.loads(out.out)["results"]}
    for r in results.values():
        assert {"step_time_s", "step_time_p10_s", "step_time_p90_s", "cp", "dp", "checkpointing", "memory_gib",
                "fits"} <= set(r) and r["draws"] == 2
    assert "network fits used" in out.err and "links.csv:" in out.err   # the rows each fit used
    assert main(["simulate", "--gpus", "16", "--seq-len", "64K", "--sweep", "--cp", "4"]) == 2
