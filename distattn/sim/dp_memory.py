"""The model's states on one rank per data-parallel mode (``parallel.dp_mode``), the part of
:mod:`distattn.sim.memory_model` that follows the wrapper: ``model_states(job)``, and the modes a job can
be tried in, cheapest first (``candidates``; ``memory_model.cheapest_mode`` takes the first that fits).

Bytes per rank: ``N = dp * cp`` ranks, ``P`` parameters, ``S`` the ranks sharding a parameter
(:attr:`~distattn.sim.memory_model.Job.shard_ranks`: N under fsdp and zero1, ``dp_shard`` under hsdp),
``b`` the training dtype's bytes (2 bf16, 4 fp32), ``R`` and ``K`` the root's (embedding, final norm,
head) and one block's parameters.

* ``ddp``: fp32 weights ``4P``, fp32 gradients ``4P`` plus DDP's buckets, a second copy (``4P``:
  gradient_as_bucket_view off), AdamW's two fp32 moments ``8P``; bf16 autocasts, caching a bf16 copy
  of every block weight during the forward (``2 * n_layers * K``). One rank (``single``): as DDP
  without buckets.
* ``fsdp`` (FSDP2 over the N ranks) and ``hsdp`` (over each group of S, replicated over the N/S
  groups, whose all-reduce runs on the reduce-scattered shard in place): the fp32 shard ``4P/S`` and
  the copies a rank computes with, in the training dtype: the root, unsharded from forward to the end
  of backward, and two blocks (the one computing, the one prefetched) ``b(R + 2K)``; gradients: the
  shard ``4P/S``, the root's unsharded ``bR`` and one block's ``bK`` (bf16: plus its fp32 copy for
  the reduce-scatter, ``4K``); moments ``8P/S``. ``cpu_offload`` (fsdp) moves the shard, its
  gradient and the moments to host memory (``16P/S``): the device keeps the unsharded copies.
* ``zero1`` (:mod:`distattn.train.zero1`): whole parameters in the training dtype ``bP`` and a
  rank's fp32 master shard ``4P/N`` (a copy of its own even in fp32); the moments ``8P/N``;
  gradients: the reduced fp32 shard ``4P/N`` (kept from one step to the next) and backward's
  transients, ``B(b + 4k) (+ 4L in bf16)`` for buckets of ``B`` elements (:func:`zero1_bucket`, laid
  out ``[N x shard]``): the training-dtype gradients autograd made for the bucket being filled
  (freed once copied in), ``k`` fp32 reduce-scatter send buffers in flight (:data:`ZERO1_IN_FLIGHT`,
  one where a bucket holds every parameter), and in bf16 one parameter's gradient cast to fp32 on
  its way in (``L``: the largest parameter); the bucket's new reduced share, made while the last
  step's still lives, comes once autograd's gradients are freed (``4B/N``, less). After AdamW the
  parameters' all-gathers go out :data:`ZERO1_IN_FLIGHT` buckets ahead of the next forward, each
  receive buffer (``bB``) freed as the forward reaches its block: no activations are alive then, but
  at short sequences it can be the larger moment, so the gradients add what it exceeds backward's
  peak by (:func:`step_excess`).

Measured (``tests/test_dp_memory.py``: live tensor bytes of fp32 training steps on 4 gloo ranks, a 5.9M
parameter model, 16 tokens a rank): the states within -0.7% (ddp), -2.4% (fsdp), -5.3% (hsdp,
``dp_shard`` 2) and -1.9% (zero1) of these. The sum is an upper bound: under fsdp and hsdp a block's
gradient shard appears only once its reduce-scatter has run, after the backward's peak.

Standard library only, as :mod:`distattn.sim.memory_model`.
"""

from __future__ import annotations

import math
from dataclasses import replace
# ``Job`` in the annotations is :class:`distattn.sim.memory_model.Job`, which imports this module (not imported
# here: the layers allow no circle, not even a type checker's)

# parameters per zero1 gradient bucket, in backward order (distattn.train.zero1.BUCKET_ELEMENTS, which
# imports torch: a test checks the two agree)
BUCKET_ELEMENTS = 40_000_000
# zero1's buckets sent and not yet received, at most: gradients, and parameters (distattn.train.zero1.IN_FLIGHT)
ZERO1_IN_FLIGHT = 2
# the order cheapest_mode tries the modes in: fewest bytes on the network first (ddp all-reduces the
# gradients; zero1 reduce-scatters them and all-gathers the parameters once a step; hsdp gathers each
# block in forward and backward inside its shard group; fsdp does so over every rank)
CHEAPEST_FIRST = ("ddp", "zero1", "hsdp", "fsdp")


def _largest_parameter(job: Job) -> int:
    m = job.model
    return m.dim * max(m.vocab_size, m.ffn_dim, m.n_heads * m.head_dim)


def zero1_bucket(job: Job) -> int:
    """Elements of zero1's largest gradient bucket as laid out ``[N x shard]``: up to
    :data:`BUCKET_ELEMENTS` parameters (all of them where fewer; one parameter bigger than that -- the
    embedding -- a bucket alone), padded to a multiple of N."""
    n = job.world_size
    return math.ceil(min(job.model.params, max(BUCKET_ELEMENTS, _largest_parameter(job))) / n) * n


def _zero1_grads(job: Job, compute: int) -> int:
    """zero1's gradient bytes at backward's peak: the reduced shard and backward's transients."""
    return 4 * math.ceil(job.model.params / job.world_size) + _zero1_transient(job, compute)


def _zero1_transient(job: Job, compute: int) -> int:
    in_flight = 1 if job.model.params <= BUCKET_ELEMENTS else ZERO1_IN_FLIGHT
    cast = 4 * _largest_parameter(job) if compute != 4 else 0
    return zero1_bucket(job) * (compute + 4 * in_flight) + cast


def step_excess(job: Job, activation_bytes: int) -> int:
    """What the optimizer step's moment holds over backward's peak, where the job's backward holds
    ``activation_bytes`` besides the states: zero1's parameter all-gather buffers in flight less its
    backward transients and those bytes; 0 for the other modes (AdamW's temporaries, the estimate does
    not count)."""
    if job.wrapper != "zero1":
        return 0
    compute = 2 if job.dtype == "bf16" else 4
    received = min(job.model.params, ZERO1_IN_FLIGHT * zero1_bucket(job))
    return max(0, compute * received - _zero1_transient(job, compute) - activation_bytes)


def model_states(job: Job) -> tuple[int, int, int, int]:
    """(weights, grads, optimizer) bytes on one rank's device, and its host bytes of them (``cpu_offload``:
    the fp32 shards, their gradients and AdamW's two moments): the module docstring's, per mode."""
    shape, bf16 = job.model, job.dtype == "bf16"
    p, compute = shape.params, 2 if bf16 else 4
    if job.wrapper in ("fsdp", "hsdp"):
        shard = math.ceil(p / job.shard_ranks)
        working = (shape.root_params + 2 * shape.block_params) * compute
        grad_working = shape.root_params * compute + shape.block_params * (compute + (4 if bf16 else 0))
        if job.cpu_offload:
            return working, grad_working, 0, 16 * shard
        return 4 * shard + working, 4 * shard + grad_working, 8 * shard, 0
    if job.wrapper == "zero1":
        shard = math.ceil(p / job.world_size)
        return compute * p + 4 * shard, _zero1_grads(job, compute), 8 * shard, 0
    # autocast caches a bf16 copy of every block weight it casts, until the forward leaves autocast
    autocast_cache = 2 * shape.n_layers * shape.block_params if bf16 else 0
    buckets = 4 * p if job.wrapper == "ddp" else 0   # DDP's gradient buckets (gradient_as_bucket_view off)
    return 4 * p + autocast_cache, 4 * p + buckets, 8 * p, 0


def candidates(job: Job) -> list[Job]:
    """``job`` in each data-parallel mode, cheapest first (:data:`CHEAPEST_FIRST`), without
    ``cpu_offload`` (which is not a mode); hsdp with the job's shard groups
    (:attr:`~distattn.sim.memory_model.Job.shard_ranks`: ``dp_shard``, else a node's ranks) and left out
    where they are every rank (fsdp) or one (no sharding). One rank: the job unwrapped alone."""
    if job.world_size == 1:
        return [replace(job, wrapper="single", cpu_offload=False, dp_shard=None)]
    jobs = []
    for mode in CHEAPEST_FIRST:
        cand = replace(job, wrapper=mode, cpu_offload=False, dp_shard=job.dp_shard if mode == "hsdp" else None)
        if mode == "hsdp":
            shard = cand.shard_ranks
            if shard in (1, job.world_size):
                continue
            cand = replace(cand, dp_shard=shard)
        jobs.append(cand)
    return jobs


__all__ = ["BUCKET_ELEMENTS", "ZERO1_IN_FLIGHT", "CHEAPEST_FIRST", "candidates", "model_states", "step_excess",
           "zero1_bucket"]
