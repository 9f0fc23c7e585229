import os

import pytest
import torch
import torch.distributed as dist

# Without a GPU, the triton backend runs through Triton's CPU interpreter; the
# switch is read when the kernels are defined, so set it before importing distattn.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import distattn  # noqa: E402


def rand_qkv(tq, tk, hq, hkv, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tq, hq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(tk, hkv, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(tk, hkv, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


class BackwardMark(torch.autograd.Function):
    """Identity that appends ``event`` to ``log`` when the gradient passes it in backward (order tests)."""

    @staticmethod
    def forward(ctx, t, log, event):
        ctx.log, ctx.event = log, event
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append(ctx.event)
        return grad, None, None


def max_err(a, b):
    """Max abs difference treating matching infinities (lse of empty rows) as equal."""
    a, b = a.double(), b.double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (a.sign() == b.sign())
    if (torch.isinf(a) ^ torch.isinf(b)).any():
        return float("inf")
    return (a - b).masked_fill(both_inf, 0).abs().max().item() if a.numel() else 0.0


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def one_rank_group():
    """A one-rank gloo group in the test process itself (plans need a live group)."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(29000 + os.getpid() % 2000)
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield dist.group.WORLD


def case_error(scheduler, docs, causal, window, hq, hkv, backend="reference", options=None, mesh=None, seed=0):
    """Inside a gloo rank: max error of out/dq/dk/dv of this rank's shard vs the fp64 oracle."""
    total = sum(docs)
    q, k, v = rand_qkv(total, total, hq, hkv, 8, seed=seed)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = distattn.reference_attention(*ref_in, docs, causal=causal, window=window)
    ref.backward(dout)
    plan = distattn.plan(docs, mesh if mesh is not None else dist.group.WORLD, scheduler=scheduler, causal=causal,
                         window=window, backend=backend, **(options or {}))
    mine = [plan.shard(t).clone().requires_grad_() for t in (q, k, v)]
    out = distattn.attention(*mine, plan)
    out.backward(plan.shard(dout))
    errs = [max_err(out.detach(), plan.shard(ref.detach()))]
    errs += [max_err(a.grad, plan.shard(b.grad)) for a, b in zip(mine, ref_in)]
    return max(errs)


def shard_errors(plan, out, mine, ref, ref_in, my_sinks=None, ref_sinks=None) -> float:
    """Inside a gloo rank, after both backwards: max error of this rank's out/dq/dk/dv vs the oracle's
    shard, and of the sinks' gradient summed over the ranks (as the data-parallel reduction sums a
    replicated parameter's gradient)."""
    errs = [max_err(out.detach(), plan.shard(ref.detach()))]
    errs += [max_err(a.grad, plan.shard(b.grad)) for a, b in zip(mine, ref_in)]
    if my_sinks is not None:
        dsinks = my_sinks.grad.clone()
        dist.all_reduce(dsinks)
        errs.append(max_err(dsinks, ref_sinks.grad))
    return max(errs)


def oracle_case_error(scheduler: str, docs: list[int], hq: int, hkv: int, seed: int, mask_args: dict,
                      backend: str = "reference", options: dict | None = None, with_sinks: bool = False,
                      softcap: float | None = None) -> float:
    """Inside a gloo rank: :func:`shard_errors` of one case with optional sinks and soft-capping; the mask,
    ``mask_args`` (``causal``/``window``, or ``mask``), goes to the oracle and to the plan alike."""
    total = sum(docs)
    q, k, v = rand_qkv(total, total, hq, hkv, 8, seed=seed)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    sinks = torch.randn(hq, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64) \
        if with_sinks else None
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_sinks = sinks.clone().requires_grad_() if with_sinks else None
    ref = distattn.reference_attention(*ref_in, docs, **mask_args, sinks=ref_sinks, softcap=softcap)
    ref.backward(dout)
    plan = distattn.plan(docs, dist.group.WORLD, scheduler=scheduler, **mask_args, backend=backend, **(options or {}))
    mine = [plan.shard(t).clone().requires_grad_() for t in (q, k, v)]
    my_sinks = sinks.clone().requires_grad_() if with_sinks else None
    out = distattn.attention(*mine, plan, sinks=my_sinks, softcap=softcap)
    out.backward(plan.shard(dout))
    return shard_errors(plan, out, mine, ref, ref_in, my_sinks, ref_sinks)


def small_run(base: dict, out, **changes):
    """A validated RunConfig: ``base``'s sections (dicts) updated by ``changes``, written to ``out``."""
    from distattn.train.config import RunConfig, validate

    sections = {k: {**v, **changes.get(k, {})} for k, v in base.items()}
    sections["train"]["out"] = str(out)
    return validate(RunConfig().replace(**sections))


class DictStore(dict):
    """What :class:`distattn.train.auto_plan.SharedChoice` uses of a c10d store, in a dict: a key never
    set raises ``KeyError`` at once where a real store's ``get`` would wait."""

    def set(self, key, value):
        self[key] = value.encode()

    def get(self, key):
        return self[key]

    def delete_key(self, key):
        del self[key]


def small_yaml(base: dict, folder, **changes):
    """``base``'s sections (dicts) updated by ``changes``, ``train.out`` set to ``folder/run``, written to
    ``folder/cfg.yaml`` (for the command line); returns that path."""
    import yaml

    sections = {k: {**v, **changes.get(k, {})} for k, v in base.items()}
    sections["train"]["out"] = str(folder / "run")
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(sections))
    return path


def sent_vs_stats(scheduler, docs, hq=4, hkv=2, causal=True, window=None, options=None):
    """Inside a gloo rank: (bytes the forward pass actually sent, bytes ``stats()`` predicts, stats), fp32."""
    total = sum(docs)
    q, k, v = rand_qkv(total, total, hq, hkv, 8, dtype=torch.float32)
    plan = distattn.plan(docs, dist.group.WORLD, scheduler=scheduler, causal=causal, window=window,
                         **(options or {}))
    before = plan.bytes_sent()
    with torch.no_grad():
        distattn.attention(plan.shard(q), plan.shard(k), plan.shard(v), plan)
    stats = plan.stats(num_heads=hq, num_kv_heads=hkv, head_dim=8, dtype_bytes=4)
    return plan.bytes_sent() - before, stats["send_bytes"][plan.rank], stats


def covers_the_mask(plan, docs, causal, window, mask=None) -> bool:
    """The slices every rank of ``plan`` computes add up to the mask (default: the document mask),
    nothing computed twice."""
    import numpy as np

    total = sum(docs)
    seen = np.zeros((total, total), dtype=int)
    for r in range(plan.world_size):
        for sl in plan.schedule.compute_slices(r):
            lo, hi = sl.local_band()
            diag = np.arange(sl.k_len)[None, :] - np.arange(sl.q_len)[:, None]
            seen[sl.q_start:sl.q_end, sl.k_start:sl.k_end] += (diag >= lo) & (diag <= hi)
    mask = mask if mask is not None else distattn.SliceMask.documents(docs, causal, window)
    return bool((seen == mask.dense(total).numpy()).all())


def slow_cases(*values):
    """``values`` as parametrize cases marked slow: the larger worlds, shapes or variants a default
    slice stands in for, run with ``--slow`` (their test ids stay the values)."""
    return [pytest.param(v, marks=pytest.mark.slow) for v in values]


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run the tests marked slow: full soaks, crash matrices, larger shapes")


def pytest_configure(config):
    # `pytest -n 2` (pytest-xdist): the workers share the cores, so each computes on one thread (torch's
    # and numpy's BLAS: OMP_NUM_THREADS, which the workers inherit from here and read when they import
    # them). With a thread per core, each op's threads wait for one another while the other worker holds
    # a core: the in-process kernel tests ran many times slower than alone. Ranks and trainers set their own
    # threads (distattn.distributed.spawn, the trainer), as they do without xdist.
    if config.getoption("numprocesses", default=None) and not os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")


# `pytest -m quick`: the files a contributor runs first (the public API, every scheduler exact at small
# worlds, masks, merge, kernels, config and CLI refusals, the layer rules): under 5 minutes on 2 cores.
QUICK_FILES = frozenset({
    "test_plan_api.py", "test_validation.py", "test_masks_merge.py", "test_schedule.py", "test_program.py",
    "test_layers.py", "test_kernels.py", "test_refusals.py", "test_slice_masks.py", "test_partials.py", "test_plan_cache.py",
    "test_plan_context.py", "test_overrides.py", "test_manifest_schema.py", "test_model_shape.py",
    "test_bench_table.py", "test_varlen.py", "test_quiet_trainer.py", "test_nccl_parse.py",
})


@pytest.hookimpl(tryfirst=True)   # before pytest's own hook deselects by -m
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in QUICK_FILES:
            item.add_marker(pytest.mark.quick)
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="marked slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
