"""distattn's core API on several ranks, checked against one process's exact attention.

    torchrun --nproc-per-node 4 examples/core_torchrun.py

On CPU (gloo; on GPUs torchrun's ranks take one each, nccl) every rank builds the same packed sequence of
documents, plans it for each scheduler, shards q, k and v, runs ``distattn.attention`` forward and
backward, and gathers the output and gradients back (``plan.unshard``). Rank 0 prints, per scheduler,
the largest difference from ``distattn.reference_attention`` on the whole sequence (fp64: ~1e-15) and
the plan's imbalance, then ``ok``; any difference over 1e-10 exits 1. About 10 s on 2 CPU cores.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import distattn
from distattn.distributed.mesh import usp_mesh

DOC_LENS = [300, 37, 1200, 64, 455, 8, 512]   # S = 2,576 tokens, documents never attend to each other
HEADS, KV_HEADS, HEAD_DIM = 8, 2, 32          # grouped-query attention: 4 query heads per KV head


def main() -> int:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    dtype = torch.float32 if cuda else torch.float64   # (exact to ~1e-15 in fp64 on CPU)
    total = sum(DOC_LENS)
    g = torch.Generator().manual_seed(0)   # the same inputs on every rank
    q_SHD = torch.randn(total, HEADS, HEAD_DIM, generator=g, dtype=dtype).to(device)
    k_SHD, v_SHD, dout_SHD = (torch.randn(total, KV_HEADS if i < 2 else HEADS, HEAD_DIM, generator=g, dtype=dtype)
                              .to(device) for i in range(3))

    # the reference: the whole sequence in one process
    ref = [t.clone().requires_grad_() for t in (q_SHD, k_SHD, v_SHD)]
    out_ref = distattn.reference_attention(*ref, DOC_LENS, causal=True)
    out_ref.backward(dout_SHD)

    meshes = {name: dist.group.WORLD for name in ("ring", "zigzag", "allgather", "ulysses", "cad")}
    if world % 2 == 0 and world > 2:
        meshes["usp"] = usp_mesh(device.type, 2)   # Ulysses over pairs of ranks, a ring across them
    worst = 0.0
    for name, mesh in meshes.items():
        try:
            plan = distattn.plan(DOC_LENS, mesh, scheduler=name, causal=True, device=device)
        except ValueError as exc:   # e.g. Ulysses splits heads: HEADS must divide among the ranks
            if rank == 0:
                print(f"{name:>9}: skipped, {exc}")
            continue
        q, k, v = (plan.shard(t).requires_grad_() for t in (q_SHD, k_SHD, v_SHD))   # [S_local, H, D]
        out = distattn.attention(q, k, v, plan)                                       # [S_local, HEADS, D]
        out.backward(plan.shard(dout_SHD))
        diffs = [(plan.unshard(a) - b).abs().max().item()
                 for a, b in [(out.detach(), out_ref), (q.grad, ref[0].grad), (k.grad, ref[1].grad),
                              (v.grad, ref[2].grad)]]
        worst = max(worst, *diffs)
        if rank == 0:
            stats = plan.stats(HEADS, KV_HEADS, HEAD_DIM)
            print(f"{name:>9}: {plan.num_local_tokens:5d} tokens on rank 0; max |out - ref| {diffs[0]:.1e}, "
                  f"|dq - ref| {diffs[1]:.1e}, |dk| {diffs[2]:.1e}, |dv| {diffs[3]:.1e}; "
                  f"attention imbalance {stats['flops_imbalance']:.2f}", flush=True)
    if rank == 0:
        print(f"{world} ranks, {len(DOC_LENS)} documents, {total} tokens: "
              + ("ok" if worst <= 1e-10 else f"FAILED: a difference of {worst:.1e}"))
    dist.destroy_process_group()
    return 0 if worst <= 1e-10 else 1


if __name__ == "__main__":
    sys.exit(main())
