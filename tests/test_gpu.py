"""GPU suite: runs wherever CUDA is present, skipped cleanly elsewhere.

* every backend (triton, torch = PyTorch's FlashAttention, reference) vs fp64 in bf16/fp16 under
  the tolerance rule (error <= 2x PyTorch's own SDPA error in the same dtype, plus rounding), on
  (causal, window, q_offset) masks and on per-segment bands, with logit soft-capping and sinks;
  ``auto`` (triton or torch per direction, by ``distattn.kernels.auto``'s table) on the bands;
* every scheduler's plan at world size 1 on the GPU (triton, torch and auto), and no host
  synchronisation in a warm step (``torch.cuda.set_sync_debug_mode("error")``);
* every scheduler over NCCL when >= 2 GPUs exist;
* the trainer for 3 steps under torchrun;
* the kernel benchmark on a small size.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import distattn
from conftest import max_err, rand_qkv
from distattn.kernels import Varlen, attn_bwd, attn_fwd, varlen_bwd, varlen_fwd
from distattn.planning.masks import cu_seqlens
from distattn.runtime.oracle import dense_attention
from distattn.distributed.spawn import run_distributed
from test_kernel_bands import _bounds, _sdpa_band
from test_kernels import _oracle, _sdpa

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = Path(__file__).resolve().parents[1]
SCHEDULERS = ["ring", "zigzag", "allgather", "ulysses", "usp", "cad"]
MASKS = {"causal": (True, None), "full": (False, None), "window-causal": (True, 300), "window-full": (False, 200)}
# (q_len, k_len, q_offset) segments: long ones (many full tiles), block-unaligned ones, q shorter
# than k, ring-style blocks (queries after the keys' end), one-token and empty-key segments
LAYOUTS = {
    "docs": [(1500, 1500, 0), (1, 1, 0), (777, 777, 0), (130, 130, 0), (2048, 2048, 0)],
    "ragged": [(300, 1300, 0), (64, 64, 0), (129, 500, 0), (5, 0, 0), (400, 400, 0)],
    "ring-blocks": [(512, 512, 512), (300, 700, 300), (256, 256, 0)],
}


def _case(layout, hq, hkv, d, seed=0):
    lq, lk, off = zip(*LAYOUTS[layout])
    q, k, v = (t.cuda() for t in rand_qkv(sum(lq), sum(lk), hq, hkv, d, torch.float64, seed))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).cuda()
    return q, k, v, dout, cu_seqlens(lq, "cuda"), cu_seqlens(lk, "cuda"), torch.tensor(off, device="cuda")


# every mask and layout in bf16; fp16 on one (each new shape/mask/dtype autotunes the kernels)
CASES = [(dtype, mask, layout) for layout in LAYOUTS for mask in MASKS for dtype in ("bfloat16",)]
CASES += [("float16", "causal", "docs"), ("float16", "window-full", "ragged")]
HEADS = {"docs": ((8, 2), 128), "ragged": ((4, 4), 64), "ring-blocks": ((6, 3), 128)}


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("dtype,mask,layout", CASES)
def test_backend_within_twice_torch_error(backend, dtype, mask, layout):
    dtype = getattr(torch, dtype)
    heads, d = HEADS[layout]
    causal, window = MASKS[mask]
    q64, k64, v64, dout64, cu_q, cu_k, off = _case(layout, *heads, d)
    if backend == "torch" and layout == "ring-blocks" and window is not None:
        # queries more than a window past their keys' alignment: FlashAttention's window cannot say it
        # (planned ring blocks never ask for it: their keys are trimmed to what the window sees)
        with pytest.raises(ValueError, match="backend='triton'"):
            attn_fwd(q64.to(dtype), k64.to(dtype), v64.to(dtype), cu_q, cu_k, causal=causal, window=window,
                     backend=backend, q_offset=off)
        return
    want = _oracle(q64, k64, v64, cu_q, cu_k, off, causal, window, dout64)
    q, k, v, dout = (t.to(dtype) for t in (q64, k64, v64, dout64))
    base = _sdpa(q, k, v, cu_q, cu_k, off, causal, window, dout)
    out, lse = attn_fwd(q, k, v, cu_q, cu_k, causal=causal, window=window, backend=backend, q_offset=off)
    grads = attn_bwd(dout, q, k, v, out, lse, cu_q, cu_k, causal=causal, window=window, backend=backend, q_offset=off)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.is_cuda
    for name, a, b, w in zip(("out", "dq", "dk", "dv"), (out, *grads), base, want[:1] + want[2:]):
        atol = max_err(w.to(dtype), w)
        assert max_err(a, w) <= 2 * max_err(b, w) + atol, (name, max_err(a, w), max_err(b, w))
    assert max_err(lse, want[1]) < 2e-2  # -inf rows must match exactly (max_err treats them)


def test_torch_backend_refuses_what_flash_cannot_express():
    q, k, v, *_ = _case("docs", 4, 4, 64)
    cu = cu_seqlens([len(q)], "cuda")
    with pytest.raises(ValueError, match="fp16 or bf16"):
        attn_fwd(q.float(), k.float(), v.float(), cu, cu, backend="torch")
    qh, kh, vh = (t.half() for t in (q, k, v))
    with pytest.raises(ValueError, match="q_offset < 0"):
        attn_fwd(qh, kh, vh, cu, cu, backend="torch", q_offset=torch.tensor([-3], device="cuda"))


def test_auto_routes_each_direction_by_the_table_on_this_gpu():
    """``backend="auto"`` on this GPU runs what ``distattn.kernels.auto`` chooses for its arch, per head dim and
    direction, for calls FlashAttention takes; fp32 and soft-capped calls and deterministic backwards run triton."""
    from distattn.kernels import auto, registry

    device = torch.device("cuda", torch.cuda.current_device())
    dispatch = registry.resolve_backend("auto", device).fwd.__self__
    strict = registry._resolve("auto", device, True).fwd.__self__   # what varlen_bwd(deterministic=True) runs
    arch, seg = registry.device_arch(device), Varlen.from_geometry([64], [64], True, None)
    for d in (64, 128):
        q = torch.zeros(64, 4, d, dtype=torch.bfloat16, device=device)
        for direction in auto.DIRECTIONS:
            assert dispatch.pick(direction, q, q, seg, None) == auto.choose(arch, d, direction), (arch, d, direction)
            assert dispatch.pick(direction, q.float(), q.float(), seg, None) == "triton"
            assert dispatch.pick(direction, q, q, seg, 30.0) == "triton"
        assert strict.pick("bwd", q, q, seg, None) == "triton"


# (m, n, lo, hi) segments, None = unbounded; all of them FlashAttention's window can say (so the
# torch backend runs them too): long inverse-causal, bi-causal and two-sided bands, shifted causal
GPU_BANDS = [(1500, 1500, 0, None), (700, 1300, 0, 600), (129, 500, -60, 400), (1, 1, 0, 0), (512, 512, None, 0),
             (300, 900, None, 650), (5, 0, None, None), (800, 800, -200, 100)]


def _band_case(hq, hkv, d, seed=0):
    lq, lk = [s[0] for s in GPU_BANDS], [s[1] for s in GPU_BANDS]
    q, k, v = (t.cuda() for t in rand_qkv(sum(lq), sum(lk), hq, hkv, d, torch.float64, seed))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).cuda()
    keep = torch.zeros(sum(lq), sum(lk), dtype=torch.bool, device="cuda")
    q0 = k0 = 0
    for m, n, lo, hi in GPU_BANDS:
        dd = torch.arange(n, device="cuda").unsqueeze(0) - torch.arange(m, device="cuda").unsqueeze(1)
        keep[q0:q0 + m, k0:k0 + n] = (dd >= (lo if lo is not None else -m - n)) & (dd <= (hi if hi is not None
                                                                                          else m + n))
        q0, k0 = q0 + m, k0 + n
    return q, k, v, dout, Varlen.from_lengths(lq, lk, *_bounds(GPU_BANDS)), keep


def _band_oracle(q, k, v, dout, seg, keep, softcap=None, dtype=torch.float64):
    qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = dense_attention(qq, kk, vv, torch.from_numpy(seg.cu_q), torch.from_numpy(seg.cu_k), softcap=softcap,
                               mask=keep)
    out.backward(dout.to(dtype))
    return out.detach(), lse.detach(), qq.grad, kk.grad, vv.grad


@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("backend", ["triton", "torch", "reference", "auto"])
def test_bands_within_twice_torch_error(backend, softcap):
    """Per-segment bands (and softcap) in bf16 vs fp64: SDPA's error as the bound without softcap,
    the plain math in bf16 with it (SDPA has no softcap)."""
    dtype = torch.bfloat16
    q64, k64, v64, dout64, seg, keep = _band_case(8, 2, 128)
    want = _band_oracle(q64, k64, v64, dout64, seg, keep, softcap)
    q, k, v, dout = (t.to(dtype) for t in (q64, k64, v64, dout64))
    if softcap is None:
        base = _sdpa_band(q, k, v, seg, keep, dout)
    else:
        plain = _band_oracle(q, k, v, dout, seg, keep, softcap, dtype=dtype)
        base = plain[:1] + plain[2:]
    kw = dict(scale=q.shape[2] ** -0.5, softcap=softcap, backend=backend)
    out, lse = varlen_fwd(q, k, v, seg, **kw)
    grads = varlen_bwd(dout, q, k, v, out, lse, seg, **kw)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.is_cuda
    for name, a, b, w in zip(("out", "dq", "dk", "dv"), (out, *grads), base, want[:1] + want[2:]):
        atol = max_err(w.to(dtype), w)
        assert max_err(a, w) <= 2 * max_err(b, w) + atol, (name, max_err(a, w), max_err(b, w))
    assert max_err(lse, want[1]) < 2e-2


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_sinks_and_softcap_through_attn_fwd_bwd(backend):
    dtype = torch.bfloat16
    q64, k64, v64, dout64, cu_q, cu_k, off = _case("ragged", 4, 4, 64)
    sinks64 = torch.randn(4, generator=torch.Generator().manual_seed(5), dtype=torch.float64).cuda()
    ins = [t.detach().clone().requires_grad_() for t in (q64, k64, v64, sinks64)]
    w_out, w_lse = dense_attention(*ins[:3], cu_q, cu_k, True, None, softcap=30.0, sinks=ins[3])
    w_out.backward(dout64)
    q, k, v, dout, sinks = (t.to(dtype) for t in (q64, k64, v64, dout64, sinks64))
    kw = dict(causal=True, backend=backend, softcap=30.0, sinks=sinks)
    out, lse = attn_fwd(q, k, v, cu_q, cu_k, **kw)
    dq, dk, dv, dsinks = attn_bwd(dout, q, k, v, out, lse, cu_q, cu_k, **kw)
    assert dsinks.shape == (4,) and dsinks.dtype == dtype
    rel = lambda a, b: max_err(a, b) / b.abs().max().item()  # noqa: E731
    assert rel(out, w_out.detach()) < 2e-2 and max_err(lse, w_lse.detach()) < 2e-2
    for a, b in zip((dq, dk, dv, dsinks), (t.grad for t in ins)):
        assert rel(a, b) < 3e-2


def _scheduler_case(scheduler, world, dtype_name, backend):
    """On every rank: error of out and grads vs fp64, and whether a warm step synchronised."""
    dtype = getattr(torch, dtype_name)
    docs = [1500, 3, 700, 1, 2300, 64]
    device = torch.device("cuda", torch.cuda.current_device())
    q, k, v = (t.to(device) for t in rand_qkv(sum(docs), sum(docs), 8, 2, 128, torch.float64))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(device)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = distattn.reference_attention(*ref_in, docs, causal=True)
    ref.backward(dout)
    # at world size 1 an option keeps the scheduler's own executor (else the plan is local attention)
    options = {"usp": {"ulysses_degree": 2 if world > 1 else 1}, "allgather": {"heads_per_step": 1},
               "cad": {"epsilon": 0.1}}.get(scheduler, {})
    plan = distattn.plan(docs, dist.group.WORLD, scheduler=scheduler, backend=backend, **options)
    mine = [plan.shard(t).to(dtype).requires_grad_() for t in (q, k, v)]
    grad = plan.shard(dout).to(dtype)
    distattn.attention(*mine, plan).backward(grad)  # warm-up: autotuning, NCCL communicators
    for t in mine:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = distattn.attention(*mine, plan)
        out.backward(grad)
        synced = None
    except RuntimeError as exc:
        synced = str(exc).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    if synced is not None:  # still report the numbers
        out = distattn.attention(*mine, plan)
        out.backward(grad)
    errs = [max_err(out.detach(), plan.shard(ref.detach())) / plan.shard(ref.detach()).abs().max().item()]
    errs += [max_err(a.grad, plan.shard(b.grad)) / plan.shard(b.grad).abs().max().item() for a, b in zip(mine, ref_in)]
    return max(errs), synced


@pytest.mark.parametrize("backend", ["triton", "torch", "auto"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_at_world_one_on_the_gpu(scheduler, backend):
    (err, synced), = run_distributed(_scheduler_case, 1, scheduler, 1, "bfloat16", backend, backend="nccl",
                                     timeout=600)
    assert synced is None, f"a warm step synchronised with the host: {synced}"
    assert err < 2e-2, err


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs >= 2 GPUs for NCCL runs")
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_over_nccl(scheduler):
    world = 4 if torch.cuda.device_count() >= 4 else 2
    results = run_distributed(_scheduler_case, world, scheduler, world, "bfloat16", "auto", backend="nccl",
                              timeout=900)
    for err, synced in results:
        assert synced is None, f"a warm step synchronised with the host: {synced}"
        assert err < 2e-2, err


def test_trainer_three_steps_under_torchrun(tmp_path):
    gpus = min(torch.cuda.device_count(), 4)
    cfg = tmp_path / "gpu.yaml"
    cfg.write_text(f"""
model: {{dim: 256, n_layers: 2, n_heads: 8, n_kv_heads: 4, ffn_dim: 688, vocab_size: 256}}
data: {{source: stdlib, seq_len: 8192, seed: 0}}
parallel: {{dp: 1, cp: {gpus}, scheduler: zigzag}}
train: {{steps: 3, lr: 3.0e-3, warmup_steps: 1, log_every: 1, ckpt_every: 3, out: {tmp_path / 'run'}}}
""")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
                           "-m", "distattn.cli", "train", str(cfg)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_kernel_benchmark_runs():
    proc = subprocess.run([sys.executable, "-m", "distattn.kernels.bench", "--seq-lens", "1024", "--head-dims", "64",
                           "--tokens", "4096"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "triton" in proc.stdout


def test_offload_on_the_gpu_gives_full_checkpointing_grads_and_frees_the_block_inputs(one_rank_group):
    """activation_checkpointing: offload on CUDA (pinned host copies on a side stream, prefetched one
    block ahead): the gradients equal full checkpointing's to fp32 rounding, every block but the first of
    the backward finds its input prefetched, and the device's peak drops by most of the block inputs."""
    from distattn.train.config import ModelConfig
    from distattn.train.model.transformer import Transformer
    from distattn.train.model.offload import Offload

    cfg = ModelConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1024, vocab_size=256)
    torch.manual_seed(0)
    model = Transformer(cfg).cuda()
    n = 32768
    tokens = torch.randint(0, cfg.vocab_size, (n,), device="cuda")
    plan = distattn.plan([n // 2, n // 2], one_rank_group, device="cuda")
    pos = plan.position_ids("cuda")
    grads, peaks = {}, {}
    for mode in ("full", "offload"):
        model.zero_grad(set_to_none=True)
        offload = Offload(torch.device("cuda")) if mode == "offload" else None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        x = model.embed(tokens)
        for layer in model.layers:
            x = layer(x, pos, plan, mode, 0, offload)
        x.square().sum().backward()
        torch.cuda.synchronize()
        peaks[mode] = torch.cuda.max_memory_allocated() - base
        grads[mode] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert offload.stats()["prefetch_hits"] == cfg.n_layers - 1
    # Not bit for bit on CUDA: the recompute reads a fresh copy, and cuBLAS may pick another
    # algorithm for it (last-ulp differences seen on an H200). A lost or stale copy errs by O(1).
    for got, want in zip(grads["offload"], grads["full"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    block_input = n * cfg.dim * 4
    assert peaks["full"] - peaks["offload"] > (cfg.n_layers - 3) * block_input, (peaks, block_input)


def test_compiled_block_on_the_gpu_tracks_eager(one_rank_group):
    """``train.compile`` on CUDA (Triton or FlashAttention kernels inside distattn's custom op,
    inductor's kernels around it): a bf16 block's output and gradients track the eager block's
    (relative error below 2%), with no graph break."""
    from distattn.train.config import ModelConfig
    from distattn.train.model.transformer import Block

    cfg = ModelConfig(dim=512, n_layers=1, n_heads=8, n_kv_heads=4, ffn_dim=1024, vocab_size=256)
    torch.manual_seed(0)
    block = Block(cfg).cuda().bfloat16()
    n = 8192
    plan = distattn.plan([3000, 5192], one_rank_group, device="cuda")
    pos = plan.position_ids("cuda")
    x = torch.randn(n, cfg.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    results = {}
    for compiled in (False, True):
        if compiled:
            block.compile_parts()
        block.zero_grad(set_to_none=True)
        x.grad = None
        y = block(x, pos, plan, "full")
        y.float().square().mean().backward()
        results[compiled] = [y.detach().float(), x.grad.float(), *(p.grad.float() for p in block.parameters())]
    for got, want in zip(results[True], results[False]):
        assert (got - want).norm() <= 0.02 * want.norm(), ((got - want).norm(), want.norm())
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        explained = torch._dynamo.explain(Block(cfg).cuda().bfloat16().plain)(x.detach(), pos, plan, 0)
    assert explained.graph_break_count == 0, explained.break_reasons
