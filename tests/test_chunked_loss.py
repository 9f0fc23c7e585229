"""chunked_cross_entropy: exact in fp64, no worse than the plain loss in bf16, never a [T, V] tensor,
ValueError for bad inputs; and a smoke run of its memory benchmark."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from distattn.bench.loss_memory import LiveBytes, _child, main as bench_main, measure
from distattn.train.model.loss import chunked_cross_entropy


def make(t, d, v, dtype=torch.float64, ignored=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(t, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (t,), generator=g)
    labels[list(ignored)] = -100
    return h, w, labels


def loss_and_grads(fn, h, w, labels, scale=1.0):
    h.grad = w.grad = None
    loss = fn(h, w, labels)
    (loss * scale).backward()
    return loss.detach(), h.grad.clone(), w.grad.clone()


def plain(h, w, labels):
    return F.cross_entropy((h @ w.T).float(), labels, ignore_index=-100, reduction="sum")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


T = 37
# tokens 0..6 all ignored (a whole chunk when chunk=7), plus scattered ones; 37 = 5 * 7 + 2 (ragged)
IGNORED = [0, 1, 2, 3, 4, 5, 6, 10, 20, 36]


@pytest.mark.parametrize("chunk", [1, 7, T, T + 5])
def test_fp64_matches_plain_loss_exactly(chunk):
    h, w, labels = make(T, 16, 50, ignored=IGNORED)
    ref = loss_and_grads(lambda *a: F.cross_entropy(a[0] @ a[1].T, a[2], ignore_index=-100, reduction="sum"),
                         h, w, labels, scale=2.5)
    got = loss_and_grads(lambda *a: chunked_cross_entropy(*a, chunk=chunk), h, w, labels, scale=2.5)
    assert got[0].dtype == torch.float64 and got[0].dim() == 0
    assert got[1].dtype == got[2].dtype == torch.float64
    for g, r in zip(got, ref):
        assert rel(g, r) <= 1e-12
    assert got[1][:7].abs().max() == 0  # ignored tokens get no gradient


def test_edge_cases_empty_all_ignored_and_partial_grads():
    h, w, labels = make(0, 8, 11)
    loss, gh, gw = loss_and_grads(chunked_cross_entropy, h, w, labels)
    assert loss.item() == 0 and gh.shape == (0, 8) and gw.abs().max() == 0
    h, w, labels = make(5, 8, 11, ignored=range(5))
    loss, gh, gw = loss_and_grads(lambda *a: chunked_cross_entropy(*a, chunk=64), h, w, labels)
    assert loss.item() == 0 and gh.abs().max() == 0 and gw.abs().max() == 0
    h, w, labels = make(9, 8, 11)
    w.requires_grad_(False)
    chunked_cross_entropy(h, w, labels, chunk=4).backward()
    assert h.grad is not None and w.grad is None
    with torch.no_grad():
        assert chunked_cross_entropy(h, w, labels, chunk=4).item() == pytest.approx(plain(h, w, labels).item())


def max_errors(got, ref):
    return [(g.double() - r).abs().max().item() for g, r in zip(got, ref)]


@pytest.mark.parametrize("path", ["bf16 inputs", "fp32 inputs, bf16 compute"])
def test_bf16_error_at_most_twice_the_plain_loss(path):
    """flash-attention's rule: error vs fp64 (same rounded inputs) <= 2x the plain loss's error
    computed in the same precision (the trainer's two bf16 paths: FSDP2 bf16 params, DDP autocast)."""
    t, d, v, chunk = 300, 64, 1000, 64
    dtype = torch.bfloat16 if path == "bf16 inputs" else torch.float32
    h, w, labels = make(t, d, v, dtype=dtype, ignored=range(0, t, 9), seed=3)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = loss_and_grads(plain, h64, w64, labels, scale=0.01)
    if dtype == torch.bfloat16:
        base = loss_and_grads(plain, h, w, labels, scale=0.01)
        mine = loss_and_grads(lambda *a: chunked_cross_entropy(*a, chunk=chunk), h, w, labels, scale=0.01)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            base = loss_and_grads(plain, h, w, labels, scale=0.01)
            # autocast stays on around the call, as in a model forward: the function must not care
            mine = loss_and_grads(lambda *a: chunked_cross_entropy(*a, chunk=chunk, compute_dtype=torch.bfloat16),
                                  h, w, labels, scale=0.01)
    assert mine[0].dtype == torch.float32 and mine[1].dtype == mine[2].dtype == dtype
    for name, e_mine, e_base in zip(["loss", "grad_hidden", "grad_weight"], max_errors(mine, ref), max_errors(base, ref)):
        assert e_mine <= 2 * e_base, (name, e_mine, e_base)


def test_compute_dtype_fp32_is_not_recast_by_autocast():
    h, w, labels = make(20, 8, 30, dtype=torch.float32)
    exact = chunked_cross_entropy(h, w, labels, chunk=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = chunked_cross_entropy(h, w, labels, chunk=6)
    assert under.item() == exact.item()


@pytest.mark.parametrize("bad, name", [
    (dict(hidden_TD=torch.zeros(4, 8, 2)), "hidden_TD"),
    (dict(hidden_TD=torch.zeros(4, 8, dtype=torch.long)), "hidden_TD"),
    (dict(weight_VD=torch.zeros(10, 7)), "weight_VD"),
    (dict(weight_VD=torch.zeros(10)), "weight_VD"),
    (dict(labels_T=torch.zeros(5, dtype=torch.long)), "labels_T"),
    (dict(labels_T=torch.zeros(4)), "labels_T"),
    (dict(labels_T=torch.tensor([0, 1, 10, 2])), "labels_T"),
    (dict(labels_T=torch.tensor([0, -1, 3, 2])), "labels_T"),
    (dict(chunk=0), "chunk"),
    (dict(chunk=-3), "chunk"),
    (dict(chunk=2.0), "chunk"),
    (dict(compute_dtype=torch.int32), "compute_dtype"),
])
def test_bad_inputs_raise_value_error(bad, name):
    args = dict(hidden_TD=torch.zeros(4, 8), weight_VD=torch.zeros(10, 8), labels_T=torch.tensor([0, -100, 9, 2]))
    args.update(bad)
    with pytest.raises(ValueError, match=name):
        chunked_cross_entropy(**args)


class LargestOutput(TorchDispatchMode):
    """The most elements any op's output tensor has (forward and backward both dispatch here)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_no_tensor_of_tokens_times_vocab(device):
    t, d, v, chunk = 1000, 8, 500, 64  # d < chunk, so the [V, D] weight gradient is below chunk * V too
    h, w, labels = make(t, d, v, dtype=torch.float32, ignored=range(0, t, 5))
    h, w, labels = (x.detach().to(device).requires_grad_(x.requires_grad) for x in (h, w, labels))
    with LargestOutput() as biggest, LiveBytes(h, w, labels) as live:
        base = live.now()
        chunked_cross_entropy(h, w, labels, chunk=chunk).backward()
    assert biggest.largest <= chunk * v
    assert live.largest <= chunk * v * 4
    # one chunk's fp32 logits and their exp, the gradients, the row log-sum-exps: far below T x V
    assert live.peak - base <= 3 * chunk * v * 4 + 2 * (t + v) * d * 4 + 16 * t
    with LargestOutput() as biggest:  # the detector does see the plain loss's [T, V] logits
        plain(h, w, labels).backward()
    assert biggest.largest >= t * v


def test_memory_bench_smoke(capsys):
    out = bench_main(["--tokens", "512", "--vocab", "1000", "--hidden", "16", "--chunk", "64",
                      "--validate-tokens", "--gpu-gib", "0.01", "--json"])
    plain_row, chunked_row = out["full_size"]
    assert plain_row["largest_shape"] == [512, 1000] and chunked_row["extra_bytes"] < plain_row["extra_bytes"] / 3
    fits = {f["method"]: f for f in out["max_tokens"]}
    assert fits["plain"]["fit_error_bytes"] == fits["chunked"]["fit_error_bytes"] == 0
    assert fits["chunked"]["max_tokens"] > fits["plain"]["max_tokens"]
    # the real-tensor run, here in-process (the bench starts a fresh interpreter for it, whose
    # torch import would double this test's time): the tracker sees the same ops on meta and real
    # tensors; RSS is only printed by the bench (page-level noise at this size)
    capsys.readouterr()
    _child("chunked", 256, 1000, 8, 64, "fp32")
    real = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    meta = measure("chunked", 256, 1000, 8, 64, torch.float32)
    assert real["real_tracker_extra_bytes"] == meta["extra_bytes"] > 0
