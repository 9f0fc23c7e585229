"""``backend="auto"`` on CUDA: the measured table's rule (``distattn.kernels.auto``), when FlashAttention
(``torch`` on CUDA) may be picked at all, and the per-call dispatcher (``registry.AutoDispatch``) routing
forward and backward separately. CPU only: the dispatcher runs with an injected arch and fake backends
(or the CPU ones), and FlashAttention's eligibility is a function of shapes, dtypes and the layout."""

import pytest
import torch

from conftest import max_err, rand_qkv
from distattn.kernels import Backend, Varlen, auto, registry, resolve_backend, torch_cuda
from distattn.kernels.reference import BACKEND as REFERENCE

H100 = 90


# ---- the table and its rule -----------------------------------------------------------------------------

def test_the_rule_on_the_h100_table():
    assert auto.choose(H100, 128, "bwd") == "torch"
    assert auto.choose(H100, 128, "fwd") == "triton"
    assert auto.choose(H100, 64, "fwd") == "triton"
    assert auto.choose(H100, 64, "bwd") == "triton"
    assert auto.choose(H100, 96, "bwd") == "triton"     # largest row <= 96 is 64
    assert auto.choose(H100, 256, "bwd") == "torch"     # largest row <= 256 is 128
    assert auto.choose(H100, 256, "fwd") == "triton"
    assert auto.choose(H100, 32, "bwd") == "triton"     # below every row: the smallest (64)
    for arch in (80, 100, 120):                          # A100, Blackwell: nothing measured
        assert auto.choose(arch, 128, "bwd") == "triton"
    with pytest.raises(ValueError, match="direction"):
        auto.choose(H100, 128, "backward")


def test_rows_are_sourced_and_positive():
    assert auto.TABLE
    keys = [(r.arch, r.head_dim, r.direction) for r in auto.TABLE]
    assert len(keys) == len(set(keys))
    for row in auto.TABLE:
        assert row.source.strip() and row.direction in auto.DIRECTIONS
        assert {name for name, _ in row.tflops} == {"triton", "torch"}
        assert all(speed > 0 for _, speed in row.tflops)
        if row.direction == "bwd":
            assert "derived" in row.source


def test_each_rows_choice_is_its_faster_number():
    """Computed here from the rows, not with the module's helpers: at every row's own head dim (and just
    above it, below the next row) choose() returns the backend with the most TFLOP/s."""
    for row in auto.TABLE:
        speeds = dict(row.tflops)
        best = max(speeds, key=lambda name: (speeds[name], name == "triton"))
        assert auto.choose(row.arch, row.head_dim, row.direction) == best, row
        assert auto.choose(row.arch, row.head_dim + 8, row.direction) == best, row


def test_h100_numbers_are_the_reports_and_bwd_follows_from_fwd_and_fwd_bwd():
    measured = {(64, "triton"): (389, 337), (64, "torch"): (298, 295),
                (128, "triton"): (435, 272), (128, "torch"): (340, 309)}
    rows = {(r.head_dim, r.direction): dict(r.tflops) for r in auto.TABLE if r.arch == H100}
    assert set(rows) == {(64, "fwd"), (64, "bwd"), (128, "fwd"), (128, "bwd")}
    for (hd, name), (fwd, fwd_bwd) in measured.items():
        assert rows[hd, "fwd"][name] == fwd
        bwd = rows[hd, "bwd"][name]
        # timing identity: forward (1 unit of FLOPs) + backward (2.5 units) at their speeds = 3.5 units at f+b's
        assert 3.5 / (1 / fwd + 2.5 / bwd) == pytest.approx(fwd_bwd, rel=1e-9)
    approx = {(64, "triton"): 320, (64, "torch"): 294, (128, "triton"): 237, (128, "torch"): 298}
    for (hd, name), value in approx.items():
        assert rows[hd, "bwd"][name] == pytest.approx(value, abs=1)


def test_choices_are_what_choose_can_return():
    assert auto.choices(H100) == {"triton", "torch"}
    assert auto.choices(80) == {"triton"}


# ---- when FlashAttention may take a call ------------------------------------------------------------------

def _qv(hd=128, dtype=torch.bfloat16, dv=None, tokens=6):
    q = torch.zeros(tokens, 4, hd, dtype=dtype)
    v = torch.zeros(tokens, 2, hd if dv is None else dv, dtype=dtype)
    return q, v


SEG = Varlen.from_geometry([6], [6], True, None)            # bottom-right causal: a FlashAttention window
BEHIND = Varlen.from_geometry([6], [6], True, None, [-2])   # q_offset < 0: queries before their keys' end


def test_the_bands_flashattention_can_express():
    assert torch_cuda.expressible(SEG)
    assert torch_cuda.expressible(Varlen.from_geometry([6, 3], [6, 9], True, 4, [0, 3]))  # window, ring block
    assert not torch_cuda.expressible(BEHIND)
    with pytest.raises(ValueError, match="backend='triton'"):
        torch_cuda.windows(BEHIND)
    assert "flash-expressible" in BEHIND._cache   # computed once per layout


@pytest.mark.parametrize("case", ["softcap", "mla", "fp32", "fp64", "hd132", "hd264", "band"])
def test_what_flashattention_cannot_take_is_never_torch(case):
    q, v = _qv()
    seg, softcap = SEG, None
    assert torch_cuda.eligible(q, v, seg, softcap)
    if case == "softcap":
        softcap = 30.0
    elif case == "mla":
        q, v = _qv(hd=192, dv=128)
    elif case in ("fp32", "fp64"):
        q, v = _qv(dtype=getattr(torch, case.replace("fp", "float")))
    elif case == "hd132":                          # not a multiple of 8 (the table's 128 row says torch)
        q, v = _qv(hd=132)
    elif case == "hd264":                          # a multiple of 8 past FlashAttention's 256
        q, v = _qv(hd=264)
    else:
        seg = BEHIND
    assert not torch_cuda.eligible(q, v, seg, softcap)
    dispatch = registry.AutoDispatch(arch=H100, backends=_fakes())
    assert dispatch.pick("bwd", q, v, seg, softcap) == "triton"
    assert dispatch.pick("fwd", q, v, seg, softcap) == "triton"


def test_fp16_and_bf16_at_head_dim_128_take_flashattentions_backward():
    dispatch = registry.AutoDispatch(arch=H100, backends=_fakes())
    for dtype in (torch.float16, torch.bfloat16):
        q, v = _qv(dtype=dtype)
        assert dispatch.pick("bwd", q, v, SEG, None) == "torch"
        assert dispatch.pick("fwd", q, v, SEG, None) == "triton"
    q, v = _qv(hd=64)
    assert dispatch.pick("bwd", q, v, SEG, None) == "triton"
    q, v = _qv(hd=256)
    assert dispatch.pick("bwd", q, v, SEG, None) == "torch"
    q, v = _qv()
    assert registry.AutoDispatch(arch=80, backends=_fakes()).pick("bwd", q, v, SEG, None) == "triton"


def test_a_torch_without_flashattentions_window_ops_is_never_picked(monkeypatch):
    monkeypatch.setattr(torch_cuda, "_HAS_OPS", False)
    q, v = _qv()
    assert not torch_cuda.eligible(q, v, SEG, None)
    assert registry.AutoDispatch(arch=H100, backends=_fakes()).pick("bwd", q, v, SEG, None) == "triton"


def test_deterministic_runs_keep_the_triton_backward():
    q, v = _qv()
    assert registry.AutoDispatch(arch=H100, backends=_fakes(), deterministic=True).pick("bwd", q, v, SEG, None) \
        == "triton"
    dispatch = registry.AutoDispatch(arch=H100, backends=_fakes())
    assert dispatch.pick("bwd", q, v, SEG, None) == "torch"
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        for warn_only in (False, True):
            torch.use_deterministic_algorithms(True, warn_only=warn_only)
            assert dispatch.pick("bwd", q, v, SEG, None) == "triton"
            assert dispatch.pick("fwd", q, v, SEG, None) == "triton"
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    assert dispatch.pick("bwd", q, v, SEG, None) == "torch"
    # varlen_fwd/varlen_bwd's deterministic=True reaches the deterministic dispatcher
    cuda = torch.device("cuda")
    assert registry._resolve("auto", cuda, True).bwd.__self__.deterministic
    assert not registry._resolve("auto", cuda, False).bwd.__self__.deterministic


# ---- the dispatcher ---------------------------------------------------------------------------------------

def _fake(name, calls, partials):
    """A backend that records its calls and returns zeros in the inputs' dtype (fp32 when given partial=True)."""
    def fwd(q, k, v, seg, scale, softcap, partial=False):
        calls.append((name, "fwd", partial))
        dtype = torch.float32 if partial else q.dtype
        return torch.zeros(*q.shape[:2], v.shape[2], dtype=dtype), torch.zeros(q.shape[:2], dtype=torch.float32)

    def bwd(dout, q, k, v, out, lse, seg, scale, softcap, delta, partial=False):
        calls.append((name, "bwd", partial))
        dtype = torch.float32 if partial else q.dtype
        return tuple(torch.zeros(t.shape, dtype=dtype) for t in (q, k, v))

    def prepare(seg, device):
        calls.append((name, "prepare", seg))
    return Backend(name, fwd, bwd, prepare=prepare, partials=partials)


def _fakes(calls=None):
    calls = [] if calls is None else calls
    return {"triton": _fake("triton", calls, True), "torch": _fake("torch", calls, False)}


def _inputs(hd=128, dtype=torch.bfloat16):
    q, k, v = rand_qkv(6, 6, 4, 2, hd, dtype)
    return q, k, v, torch.ones_like(q), torch.zeros(6, 4)


def test_forward_and_backward_route_to_different_backends_at_h100_head_dim_128():
    calls = []
    impl = registry.AutoDispatch(arch=H100, backends=_fakes(calls)).backend()
    assert impl.name == "auto" and impl.partials
    q, k, v, dout, lse = _inputs()
    out, _ = impl.fwd(q, k, v, SEG, 0.1, None)
    grads = impl.bwd(dout, q, k, v, out, lse, SEG, 0.1, None, None)
    assert [c[:2] for c in calls] == [("triton", "fwd"), ("torch", "bwd")]
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    calls.clear()
    q, k, v, dout, lse = _inputs(hd=64)
    out, _ = impl.fwd(q, k, v, SEG, 0.1, None)
    impl.bwd(dout, q, k, v, out, lse, SEG, 0.1, None, None)
    assert [c[:2] for c in calls] == [("triton", "fwd"), ("triton", "bwd")]


def test_partial_results_are_fp32_whichever_backend_runs():
    calls = []
    impl = registry.AutoDispatch(arch=H100, backends=_fakes(calls)).backend()
    q, k, v, dout, lse = _inputs()
    out, lse_out = impl.fwd(q, k, v, SEG, 0.1, None, partial=True)
    grads = impl.bwd(dout, q, k, v, out.to(q.dtype), lse, SEG, 0.1, None, None, partial=True)
    # triton stores fp32 itself (partial passed on); torch has no partials: called plainly, then upcast
    assert calls == [("triton", "fwd", True), ("torch", "bwd", False)]
    assert out.dtype == torch.float32 and lse_out.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in grads)


def test_prepare_readies_what_the_table_may_pick_and_never_raises():
    calls = []
    dispatch = registry.AutoDispatch(arch=H100, backends=_fakes(calls))
    dispatch.prepare(SEG, torch.device("cpu"))
    assert sorted(c[0] for c in calls) == ["torch", "triton"]
    calls.clear()
    dispatch.prepare(BEHIND, torch.device("cpu"))   # FlashAttention cannot express it: triton only
    assert [c[0] for c in calls] == ["triton"]
    calls.clear()
    registry.AutoDispatch(arch=80, backends=_fakes(calls)).prepare(SEG, torch.device("cpu"))
    assert [c[0] for c in calls] == ["triton"]      # no row on sm_80: torch is never picked there
    # the real torch backend's prepare raises on such a band; the dispatcher's does not
    real = {"triton": _fake("triton", [], True), "torch": resolve_backend("torch", torch.device("cpu"))}
    with pytest.raises(ValueError, match="backend='triton'"):
        torch_cuda.groups(BEHIND, torch.device("cpu"))
    registry.AutoDispatch(arch=H100, backends=real).prepare(BEHIND, torch.device("cpu"))


def test_mixed_triton_forward_and_torch_backward_match_the_reference():
    """The dispatcher with the real CPU backends (triton under the interpreter, torch's CPU kernels):
    the forward's lse from one backend feeds the other's backward, and partial gradients come back fp32."""
    backends = {name: resolve_backend(name, torch.device("cpu")) for name in ("triton", "torch")}
    impl = registry.AutoDispatch(arch=H100, backends=backends).backend()
    seg = Varlen.from_geometry([5, 3], [5, 7], True, None, [0, 2])
    q, k, v = rand_qkv(8, 12, 2, 1, 128, torch.bfloat16, seed=3)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    scale = 128 ** -0.5
    assert impl.fwd.__self__.pick("bwd", q, v, seg, None) == "torch"
    out, lse = impl.fwd(q, k, v, seg, scale, None)
    grads = impl.bwd(dout, q, k, v, out, lse, seg, scale, None, None, partial=True)
    d = [t.double() for t in (q, k, v)]
    want_out, want_lse = REFERENCE.fwd(*d, seg, scale, None)
    want = REFERENCE.bwd(dout.double(), *d, want_out, want_lse, seg, scale, None, None)
    assert max_err(out, want_out) < 2e-2 and max_err(lse, want_lse) < 1e-2
    for got, ref in zip(grads, want):
        assert got.dtype == torch.float32 and max_err(got, ref) < 3e-2 * max(1.0, ref.abs().max().item())


# ---- resolve_backend -------------------------------------------------------------------------------------

def test_resolve_backend_keeps_cpu_and_explicit_names():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu) is registry._BACKENDS["torch"]
    for name in ("triton", "torch", "reference"):
        assert resolve_backend(name, cpu) is registry._BACKENDS[name]
        assert resolve_backend(name, cuda) is registry._BACKENDS[name]
    impl = resolve_backend("auto", cuda)
    assert impl.name == "auto" and impl.devices == frozenset({"cuda"}) and impl.partials
    assert "auto" not in registry.available_backends()
    with pytest.raises(ValueError, match="reserved"):
        registry.register_backend(Backend("auto", REFERENCE.fwd, REFERENCE.bwd))


def test_auto_without_triton_falls_back_as_before(monkeypatch):
    monkeypatch.delitem(registry._BACKENDS, "triton")
    assert resolve_backend("auto", torch.device("cuda")) is registry._BACKENDS["reference"]
    monkeypatch.delitem(registry._BACKENDS, "torch")
    assert resolve_backend("auto", torch.device("cpu")) is registry._BACKENDS["reference"]


def test_the_dispatcher_looks_backends_up_in_the_registry_when_called(monkeypatch):
    """A backend registered later under "torch" is what auto runs (nothing is bound at import)."""
    calls = []
    monkeypatch.setitem(registry._BACKENDS, "torch", _fake("torch", calls, False))
    q, k, v, dout, lse = _inputs()
    impl = resolve_backend("auto", torch.device("cuda"))
    monkeypatch.setattr(impl.bwd.__self__, "arch", H100)   # no GPU here to ask
    impl.bwd(dout, q, k, v, q, lse, SEG, 0.1, None, None)
    assert calls == [("torch", "bwd", False)]
