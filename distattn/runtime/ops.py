"""``distattn.attention`` as two ``torch.library`` custom ops, so ``torch.compile`` traces a model
through attention without a graph break (``train.compile``)::

    distattn::attention(q, k, v, sinks?, plan, scale, softcap?) -> Tensor[]
        [out, *saved]: out [S_local, Hq, Dv] (q's local order), then what the backward keeps
    distattn::attention_backward(dout, inputs Tensor?[5], saved Tensor[], plan, scale, softcap?,
                                 kv_shape SymInt[], kv_dtype) -> Tensor[]
        kv_shape: [T, Hkv, Dk, Dv] (k is [T, Hkv, Dk], v [T, Hkv, Dv])
        [dq, dk, dv] (+ dsinks with sinks)

The plan is an opaque *reference* object (``torch._library.opaque_object``; a *symbolic* custom class
since torch 2.14, the same thing renamed): a compiled graph takes
it as an input, and guards only on its runtime's :attr:`~distattn.runtime.plans.PlanRuntime.trace_key` (its
executor's structure), so the plan made for each step's documents reuses the graph.

An executor's saved state is nested tuples of tensors and plain values; the ops move its tensors as
one flat list (:func:`flatten`): those that are the op's own tensors (q, k, v, sinks, out) by
reference -- autograd keeps them -- and the rest as extra outputs. Everything that is not a tensor
(head counts, dtypes, where each tensor goes) is the *skeleton*, which the ops rebuild from shapes:
``Executor.saved_like`` makes the saved state's tensors empty, on the meta device in the backward and
as fake tensors when compiling. Each forward checks that what the executor saved has the skeleton
``saved_like`` predicts.

Sizes that change with the documents (``cad``'s worker buffers) are unbacked symbols in the graph,
not constants, so the next step's plan reuses it; dynamo traces such an op only with
``torch._dynamo.config.capture_dynamic_output_shape_ops = True`` (``train.compile`` sets it while
its blocks run: :class:`distattn.train.model.Compiled`). Every other scheduler's sizes are fixed by
the sequence length and the mesh.

On a torch without opaque objects the same two functions run inside a ``torch.autograd.Function``
(:data:`AVAILABLE` is False there; so does a ``cad`` prefetch, whose transfers are Python objects).
"""

from typing import NamedTuple, Optional

import torch

from .plans import Plan, PlanBase

try:
    from torch._library.opaque_object import MemberType
    # Private API: torch 2.14.1 has no public one. Opaque custom-op arguments came with
    # pytorch/pytorch#165004; torch 2.14 renamed register_opaque_type to register_custom_class and
    # typ="reference" to "symbolic", and the old names log "... is deprecated" once per process (per
    # rank), so they are used only on a torch without the new ones (2.13)
    try:
        from torch._library.opaque_object import register_custom_class as _register_custom_class
        _SYMBOLIC = "symbolic"
    except ImportError:
        from torch._library.opaque_object import register_opaque_type as _register_custom_class
        _SYMBOLIC = "reference"
    AVAILABLE = PlanBase is not object
except ImportError:
    AVAILABLE = False

KNOWN = ("q", "k", "v", "sinks", "out")   # the op's tensors a saved state may name by reference


class Ref(NamedTuple):
    """Where a saved tensor lives: ``KNOWN[index]``, or the op's new tensor ``index - len(KNOWN)``."""

    index: int


def flatten(saved, known: tuple, template) -> tuple[object, list[torch.Tensor]]:
    """``(skeleton, new tensors)`` of a saved state. ``template``: the skeleton expected (from
    :func:`_skeleton`, or None); where it names one of ``known`` and the saved tensor *is* that one,
    the skeleton names it too (position by position: ``attention(q, k, k, plan)`` passes one tensor
    as two). Every other tensor is listed once (made contiguous, as the fake kernel makes it: a
    compiled graph checks strides). No tensor may ride along in the skeleton, where autograd's
    saved-tensor hooks (checkpointing, offload) would not see it."""
    new: list[torch.Tensor] = []
    return _flatten(saved, template, known, [], new), new


def _flatten(x, template, known: tuple, seen: list, new: list) -> object:
    # a module-level function, not a closure: a recursive closure is a reference cycle, and it would
    # keep every tensor it saw alive until the garbage collector runs (measured: a checkpointed
    # block's recomputed q, k, v, out and lse outlived its backward)
    if isinstance(x, torch.Tensor):
        if isinstance(template, Ref):
            if template.index < len(known) and known[template.index] is x:
                return template
        else:   # no template (the meta tensors, all distinct): the first one it is
            for i, t in enumerate(known):
                if t is x:
                    return Ref(i)
        for j, t in enumerate(seen):
            if t is x:
                return Ref(len(known) + j)
        seen.append(x)
        new.append(x.contiguous())
        return Ref(len(known) + len(new) - 1)
    if isinstance(x, tuple):
        parts = template if isinstance(template, tuple) and len(template) == len(x) else (None,) * len(x)
        items = (_flatten(y, t, known, seen, new) for y, t in zip(x, parts))
        return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
    return x


def unflatten(skeleton, tensors: list) -> object:
    """Inverse of :func:`flatten`: ``tensors`` = known then new."""
    if isinstance(skeleton, Ref):
        return tensors[skeleton.index]
    if isinstance(skeleton, tuple):
        items = (unflatten(x, tensors) for x in skeleton)
        return type(skeleton)(*items) if hasattr(skeleton, "_fields") else tuple(items)
    return skeleton


def _uses(skeleton, index: int) -> bool:
    if isinstance(skeleton, Ref):
        return skeleton.index == index
    return isinstance(skeleton, tuple) and any(_uses(x, index) for x in skeleton)


def _saved_like(plan: Plan, known: tuple, size) -> object:
    """The executor's saved state for these op tensors, as empty tensors (``size``: a plan-decided
    count -> the size to use). Under a local order the executor sees reordered copies."""
    q, k, v, sinks, out = known
    runtime = plan._live("attention")
    if runtime.local_order is not None:
        q, k, v, out = (t.new_empty(t.shape) for t in (q, k, v, out))
    return runtime.executor.saved_like(q, k, v, out, sinks, size)


def _kv_shape(k: torch.Tensor, v: torch.Tensor) -> list[int]:
    """``[T, Hkv, Dk, Dv]``: k's and v's shapes in one list (the backward op's ``kv_shape``)."""
    return [*k.shape, v.shape[-1]]


def _meta_known(rows: int, heads: int, dtype, kv_shape, kv_dtype, sinks) -> tuple:
    """Empty q, k, v, sinks, out on the meta device: q ``[rows, heads, Dk]``, out ``[rows, heads, Dv]``."""
    meta = torch.device("meta")
    t, hkv, dk, dv = kv_shape
    q = torch.empty((rows, heads, dk), dtype=dtype, device=meta)
    k, v = (torch.empty((t, hkv, d), dtype=kv_dtype, device=meta) for d in (dk, dv))
    s = None if sinks is None else torch.empty(sinks.shape, dtype=sinks.dtype, device=meta)
    return q, k, v, s, torch.empty((rows, heads, dv), dtype=dtype, device=meta)


def _expected(plan: Plan, known: tuple, kv_shape=None, kv_dtype=None) -> tuple[object, list[torch.Tensor]]:
    """The skeleton of the executor's saved state for inputs shaped as ``known``, and its new
    tensors (on the meta device). In the backward ``known`` has dout for q and no k, v: their
    shapes come as ``kv_shape`` (:func:`_kv_shape`) and ``kv_dtype``."""
    q, k, v, sinks, _ = known
    if kv_shape is None:
        kv_shape, kv_dtype = _kv_shape(k, v), k.dtype
    meta = _meta_known(*q.shape[:2], q.dtype, kv_shape, kv_dtype, sinks)
    return flatten(_saved_like(plan, meta, int), meta, None)


def _skeleton(plan: Plan, known: tuple, kv_shape=None, kv_dtype=None) -> object:
    return _expected(plan, known, kv_shape, kv_dtype)[0]


def forward(q, k, v, sinks, plan: Plan, scale: float, softcap, prefetch=None) -> list[torch.Tensor]:
    """``[out, *new saved tensors]`` (see module docstring)."""
    runtime = plan._live("attention")
    runtime.check_inputs(q, k, v, sinks=sinks, softcap=softcap)
    qc, kc, vc = runtime.to_compute_order(q, k, v)
    extra = {} if prefetch is None else {"prefetch": prefetch}
    out_c, saved = runtime.executor.forward(qc, kc, vc, scale, softcap, sinks, **extra)
    (out,) = _distinct(runtime.to_compute_order(out_c, back=True))
    known = (q, k, v, sinks, out)
    template, like = _expected(plan, known)
    skeleton, new = flatten(saved, known, template)
    assert skeleton == template and [(t.shape, t.dtype) for t in new] == [(t.shape, t.dtype) for t in like], \
        (skeleton, template)   # saved_like (what compiling traces) describes what the executor saved
    return [out, *new]


def backward(dout, known: list, new: list, plan: Plan, scale: float, softcap, kv_shape, kv_dtype
             ) -> list[torch.Tensor]:
    """``[dq, dk, dv]`` (+ ``dsinks`` in sinks' dtype); ``known``: the op's tensors the saved state
    names (None where it does not)."""
    sinks = known[3]
    skeleton = _skeleton(plan, (dout, None, None, sinks, None), kv_shape, kv_dtype)
    saved = unflatten(skeleton, [*known, *new])
    runtime = plan._live("attention")
    (dout_c,) = runtime.to_compute_order(dout)
    dq, dk, dv, dsinks = runtime.executor.backward(dout_c.contiguous(), saved, scale, softcap, sinks)
    grads = _distinct(runtime.to_compute_order(dq, dk, dv, back=True))
    return grads if sinks is None else [*grads, dsinks.to(sinks.dtype)]


def _distinct(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` as the fake kernels describe them, contiguous and each on its own storage (an op's
    outputs may not alias each other; dK and dV can be halves of one accumulator)."""
    seen, out = set(), []
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        out.append(t.clone(memory_format=torch.contiguous_format) if ptr in seen else t.contiguous())
        seen.add(ptr)
    return out


def _real(plan):
    """The plan inside a compile-time stand-in (``FakeScriptObject``), or the plan itself."""
    return getattr(plan, "real_obj", plan)


def _saved_for_backward(ctx, known: tuple, new: list, plan, scale, softcap) -> None:
    """Keep for the backward: the op's tensors the saved state names (sinks always: the backward
    takes them; the others None), then the new ones."""
    ctx.plan, ctx.scale, ctx.softcap = plan, scale, softcap
    ctx.kv_shape, ctx.kv_dtype = _kv_shape(known[1], known[2]), known[1].dtype
    skeleton = _skeleton(_real(plan), known)
    ctx.save_for_backward(*(t if i == 3 or _uses(skeleton, i) else None for i, t in enumerate(known)), *new)


class Attention(torch.autograd.Function):
    """The same forward and backward without the ops (a ``cad`` prefetch; a torch without opaque
    objects)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, plan: Plan, scale: float, softcap, prefetch):
        out, *new = forward(q, k, v, sinks, plan, scale, softcap, prefetch)
        _saved_for_backward(ctx, (q, k, v, sinks, out), new, plan, scale, softcap)
        return out

    @staticmethod
    def backward(ctx, dout):
        tensors, n = ctx.saved_tensors, len(KNOWN)
        grads = backward(dout, list(tensors[:n]), list(tensors[n:]), ctx.plan, ctx.scale, ctx.softcap, ctx.kv_shape,
                         ctx.kv_dtype)
        return *grads[:3], (grads[3] if len(grads) > 3 else None), None, None, None, None


if AVAILABLE:
    # guard a compiled graph on what shapes the fake kernels' outputs, not on the plan object
    # (batch_size, read before the op, is part of the trace key; a dry plan's attention refuses in the op)
    _register_custom_class(Plan, typ=_SYMBOLIC,
                           guard_fn=lambda plan: [None if plan._runtime is None else plan._runtime.trace_key],
                           members={"batch_size": MemberType.USE_REAL})

    @torch.library.custom_op("distattn::attention", mutates_args=())
    def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: Optional[torch.Tensor], plan: Plan,
                     scale: float, softcap: Optional[float]) -> list[torch.Tensor]:
        return forward(q, k, v, sinks, plan, scale, softcap)

    @attention_op.register_fake
    def _(q, k, v, sinks, plan, scale, softcap):
        real = _real(plan)
        real._live("attention").check_local_qkv(q, k, v)
        ctx = torch.library.get_ctx()
        out = q.new_empty((*q.shape[:2], v.shape[2]))
        known = (q, k, v, sinks, out)
        saved = _saved_like(real, known, lambda n: ctx.new_dynamic_size())
        return [out, *flatten(saved, known, _skeleton(real, known))[1]]

    @torch.library.custom_op("distattn::attention_backward", mutates_args=())
    def attention_backward_op(dout: torch.Tensor, known: list[Optional[torch.Tensor]], new: list[torch.Tensor],
                              plan: Plan, scale: float, softcap: Optional[float], kv_shape: list[int],
                              kv_dtype: torch.dtype) -> list[torch.Tensor]:
        return backward(dout, known, new, plan, scale, softcap, kv_shape, kv_dtype)

    @attention_backward_op.register_fake
    def _(dout, known, new, plan, scale, softcap, kv_shape, kv_dtype):
        t, hkv, dk, dv = kv_shape
        dk_dv = [dout.new_empty((t, hkv, d), dtype=kv_dtype) for d in (dk, dv)]
        sinks = known[3]
        return [dout.new_empty((*dout.shape[:2], dk)), *dk_dv, *([] if sinks is None else [torch.empty_like(sinks)])]

    @torch._dynamo.disable   # run as it is where dynamo meets it as a frame of its own (after a graph break)
    def _setup_context(ctx, inputs, output):
        q, k, v, sinks, plan, scale, softcap = inputs
        out, *new = output
        _saved_for_backward(ctx, (q, k, v, sinks, out), new, plan, scale, softcap)
        ctx.mark_non_differentiable(*new)
        ctx.set_materialize_grads(False)   # no zeros for the saved tensors' (absent) gradients

    def _backward(ctx, grads):
        dout = grads[0]
        if dout is None:
            return None, None, None, None, None, None, None
        tensors = ctx.saved_tensors
        n = len(KNOWN)
        out = attention_backward_op(dout, list(tensors[:n]), list(tensors[n:]), ctx.plan, ctx.scale, ctx.softcap,
                                    ctx.kv_shape, ctx.kv_dtype)
        return *out[:3], (out[3] if len(out) > 3 else None), None, None, None

    attention_op.register_autograd(_backward, setup_context=_setup_context)

# each op's Python body, for tools that must see the tensors made inside it (a TorchDispatchMode
# sees the op alone: distattn.bench.memtrack)
IMPLEMENTATIONS = {torch.ops.distattn.attention.default: forward,
                   torch.ops.distattn.attention_backward.default: backward} if AVAILABLE else {}


def apply(q, k, v, sinks, plan: Plan, scale: float, softcap, prefetch=None) -> torch.Tensor:
    """Differentiable ``out`` through the op, or through :class:`Attention` where the op cannot go."""
    if AVAILABLE and prefetch is None:
        return attention_op(q, k, v, sinks, plan, scale, softcap)[0]
    return Attention.apply(q, k, v, sinks, plan, scale, softcap, prefetch)
