"""The per-rank memory estimate (distattn.train.preflight.memory), `distattn train --dry-run` and the memory bench.

The estimate is checked for the way its parts scale, for the shipped GPU configs (each fits an
80 GiB GPU at its shipped bf16 + full checkpointing), for a config that cannot fit, and against a
real measured CPU peak: the trainer's ``peak_memory_gib`` (ranks' ru_maxrss) of a small run must be
within 0.5x-2x of the estimate, both in total and per token.
"""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from distattn.bench import memory as bench
from distattn.cli import main as cli_main
from distattn.train.config import ModelConfig, load_config
from distattn.train.preflight.memory import GIB, alternatives, attention_bytes, estimate, local_device, report

ROOT = Path(__file__).resolve().parents[1]
GPU_CONFIGS = ["llama3-8b-128k-64gpu.yaml", "llama3-8b-512k-64gpu.yaml", "llama-34b-512k-512gpu.yaml"]
STATES = ("weights", "grads", "optimizer")


def _cfg(name="llama3-8b-128k-64gpu.yaml"):
    return load_config(ROOT / "configs" / name)


def _states(est) -> int:
    return sum(getattr(est, name) for name in STATES)


@pytest.mark.parametrize("tied,sinks", [(True, False), (False, False), (False, True)])
def test_param_count_is_the_models(tied, sinks):
    from distattn.train.model.transformer import Transformer

    m = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=100, tie_embeddings=tied,
                    attention_sinks=sinks)
    assert m.shape.params == sum(p.numel() for p in Transformer(m).parameters())


def test_components_scale():
    cfg = _cfg()
    alt = alternatives(cfg)
    assert alt["full"].activations < alt["selective"].activations < alt["none"].activations
    bf16, fp32 = estimate(cfg), estimate(cfg.replace(train={"dtype": "fp32"}))
    # (not the loss: one chunk's bf16 logits come on top of its fp32 ones)
    assert bf16.activations < fp32.activations and bf16.total < fp32.total
    assert attention_bytes(cfg).buffers < attention_bytes(cfg.replace(train={"dtype": "fp32"})).buffers
    ddp = estimate(cfg.replace(parallel={"dp_mode": "ddp"}))
    assert _states(bf16) < _states(ddp) / 10
    # activations grow with the tokens per rank; states do not
    longer = estimate(cfg.replace(data={"seq_len": 2 * cfg.data.seq_len}))
    assert longer.activations > 1.9 * bf16.activations and _states(longer) == _states(bf16)
    # the CPU variant differs by its runtime and glibc's share, no other part
    cpu = estimate(cfg, "cpu")
    assert cpu.total - cpu.runtime - cpu.allocator == bf16.total - bf16.runtime and bf16.allocator == 0
    assert cpu.runtime < bf16.runtime and 0 < cpu.allocator < cpu.activations


def test_a_tiled_mlp_drops_its_intermediates():
    """train.mlp_chunk: per token, the four [ffn_dim] intermediates no block keeps any more, and the
    MLP's backward holds one chunk's working set instead of the shard's two [ffn_dim] gradients;
    attention's backward becomes the larger moment (Llama-3 8B, 1M tokens over 8 ranks, usp, full
    checkpointing: 85.5 -> 71.0 GiB, offload 41.0 GiB + 32 GiB of host memory)."""
    cfg = _cfg().replace(data={"seq_len": 1 << 20}, parallel={"dp": 1, "cp": 8, "scheduler": "usp"})
    whole, tiled = estimate(cfg), estimate(cfg.replace(train={"mlp_chunk": 4096}))
    assert (whole.total / GIB, tiled.total / GIB) == pytest.approx((85.5, 71.0), abs=0.05)
    m, tokens = cfg.model, whole.tokens_per_rank
    kept, mlp_grads = tokens * 4 * 2 * m.ffn_dim, tokens * 2 * 2 * m.ffn_dim    # bf16 (FSDP)
    assert whole.activations - tiled.activations == kept + mlp_grads - 4096 * 7 * 2 * m.ffn_dim
    assert whole.attention_buffers == 0 < tiled.attention_buffers
    assert _states(tiled) == _states(whole) and tiled.inputs == whole.inputs
    assert estimate(cfg.replace(train={"mlp_chunk": tokens})).total == whole.total   # one chunk: not tiled
    offload = estimate(cfg.replace(train={"mlp_chunk": 4096, "activation_checkpointing": "offload"}))
    assert offload.total / GIB == pytest.approx(41.0, abs=0.05) and offload.host == 32 * GIB


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_shipped_gpu_configs_fit_80gb(name):
    cfg = _cfg(name)
    assert (cfg.train.dtype, cfg.train.activation_checkpointing) == ("bf16", "full")
    lines, fits = report(cfg, "cuda", 80 * GIB)
    assert fits and estimate(cfg).total < 80 * GIB
    assert any(line.startswith("fits:") for line in lines)


def test_a_config_that_cannot_fit_says_so():
    # Llama-3 8B at 128K tokens on one GPU without checkpointing: most of a terabyte of activations
    cfg = _cfg().replace(parallel={"dp": 1, "cp": 1}, train={"activation_checkpointing": "none"})
    est = estimate(cfg)
    assert est.dp_mode == "single" and est.activations > 800 * GIB
    lines, fits = report(cfg, "cuda", 80 * GIB)
    assert not fits and any(line.startswith("does NOT fit") for line in lines)
    assert all("does not fit" in line for line in lines if line.strip().startswith(("none", "full", "selective")))


def test_bad_input_names_the_argument():
    cfg = _cfg()
    with pytest.raises(ValueError, match="device"):
        estimate(cfg, "tpu")
    with pytest.raises(ValueError, match="doc_lens"):
        estimate(cfg, doc_lens=[5, 6])
    with pytest.raises(ValueError, match="--settings"):
        bench.parse_setting("fp16:none")


def test_dry_run_prints_the_table_and_touches_nothing(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "distattn.cli", "train", "configs/llama3-8b-128k-64gpu.yaml",
                           "--dry-run", "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    # dp 8: balanced packing by default, estimated at its token cap (1.25 x 131,072 tokens / cp 8)
    for words in ("8.03 B parameters", "tokens per rank: 20,480 (data.token_cap 163,840 / cp 8)",
                  "a rank's sequence holds up to data.token_cap 163,840 tokens", "weights", "gradients", "optimizer",
                  "activations", "loss", "attention buffers", "runtime", "total", "fits:", "selective"):
        assert words in done.stdout, words
    assert not out.exists()


def test_dry_run_exits_1_when_it_does_not_fit(capsys):
    assert cli_main(["train", "configs/llama3-8b-512k-64gpu.yaml", "--dry-run", "--gpu-memory-gib", "20"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert cli_main(["train", "configs/llama3-8b-512k-64gpu.yaml", "--dry-run", "--gpu-memory-gib", "0"]) == 2
    assert "--gpu-memory-gib" in capsys.readouterr().err


def test_tiny_dry_run_reports_cpu_ranks(capsys):
    cfg = _cfg("tiny.yaml")
    assert local_device(cfg, 8 * GIB) == "cpu" and local_device(_cfg(), 8 * GIB) == "cuda"
    assert cli_main(["train", "configs/tiny.yaml", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "CPU ranks" in text and "for 4 ranks of this machine" in text


def test_bench_smoke_and_the_estimate_against_a_measured_peak():
    """Two real runs of the tiny model on 2 CPU ranks (the bench's fit points): the measured peaks
    and bytes per token must be within 0.5x-2x of the estimate."""
    args = bench._parser().parse_args(["--schedulers", "zigzag", "--settings", "fp32:none", "--fit-lens", "1024",
                                       "3072", "--max-seq-len", "3072", "--budget-gib", "4", "--steps", "2",
                                       "--device", "cpu"])
    (result,), device = bench.run_bench(args)
    assert device == "cpu" and result.seq_len == 3072 and result.runs == 2
    assert 0.5 <= result.estimate_gib / result.peak_gib <= 2.0, result
    assert 0.5 <= result.estimate_bytes_per_token / result.bytes_per_token <= 2.0, result
    bench.print_table([result], args.budget_gib, device)


def test_bench_refuses_bad_arguments():
    parse = bench._parser().parse_args
    with pytest.raises(ValueError, match="--fit-lens"):
        bench._checked(parse(["--fit-lens", "4096", "1024", "--device", "cpu"]))
    with pytest.raises(ValueError, match="--budget-gib"):
        bench._checked(parse(["--budget-gib", "-1", "--device", "cpu"]))
    assert isinstance(parse([]), argparse.Namespace)


def test_search_steps_down_when_the_line_bends():
    """The search on a made-up peak curve that rises faster past 6000 tokens: the fitted line overshoots,
    the verification run is over budget, the refit finds a length under it."""
    def peak(n):
        return 0.4 + n * 5e-5 + max(0, n - 6000) * 1e-4

    found = bench.search(peak, 1.0, (1024, 4096), cap=100_000, tries=3, say=lambda line: None)
    n, p = found["best"]
    assert found["predicted"] == 11776 and p <= 1.0 and peak(n + 2 * bench.MULTIPLE) > 1.0
    assert found["runs"] >= 4
    none_fit = bench.search(lambda n: 2.0, 1.0, (1024, 4096), cap=100_000, tries=3, say=lambda line: None)
    assert none_fit["best"][0] == 0 and none_fit["runs"] == 1


def test_ring_buffers_follow_the_moves():
    """zigzag's buffers per rank, in K/V blocks of fp32 (dK/dV: the same bytes): documents that each
    fill one zigzag chunk move nothing (the rank's own stacked block); one document over 2 ranks:
    two at every backward step; over 4 or more, a middle step holds the block computed on and the
    arriving one, and the dK/dV being summed, returned and received."""
    from distattn import plan
    from distattn.planning.schedule import AttnShape

    shape = AttnShape(8, 4, 32, 4)
    for docs, p, blocks in (([2048] * 4, 2, 1), ([8192], 2, 2), ([8192], 4, 5), ([8192], 8, 5)):
        schedule = plan(docs, p, scheduler="zigzag").schedule
        assert schedule.buffer_bytes(shape).tolist() == [blocks * (8192 // p) * shape.kv_row] * p, (docs, p)


def test_head_groups_shrink_the_head_exchange():
    """parallel.head_groups: the head shards of dout and the attention accumulators of one group of
    query heads at a time (usp, Llama-3 8B, 4M tokens on 8 ranks, offload + tiled MLP)."""
    cfg = _cfg().replace(data={"seq_len": 4 << 20}, parallel={"dp": 1, "cp": 8, "scheduler": "usp"},
                         train={"activation_checkpointing": "offload", "mlp_chunk": 4096})
    one, four = attention_bytes(cfg), attention_bytes(cfg.replace(parallel={"head_groups": 4}))
    assert one.saved == four.saved and four.buffers < one.buffers and four.grads < one.grads
    m, tokens = cfg.model, 4 << 20       # U = 8: each rank computes 4 query heads and 1 KV head of every token
    hd = m.dim // m.n_heads
    assert (one.grads, four.grads) == (tokens * 2 * 4 * hd * (4 + 2), tokens * 2 * 4 * hd * (1 + 2))
    assert estimate(cfg.replace(parallel={"head_groups": 4})).total < estimate(cfg).total < 80 * GIB + 10 * GIB
