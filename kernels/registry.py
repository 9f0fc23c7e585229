"""Backend registry, input validation and the kernel entry points.

``attn_fwd``/``attn_bwd`` are the pinned, self-contained calls: they validate
their offsets (reading them back to the host) on every call. Schedulers call
``varlen_fwd``/``varlen_bwd`` with a :class:`~distattn.kernels.varlen.Varlen`
their plan validated and :func:`prepare`-d once, which launch without a host
synchronisation. The mask lives in the layout (a band per segment); the calls
add the softmax ``scale`` and the optional logit ``softcap``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from distattn.planning.masks import check_window
from distattn.kernels.merge import acc_dtype, add_sink, row_delta, sink_grad

from . import auto, torch_cuda
from .varlen import Varlen

# fwd(q, k, v, seg: Varlen, scale, softcap) -> (out, lse); softcap is None or a positive float.
# A backend with ``partials=True`` also takes ``partial=True`` (keyword) on fwd and bwd, and then returns
# out (fwd) and dq, dk, dv (bwd) in the accumulator dtype (fp32 for 16-bit inputs) instead of the inputs'.
FwdFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
# bwd(dout, q, k, v, out, lse, seg: Varlen, scale, softcap, delta) -> (dq, dk, dv);
# delta is None or rowsum(dout * out) [Tq, Hq] fp32, which a backend may use instead of computing it.
BwdFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
# prepare(seg, device): precompute what the backend derives from a layout (mask included), once.
PrepareFn = Callable[[Varlen, torch.device], object]


@dataclass(frozen=True)
class Backend:
    """A local attention implementation. ``devices``: device types it runs on (None: any).
    ``partials``: its fwd/bwd take ``partial=True`` and then store their results in the accumulator
    dtype (see :func:`varlen_fwd`); other backends' results are upcast after rounding."""

    name: str
    fwd: FwdFn
    bwd: BwdFn
    devices: frozenset[str] | None = None
    prepare: PrepareFn | None = None
    partials: bool = False


_BACKENDS: dict[str, Backend] = {}
# What "auto" tries, in order, per device type; the first registered one wins. On CUDA with triton
# registered, "auto" is the per-call dispatcher instead (:class:`AutoDispatch`).
_AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("torch", "reference")}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend under ``backend.name``."""
    if backend.name == "auto":
        raise ValueError("backend name 'auto' is reserved for automatic selection")
    _BACKENDS[backend.name] = backend


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


_ARCH: dict[torch.device, int] = {}


def device_arch(device: torch.device) -> int:
    """``major * 10 + minor`` of the CUDA device's compute capability (90: H100), asked once per device."""
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _ARCH:
        major, minor = torch.cuda.get_device_capability(device)
        _ARCH[device] = 10 * major + minor
    return _ARCH[device]


class AutoDispatch:
    """``backend="auto"`` on CUDA: each call runs ``triton`` or ``torch`` (PyTorch's FlashAttention-2),
    picked per direction by :meth:`pick`.

    ``torch`` is picked only when FlashAttention itself takes the call (:func:`torch_cuda.eligible`: fp16/bf16,
    one head dim, a multiple of 8 up to 256, no soft-cap, a band its window expresses; the rest would run the
    ``torch`` backend's slow plain-ops path) and the measured table (:func:`auto.choose`) says it is faster
    at this GPU's arch, head dim and direction.

    Deterministic runs never take FlashAttention's backward: PyTorch's FlashAttention-2 backward adds dQ with
    atomics, so its gradients may differ in the last bits run to run, while the Triton backward has no
    atomics (the AOT check proves it in SASS). So the backward is ``triton`` with ``deterministic=True``
    (:func:`varlen_fwd`/:func:`varlen_bwd`'s keyword, for a plan's ``deterministic=True``) and whenever
    torch's deterministic algorithms are on (``torch.use_deterministic_algorithms``, which
    ``train.deterministic`` sets): with ``warn_only=True`` FlashAttention's backward keeps its atomics, and
    without it PyTorch runs a slower deterministic variant the table did not measure. Forwards have no
    atomics in either backend: they follow the table in every mode.

    The price of FlashAttention's backward: with ``partial=True`` (every scheduler's calls) it stores each
    call's dq/dk/dv in the inputs' dtype, so they are rounded to bf16/fp16 once per call before the
    executor's fp32 sum, where triton stores fp32 partials (as ring-flash-attention sums flash-attn's
    varlen gradients). ``backend="triton"`` keeps the fp32 partials.

    ``arch``: the compute capability to use (tests); None: the device's (:func:`device_arch`). ``backends``:
    where ``"triton"``/``"torch"`` are looked up when a call runs (tests); None: the registry."""

    def __init__(self, arch: int | None = None, backends: Mapping[str, Backend] | None = None,
                 deterministic: bool = False):
        self.arch, self.deterministic = arch, deterministic
        self.backends = _BACKENDS if backends is None else backends

    def _arch(self, device: torch.device) -> int:
        return self.arch if self.arch is not None else device_arch(device)

    def pick(self, direction: str, q: torch.Tensor, v: torch.Tensor, seg: Varlen, softcap: float | None) -> str:
        """``"triton"`` or ``"torch"`` for a ``direction`` (``"fwd"``/``"bwd"``) call on q ``[Tq, Hq, Dqk]``,
        v ``[Tk, Hkv, Dv]`` over ``seg`` (see the class docstring)."""
        if direction not in auto.DIRECTIONS:
            raise ValueError(f"direction must be one of {auto.DIRECTIONS}, got {direction!r}")
        if direction == "bwd" and (self.deterministic or torch.are_deterministic_algorithms_enabled()):
            return auto.DEFAULT
        if "torch" not in self.backends or not torch_cuda.eligible(q, v, seg, softcap):
            return auto.DEFAULT
        return auto.choose(self._arch(q.device), q.shape[2], direction)

    def fwd(self, q, k, v, seg: Varlen, scale, softcap=None, partial: bool = False):
        impl = self.backends[self.pick("fwd", q, v, seg, softcap)]
        return _widened(impl, impl.fwd, partial, q, k, v, seg, scale, softcap)

    def bwd(self, dout, q, k, v, out, lse, seg: Varlen, scale, softcap=None, delta=None, partial: bool = False):
        impl = self.backends[self.pick("bwd", q, v, seg, softcap)]
        return _widened(impl, impl.bwd, partial, dout, q, k, v, out, lse, seg, scale, softcap, delta)

    def prepare(self, seg: Varlen, device: torch.device) -> None:
        """Prepare every backend the table may pick on ``device``'s arch, so no call builds anything; for a
        band FlashAttention cannot express, only triton (such calls never run FlashAttention)."""
        for name in sorted(auto.choices(self._arch(torch.device(device)))):
            impl = self.backends.get(name)
            if impl is None or impl.prepare is None or (name == "torch" and not torch_cuda.expressible(seg)):
                continue
            impl.prepare(seg, device)

    def backend(self) -> Backend:
        """This dispatcher as a :class:`Backend` named ``"auto"`` (it takes ``partial=True``: a picked backend
        without partials has its results upcast)."""
        return Backend("auto", self.fwd, self.bwd, devices=frozenset({"cuda"}), prepare=self.prepare, partials=True)


# the CUDA dispatchers, by deterministic (they look the backends up in the registry on every call)
_AUTO_CUDA = {flag: AutoDispatch(deterministic=flag).backend() for flag in (False, True)}


def resolve_backend(name: str, device: torch.device) -> Backend:
    """The backend that ``name`` means for tensors on ``device``; ``ValueError`` if none fits.

    ``"auto"``: on CUDA (with triton registered) the per-call dispatcher :class:`AutoDispatch`, which runs
    ``triton`` or ``torch`` per direction by the measured table in :mod:`distattn.kernels.auto`; on CPU
    ``torch``; elsewhere (or without triton) the first registered of ``_AUTO_ORDER``."""
    return _resolve(name, device)


def _resolve(name: str, device: torch.device, deterministic: bool = False) -> Backend:
    if name == "auto":
        if device.type == "cuda" and "triton" in _BACKENDS:
            return _AUTO_CUDA[bool(deterministic)]
        for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
            if candidate in _BACKENDS:
                return _BACKENDS[candidate]
        raise ValueError(f"backend='auto' found no kernel for device {device}; registered: {available_backends()}")
    if name not in _BACKENDS:
        raise ValueError(f"backend={name!r} is unknown; choose 'auto' or one of {available_backends()}")
    backend = _BACKENDS[name]
    if backend.devices is not None and device.type not in backend.devices:
        raise ValueError(f"backend={name!r} runs on {sorted(backend.devices)} tensors, not {device.type}; "
                         f"use backend='auto'")
    return backend


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """``ValueError`` unless q ``[T, Hq, Dqk]``, k ``[T', Hkv, Dqk]`` and v ``[T', Hkv, Dv]`` agree (dtype,
    device, GQA). V may have a head dim of its own (MLA: ``Dqk = 192``, ``Dv = 128``)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor [tokens, heads, head_dim], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.shape[2] < 1:
            raise ValueError(f"{name}'s head_dim must be >= 1, got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}): cast them to one dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k and v shapes differ in tokens or heads: {tuple(k.shape)} vs {tuple(v.shape)} (only "
                         f"their head dims may differ)")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"head_dim mismatch: q has {q.shape[2]}, k has {k.shape[2]} (q and k share a head dim; "
                         f"v may have its own)")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv}) for GQA/MQA")


def check_scale(scale: float | None, head_dim: int) -> float:
    """The softmax scale: ``scale``, a positive finite float (0 or less would flatten or invert every
    softmax row; NaN spreads), or ``1/sqrt(head_dim)`` for None; ``ValueError`` otherwise."""
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1 (q's last dimension), got {head_dim}")
    if scale is None:
        return head_dim ** -0.5   # (as every caller spelt it before: bit for bit the same scale)
    if isinstance(scale, bool) or not (isinstance(scale, numbers.Real) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float (the softmax's 1/sqrt(head_dim) by default, "
                         f"None for it), got {scale!r}")
    return float(scale)


def check_softcap(softcap: float | None) -> float | None:
    """``ValueError`` unless ``softcap`` is None or a positive finite float; returns it as float."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not (isinstance(softcap, (int, float)) and math.isfinite(softcap)
                                         and softcap > 0):
        raise ValueError(f"softcap must be a positive finite float (scores become softcap * tanh(score / "
                         f"softcap)) or None, got {softcap!r}")
    return float(softcap)


def check_sinks(sinks: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """``ValueError`` unless ``sinks`` is None or a floating-point ``[Hq]`` tensor on q's device."""
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor) or sinks.shape != (q.shape[1],) or not sinks.dtype.is_floating_point:
        shown = f"{tuple(sinks.shape)} {sinks.dtype}" if isinstance(sinks, torch.Tensor) else type(sinks).__name__
        raise ValueError(f"sinks must be a floating-point tensor [Hq] = [{q.shape[1]}] of logits, one per query "
                         f"head, got {shown}")
    if sinks.device != q.device:
        raise ValueError(f"sinks are on {sinks.device} but q is on {q.device}: move them to q's device")
    return sinks


def _layout(q, k, v, cu_seqlens_q, cu_seqlens_k, q_offset, causal, window) -> Varlen:
    """Validate the pinned kernel inputs into a layout (reads the offsets back: one sync)."""
    check_qkv(q, k, v)
    window = check_window(window)
    return Varlen.from_tensors(cu_seqlens_q, cu_seqlens_k, q_offset, q.shape[0], k.shape[0], bool(causal), window)


def _check_out(dout, out, q, v) -> None:
    shape = (*q.shape[:2], v.shape[2])
    if dout.shape != shape or out.shape != shape:
        raise ValueError(f"dout and out must have q's shape with v's head dim, [Tq, Hq, Dv] = {shape}, got "
                         f"{tuple(dout.shape)} and {tuple(out.shape)}")


def _check_layout(q, k, seg: Varlen) -> None:
    if not isinstance(seg, Varlen):
        raise ValueError(f"seg must be a distattn.kernels.Varlen, got {type(seg).__name__}")
    if q.shape[0] != seg.total_q or k.shape[0] != seg.total_k:
        raise ValueError(f"q/k have {q.shape[0]}/{k.shape[0]} rows but the layout covers "
                         f"{seg.total_q}/{seg.total_k}")


def prepare(seg: Varlen, device: torch.device | str, *, backend: str = "auto") -> None:
    """Copy ``seg`` (offsets and bands) to ``device`` and let the backend precompute from it, so
    that later :func:`varlen_fwd`/:func:`varlen_bwd` calls with it make no host synchronisation."""
    device = torch.device(device)
    seg.tensors(device)
    impl = resolve_backend(backend, device)
    if impl.prepare is not None:
        impl.prepare(seg, device)


def _widened(impl: Backend, fn: Callable, partial: bool, *args) -> tuple[torch.Tensor, ...]:
    """``fn(*args)``, every result in the accumulator dtype when ``partial`` (a forward's lse already is)."""
    if partial and impl.partials:
        return fn(*args, partial=True)
    results = fn(*args)
    return tuple(t.to(acc_dtype(args[0].dtype)) for t in results) if partial else results


def varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Varlen, *, scale: float,
               softcap: float | None = None, backend: str = "auto", partial: bool = False,
               deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward over a layout validated in advance (shape checks only, no sync).

    Args:
        q: ``[Tq, Hq, Dqk]``; k: ``[Tk, Hkv, Dqk]``; v: ``[Tk, Hkv, Dv]`` with ``Hq % Hkv == 0``;
            ``Tq``/``Tk`` = ``seg``'s totals.
        seg: the segments and their band mask (:class:`~distattn.kernels.Varlen`).
        scale: softmax scale (a positive float; :func:`attn_fwd` defaults it).
        softcap: None or ``c > 0``: scores ``s = scale * q.k`` become ``c * tanh(s / c)`` before masking.
        backend: as in :func:`attn_fwd`.
        partial: this call is one part of a result the caller merges or sums (a ring step, one of a
            query's key blocks): ``out`` comes back in the accumulator dtype (fp32 for 16-bit inputs),
            so the result is rounded to the inputs' dtype once, after the merge, not once per part.
            Backends that can store fp32 do (``triton``, ``reference``); the others' results are upcast.
        deterministic: the caller needs bitwise-equal results run to run (a plan's ``deterministic=True``).
            Every forward is deterministic; the keyword is here so that one set of keyword arguments
            serves :func:`varlen_fwd` and :func:`varlen_bwd`.

    Returns ``out [Tq, Hq, Dv]`` (q's dtype; fp32 when ``partial``), ``lse [Tq, Hq]`` (fp32; fp64 for
    fp64 inputs).
    """
    check_qkv(q, k, v)
    _check_layout(q, k, seg)
    softcap = check_softcap(softcap)
    impl = _resolve(backend, q.device, deterministic)
    with torch.no_grad():
        return _widened(impl, impl.fwd, partial, q, k, v, seg, scale, softcap)


def varlen_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
               lse: torch.Tensor, seg: Varlen, *, scale: float, softcap: float | None = None,
               backend: str = "auto", delta: torch.Tensor | None = None, partial: bool = False,
               deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward over a layout validated in advance; arguments as :func:`varlen_fwd`.

    ``out``/``lse`` are the rows' *final* ones (see :func:`attn_bwd`). ``delta``:
    ``rowsum(dout * out)`` ``[Tq, Hq]`` fp32 if the caller already has it (computed once per
    backward, not per block). ``dout``/``out``: ``[Tq, Hq, Dv]``. Returns ``dq [Tq, Hq, Dqk]``,
    ``dk [Tk, Hkv, Dqk]``, ``dv [Tk, Hkv, Dv]`` in the inputs' dtype, or in the accumulator dtype
    with ``partial=True`` (the caller sums them with other calls' gradients). ``deterministic``: the
    caller needs bitwise-equal gradients run to run: ``backend="auto"`` then runs no backward with
    atomics (:class:`AutoDispatch`); a backend named explicitly runs as named.
    """
    check_qkv(q, k, v)
    _check_layout(q, k, seg)
    softcap = check_softcap(softcap)
    _check_out(dout, out, q, v)
    for name, t in (("lse", lse), ("delta", delta)):
        if t is not None and t.shape != q.shape[:2]:
            raise ValueError(f"{name} must have shape [Tq, Hq] = {tuple(q.shape[:2])}, got {tuple(t.shape)}")
    if lse.dtype != acc_dtype(q.dtype):
        lse = lse.to(acc_dtype(q.dtype))
    impl = _resolve(backend, q.device, deterministic)
    with torch.no_grad():
        return _widened(impl, impl.bwd, partial, dout, q, k, v, out, lse, seg, scale, softcap, delta)


def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
             cu_seqlens_k: torch.Tensor, *, causal: bool = True, window: int | None = None,
             scale: float | None = None, backend: str = "auto", q_offset: torch.Tensor | None = None,
             softcap: float | None = None, sinks: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen attention forward over a packed batch of segments.

    Args:
        q: ``[Tq, Hq, Dqk]``; k: ``[Tk, Hkv, Dqk]``; v: ``[Tk, Hkv, Dv]`` with ``Hq % Hkv == 0``
            (GQA/MQA); V's head dim may differ from Q/K's (MLA).
        cu_seqlens_q, cu_seqlens_k: int ``[n_seg + 1]`` offsets. Segment ``i`` of q,
            ``q[cu_q[i]:cu_q[i+1]]``, attends to ``k/v[cu_k[i]:cu_k[i+1]]`` only.
        causal: bottom-right aligned: with ``m`` queries and ``n`` keys, query ``i``
            sits at key position ``i + n - m`` and sees keys at or before it.
        window: if set, a query at position ``p`` sees only keys ``j`` with ``|p - j| < window``.
        scale: softmax scale, default ``1/sqrt(Dqk)``.
        backend: ``"auto"`` (torch on CPU; on CUDA triton or torch per call and direction, by the
            measured table in :mod:`distattn.kernels.auto`), ``"triton"``, ``"torch"`` (PyTorch's own
            kernels: CPU flash attention, or FlashAttention-2 varlen on CUDA), ``"reference"``.
        q_offset: extension, int ``[n_seg]`` or None: shifts segment ``i``'s queries to key
            position ``r + n - m + q_offset[i]`` (positive: queries after the keys' end, as for
            a block of earlier keys in a ring). None means 0: bottom-right alignment.
        softcap: None or ``c > 0``: logit soft-capping (Gemma 2): scores ``s = scale * q.k``
            become ``c * tanh(s / c)`` before masking and softmax.
        sinks: None or ``[Hq]`` float logits (gpt-oss attention sinks): one extra key per head
            with score ``sinks[h]`` and value 0 in every row's softmax.

    Returns:
        ``out [Tq, Hq, Dv]`` in q's dtype and ``lse [Tq, Hq]`` (natural log; fp32, or fp64
        for fp64 inputs; with sinks, the sink is counted in it). Rows that see no key give
        ``out = 0`` and ``lse = -inf`` (``lse = sinks[h]`` with sinks).

    The geometry is a band per segment (:class:`~distattn.kernels.Varlen`); :func:`varlen_fwd`
    takes any band directly.
    """
    seg = _layout(q, k, v, cu_seqlens_q, cu_seqlens_k, q_offset, causal, window)
    sinks = check_sinks(sinks, q)
    out, lse = varlen_fwd(q, k, v, seg, scale=check_scale(scale, q.shape[2]), softcap=softcap, backend=backend)
    if sinks is not None:
        out, lse = add_sink(out, lse, sinks)
    return out, lse


def attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, *, causal: bool = True,
             window: int | None = None, scale: float | None = None, backend: str = "auto",
             q_offset: torch.Tensor | None = None, softcap: float | None = None,
             sinks: torch.Tensor | None = None):
    """Varlen attention backward; arguments as :func:`attn_fwd`.

    ``out``/``lse`` are the row's *final* output and log-sum-exp, which may come from
    merging several key blocks: the gradient returned is then this block's share
    (``P = exp(s - lse)``, ``Delta = rowsum(dout * out)``), so blocks can be
    differentiated independently and their dq summed. With ``sinks``, pass the ``out``/``lse``
    that :func:`attn_fwd` returned (sink included).

    ``dout``/``out``: ``[Tq, Hq, Dv]``. Returns ``dq [Tq, Hq, Dqk]``, ``dk [Tk, Hkv, Dqk]``, ``dv [Tk, Hkv, Dv]``
    in the inputs' dtype; with ``sinks`` also ``dsinks [Hq]`` in the sinks' dtype: ``(dq, dk, dv, dsinks)``.
    """
    seg = _layout(q, k, v, cu_seqlens_q, cu_seqlens_k, q_offset, causal, window)
    sinks = check_sinks(sinks, q)
    scale = check_scale(scale, q.shape[2])
    if sinks is None:
        return varlen_bwd(dout, q, k, v, out, lse, seg, scale=scale, softcap=softcap, backend=backend)
    _check_out(dout, out, q, v)
    if lse.shape != q.shape[:2]:
        raise ValueError(f"lse must have shape [Tq, Hq] = {tuple(q.shape[:2])}, got {tuple(lse.shape)}")
    delta = row_delta(dout, out)
    dq, dk, dv = varlen_bwd(dout, q, k, v, out, lse, seg, scale=scale, softcap=softcap, backend=backend,
                            delta=delta)
    return dq, dk, dv, sink_grad(delta, lse, sinks).to(sinks.dtype)
