"""``ulysses``: all-to-all from sequence shards to head shards (DeepSpeed-Ulysses, Jacobs et al. 2023).

Its own layout gives rank ``r`` a contiguous shard of ``S/P`` tokens (sizes differ by at most
one); any layout works (:mod:`distattn.planning.layout`). Forward, with ``P`` ranks::

    q [S/P, Hq, D] --all-to-all--> [S, Hq_r, D] --varlen attention over all documents-->
    out [S, Hq_r, D] --all-to-all--> [S/P, Hq, D]

K and V travel with Q in the same all-to-all. Backward repeats the pattern on
the gradients. Attention is exact and any mask works, since each rank sees
whole documents for its heads. The all-to-all concatenates the ranks' tokens in rank order; when
that is not global order (any layout but the contiguous one) the head shards are permuted into
global order once after it and back once before the return (:meth:`UlyssesSchedule.gather_order`).

Heads do not have to divide ``P``: rank ``r`` gets ``ceil(Hq/P)`` or
``floor(Hq/P)`` query heads. Each rank receives exactly the KV heads its query
heads use; with ``Hkv < P`` (GQA/MQA) a KV head therefore goes to several
ranks, and its dK/dV are summed over those replicas (in fp32) on the way back.
Only ``Hq < P`` is refused: some ranks would have no head at all.

:class:`HeadLayout` and :func:`head_exchange_program` describe the all-to-all
for any group of ranks; ``usp`` reuses them inside its Ulysses groups. The
executor is :class:`distattn.executors.head_a2a.HeadExecutor`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..planning.layout import Shards
from ..planning.masks import MaskSlice, mask_area
from ..planning.program import Builder, Program
from ..planning.schedule import AttnShape, Phase, Schedule, attention_program
from .blocks import KernelCall, sequence_calls

HeadRanges = tuple[tuple[int, int], ...]


def split_heads(num_heads: int, parts: int) -> HeadRanges:
    """Contiguous head ranges, the first ``num_heads % parts`` one head larger."""
    small, extra = divmod(num_heads, parts)
    sizes = [small + 1] * extra + [small] * (parts - extra)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return tuple((int(a), int(a + n)) for a, n in zip(starts, sizes))


@dataclass(frozen=True)
class HeadLayout:
    """Which query heads, and so which KV heads, each rank of a Ulysses group computes."""

    q: HeadRanges
    kv: HeadRanges

    @staticmethod
    def build(num_heads: int, num_kv_heads: int, parts: int) -> "HeadLayout":
        if num_heads < parts:
            raise ValueError(f"ulysses splits query heads over ranks: {num_heads} heads cannot cover {parts} "
                             f"ranks; use a Ulysses degree <= {num_heads} (scheduler='usp' with a "
                             f"ulysses_degree <= {num_heads} dividing the world size) or a ring scheduler")
        group = num_heads // num_kv_heads
        q = split_heads(num_heads, parts)
        kv = tuple((a // group, (b - 1) // group + 1) for a, b in q)
        return HeadLayout(q, kv)

    def share(self, rank: int) -> int:
        return self.q[rank][1] - self.q[rank][0]

    def kv_share(self, rank: int) -> int:
        return self.kv[rank][1] - self.kv[rank][0]

    @property
    def kv_replicated(self) -> bool:
        """Whether some KV head goes to several ranks (more ranks than KV heads, or groups split):
        their dK/dV copies are summed after the all-to-all back, so they travel in fp32."""
        return any(b > a for (_, b), (a, _) in zip(self.kv, self.kv[1:]))

    def expansion(self, rank: int, group: int) -> tuple[int, ...] | None:
        """How many local query heads use each local KV head, in order, when the kernel's native
        GQA grouping (``i // (hq / hkv)``) does not already pair them; None when it does."""
        (a, b), (lo, hi) = self.q[rank], self.kv[rank]
        want = np.arange(a, b) // group - lo
        hq, hkv = b - a, hi - lo
        if hq % hkv == 0 and (want == np.arange(hq) // (hq // hkv)).all():
            return None
        return tuple(int(c) for c in np.bincount(want, minlength=hkv))

    def computed_kv_heads(self, rank: int, group: int) -> int:
        """KV heads the rank's attention runs on: one per query head when they had to be expanded."""
        return self.share(rank) if self.expansion(rank, group) is not None else self.kv_share(rank)


def group_ranges(q: HeadRanges, groups: int) -> list[HeadRanges]:
    """Head group ``g``'s query heads of every member: part ``g`` of ``groups`` contiguous parts of
    each member's range (``head_groups``). ``ValueError`` when a member has fewer heads than parts."""
    fewest = min(b - a for a, b in q)
    if groups > fewest:
        raise ValueError(f"head_groups={groups}: a Ulysses rank computes only {fewest} query head(s) of this "
                         f"model, and each head group needs one of them; use head_groups <= {fewest}")
    parts = [split_heads(b - a, groups) for a, b in q]
    return [tuple((a + lo, a + hi) for (a, _), (lo, hi) in zip(q, (p[g] for p in parts))) for g in range(groups)]


def check_head_groups(head_groups) -> int:
    """``head_groups`` as given to ``distattn.plan`` (``ulysses``, ``usp``): a positive int."""
    if isinstance(head_groups, bool) or not isinstance(head_groups, int) or head_groups < 1:
        raise ValueError(f"head_groups must be a positive int (query heads moved and computed 1/head_groups "
                         f"of a rank's share at a time; 1: all at once), got {head_groups!r}")
    return head_groups


def gathered_order(shards: Shards, members) -> np.ndarray | None:
    """Where each token of the inner order (increasing global order of the members' tokens) sits in
    the head all-to-all's buffer (the members' compute-order tokens, concatenated in member order);
    None when the two agree."""
    gathered = np.concatenate([shards.compute_tokens(r) for r in members])
    if gathered.size < 2 or (np.diff(gathered) > 0).all():
        return None
    return np.argsort(gathered, kind="stable").astype(np.int64)


def head_saved_bytes(shape: AttnShape, tokens, members: int) -> np.ndarray:
    """Bytes member ``u`` of a Ulysses group keeps for backward, given the ``tokens[i]`` its head
    shard spans: q, out and lse of its query heads, k and v of its KV heads (expanded again in
    backward where GQA grouping needs it: :func:`head_buffer_bytes`)."""
    layout = HeadLayout.build(shape.num_heads, shape.num_kv_heads, members)
    return np.asarray([n * (shape.row_bytes(2 * layout.share(u) + 2 * layout.kv_share(u))
                            + layout.share(u) * shape.acc_bytes) for n, u in tokens], dtype=np.int64)


def head_buffer_bytes(shape: AttnShape, tokens, members: int, head_groups: int) -> np.ndarray:
    """Bytes member ``u`` of a Ulysses group holds in its head exchange beyond what attention saves
    (its head shards of q, k, v and out), given the ``tokens[i]`` its head shard spans: backward's
    head shard of the output gradient, for its largest head group, and that group's K/V expanded to
    its query heads where GQA grouping needs it."""
    layout = HeadLayout.build(shape.num_heads, shape.num_kv_heads, members)
    group = shape.num_heads // shape.num_kv_heads

    def heads(u: int) -> int:
        part = -(-layout.share(u) // head_groups)
        return part * (3 if layout.expansion(u, group) is not None else 1)

    return np.asarray([n * shape.row_bytes(heads(u)) for n, u in tokens], dtype=np.int64)


def head_grad_bytes(shape: AttnShape, tokens, members: int, head_groups: int) -> np.ndarray:
    """Member ``u``'s backward working set on its head shard (``tokens[i]`` rows): the inner
    attention's fp32 accumulators and one kernel call's gradients, for one head group's query
    heads and every KV head it computes."""
    layout = HeadLayout.build(shape.num_heads, shape.num_kv_heads, members)
    return np.asarray([n * 2 * shape.row_bytes(-(-layout.share(u) // head_groups) + 2 * layout.kv_share(u), acc=True)
                       for n, u in tokens], dtype=np.int64)


def part_heads(a: int, b: int, group: int) -> tuple[tuple[int, int], tuple[int, ...] | None]:
    """For query heads ``[a, b)`` (``group`` query heads per KV head): the KV heads ``(lo, hi)`` they
    use and how many query heads use each, when the kernel's GQA grouping does not already pair
    them (:meth:`HeadLayout.expansion`; None when it does)."""
    kv = (a // group, (b - 1) // group + 1)
    return kv, HeadLayout(((a, b),), (kv,)).expansion(0, group)


def head_parts(shape: AttnShape, members: int, head_groups: int) -> list[list[tuple[int, int]]]:
    """Per head group ``g`` and member ``u``: ``(query heads, KV heads the inner attention runs on)``
    -- one KV head per query head where they had to be expanded (:func:`part_heads`)."""
    layout = HeadLayout.build(shape.num_heads, shape.num_kv_heads, members)
    group = shape.num_heads // shape.num_kv_heads
    out = []
    for ranges in group_ranges(layout.q, head_groups):
        row = []
        for a, b in ranges:
            (lo, hi), expand = part_heads(a, b, group)
            row.append((b - a, b - a if expand is not None else hi - lo))
        out.append(row)
    return out


def head_exchange_program(shape: AttnShape, tokens: np.ndarray, ranks: np.ndarray, span: int, head_groups: int,
                          inner, what: str) -> Program:
    """Attention wrapped in head all-to-alls (:class:`distattn.executors.head_a2a.HeadExecutor`'s
    order): groups ``g`` of ``U`` members, member ``u`` of group ``g`` holding ``tokens[g, u]`` tokens
    and being rank ``ranks[g, u]``. Forward: K and V to heads (two all-to-alls, started together),
    then per head group: its Q to heads, ``inner(part)`` -- the program computed on the head shards,
    over every rank -- and its out back; backward: per head group dout to heads, the inner backward,
    dQ back, then dK and dV back together. A member sends its tokens of the others' heads, and
    the others' tokens of its own heads back. Stages: K/V and the first group's Q start at
    ``dispatch`` and the last group's out ends at ``finish``; the first group's dout starts at
    ``start_backward`` and the last dQ and dK/dV end at ``finish_backward`` -- under nano-batches
    they hide behind the other nano-batch's layers."""
    layout = HeadLayout.build(shape.num_heads, shape.num_kv_heads, tokens.shape[1])
    kv = np.asarray([layout.kv_share(u) for u in range(tokens.shape[1])], dtype=np.int64)
    row, wire = shape.row_bytes(1), shape.wire_row(1)      # a gradient's head row; Q/K/V/out/dout's as they travel
    others = tokens.sum(1, keepdims=True) - tokens         # tokens of the other members, per member
    flat = ranks.ravel()
    parts = [np.asarray([q for q, _ in row], dtype=np.int64) for row in head_parts(shape, tokens.shape[1], head_groups)]

    def to_heads(heads, row=wire):     # per rank: its tokens of the other members' heads
        return (tokens * (heads.sum() - heads)[None] * row).ravel()

    def to_tokens(heads, row=wire):    # per rank: the other members' tokens of its heads
        return (others * heads[None] * row).ravel()

    def a2a(direction, label, amounts):   # one step per all-to-all of the kind
        return Phase.stepped(direction, "all_to_all", f"{what}: {label}", span, amounts, flat)
    b = Builder()
    kv_in = b.phase(a2a("forward", "K/V to heads", [to_heads(kv)] * 2))
    q_in = b.phase(a2a("forward", "Q to heads", [to_heads(q) for q in parts]))
    out_back = b.phase(a2a("forward", "out to tokens", [to_tokens(q) for q in parts]))
    dout_in = b.phase(a2a("backward", "dout to heads", [to_heads(q) for q in parts]))
    dq_back = b.phase(a2a("backward", "dQ to tokens", [to_tokens(q, row) for q in parts]))
    dkv_row = shape.row_bytes(1, acc=True) if layout.kv_replicated else row
    dkv_back = b.phase(a2a("backward", "dK/dV to tokens", [to_tokens(kv, dkv_row)] * 2))
    last, inners = len(parts) - 1, [inner(g) for g in range(len(parts))]
    b.start("dispatch", kv_in, 0)        # HeadExecutor's forward stages
    b.start("dispatch", kv_in, 1)
    b.start("dispatch", q_in, 0)
    b.wait("compute", kv_in, 0)
    b.wait("compute", kv_in, 1)
    for g in range(len(parts)):
        if g:
            b.start("compute", q_in, g)
        b.wait("compute", q_in, g)
        b.include("compute", inners[g], "forward")
        b.start("compute", out_back, g)
        b.wait("compute" if g < last else "finish", out_back, g)
    b.start("start_backward", dout_in, 0)   # its backward stages
    for g in range(len(parts)):
        if g:
            b.start("compute_backward", dout_in, g)
        b.wait("compute_backward", dout_in, g)
        b.include("compute_backward", inners[g], "backward")
        b.start("compute_backward", dq_back, g)
        if g < last:
            b.wait("compute_backward", dq_back, g)
    b.start("compute_backward", dkv_back, 0)
    b.start("compute_backward", dkv_back, 1)
    b.wait("finish_backward", dq_back, last)
    b.wait("finish_backward", dkv_back, 0)
    b.wait("finish_backward", dkv_back, 1)
    return b.build()


@dataclass(frozen=True, eq=False, kw_only=True)
class UlyssesSchedule(Schedule):
    head_groups: int = 1      # query heads moved and computed 1/head_groups of a rank's share at a time
    keeps_local_out = False   # it keeps head shards of every token

    def gather_order(self) -> np.ndarray | None:
        """The all-to-all buffer's rows in global order (None: already; see module docstring)."""
        return gathered_order(self.shards, range(self.world_size))

    def kernel_heads(self, shape: AttnShape) -> float:
        """A share of the heads per rank (the whole group splits them), in ``head_groups`` calls."""
        return shape.num_heads / self.world_size / self.head_groups

    def compute_slices(self, rank: int) -> list[MaskSlice]:
        return self.mask.slices()  # the whole mask, a share of the heads

    @cached_property
    def local_calls(self) -> tuple[KernelCall, ...]:
        """The kernel calls of the whole sequence on a head shard."""
        return sequence_calls(self.mask, self.total_tokens)

    def visible_pairs(self, rank: int) -> int:
        return self.mask.area()

    def kernel_segments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every rank runs every document whole (on its share of the heads)."""
        lens = np.asarray(self.doc_lens, dtype=np.int64)
        area = mask_area(lens, lens, self.causal, self.window)
        p = self.world_size
        return np.repeat(np.arange(p), len(lens)), np.tile(lens, p), np.tile(area, p), np.tile(lens, p)

    def program(self, shape: AttnShape) -> Program:
        p = self.world_size
        pairs = self.visible_pairs(0)
        tokens = np.asarray([[self.num_tokens(r) for r in range(p)]], dtype=np.int64)
        parts = head_parts(shape, p, self.head_groups)

        def inner(g):   # the head group's attention of every token (LocalExecutor), per rank its share
            return attention_program(np.asarray([shape.flops(pairs, q) for q, _ in parts[g]], dtype=np.int64), p)
        return head_exchange_program(shape, tokens, np.arange(p)[None], p, self.head_groups, inner, "ulysses")

    def buffer_bytes(self, shape: AttnShape) -> np.ndarray:
        """dout of every token for one head group of this rank's heads (q, k, v, out: saved)."""
        return head_buffer_bytes(shape, [(self.total_tokens, r) for r in range(self.world_size)], self.world_size,
                                 self.head_groups)

    def grad_bytes(self, shape: AttnShape) -> np.ndarray:
        return head_grad_bytes(shape, [(self.total_tokens, r) for r in range(self.world_size)], self.world_size,
                               self.head_groups)

    def saved_bytes(self, shape: AttnShape) -> np.ndarray:
        """The head-sharded q, k, v, out and lse of every token."""
        return head_saved_bytes(shape, [(self.total_tokens, r) for r in range(self.world_size)], self.world_size)


def build(doc_lens, mesh, *, causal, window, mask, shards: Shards, head_groups: int = 1) -> UlyssesSchedule:
    return UlyssesSchedule(scheduler="ulysses", doc_lens=doc_lens, causal=causal, window=window,
                           world_size=mesh.world_size, shards=shards, mask=mask,
                           head_groups=check_head_groups(head_groups))


def derive(world_size: int, context, options: dict, two_d: bool = False) -> dict:
    """What ulysses takes from a :class:`~distattn.schedulers.PlanContext`: its ``head_groups``."""
    return {"head_groups": context.head_groups} if context.head_groups > 1 and world_size > 1 else {}


def head_split(world_size: int, options: dict) -> int:
    """Every rank computes a share of the query heads."""
    return world_size
