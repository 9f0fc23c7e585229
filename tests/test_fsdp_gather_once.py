"""Under FSDP2 a block's parameters are all-gathered once per pass and its gradients reduce-scattered
once per step, with two nano-batches as with one: the pieces that nano-batches run apart (``Block.pre``,
``Block.post``, interleaved across the blocks: ``distattn.runtime.pingpong.run_layers``) share one gather
(``Transformer._nano_batches``). Counted on gloo, forward and backward apart, for ``none`` and
``selective`` checkpointing (``full`` and ``offload`` run a block's nano-batches in one forward method,
``Block.interleaved``); and the step stays exact: fp64 losses, gradients and the weights after two
optimizer steps equal one nano-batch's."""

import pytest
import torch

from distattn.distributed.spawn import run_distributed

DOCS = [300, 17, 211, 64, 150, 9]
# FSDP2 reaches its collectives through torch.distributed: torch >= 2.13 calls the *_single names
GATHERS = ("all_gather_single", "all_gather_into_tensor")
SCATTERS = ("reduce_scatter_single", "reduce_scatter_tensor")


class _Counter:
    """Counts FSDP2's all-gathers and reduce-scatters (``torch.distributed``'s functions, wrapped) into
    the phase set last: ``counter.phase = "forward"``."""

    def __init__(self):
        import torch.distributed as dist

        self.phase, self.counts = None, {}
        for names, kind in ((GATHERS, "gather"), (SCATTERS, "scatter")):
            for name in names:
                if hasattr(dist, name):
                    setattr(dist, name, self._wrap(getattr(dist, name), kind))

    def _wrap(self, fn, kind):
        def counted(*args, **kwargs):
            key = (self.phase, kind)
            self.counts[key] = self.counts.get(key, 0) + 1
            return fn(*args, **kwargs)
        return counted

    def take(self) -> dict:
        counts, self.counts = self.counts, {}
        return counts


def _model(bf16: bool = False):
    """The trainer's FSDP2 wrapping (``wrap_model``) of a small model with attention sinks over every rank
    as cp: fp64, or with ``bf16`` fp32 with the trainer's mixed precision (bf16 compute, fp32 reduction)."""
    import torch.distributed as dist

    from distattn.distributed.mesh import ParallelDims
    from distattn.train.config import ModelConfig, RunConfig
    from distattn.train.model.transformer import Transformer
    from distattn.train.ranks import wrap_model

    world = dist.get_world_size()
    cfg = RunConfig().replace(parallel={"dp": 1, "cp": world, "scheduler": "cad", "dp_mode": "fsdp"},
                              train={"dtype": "bf16" if bf16 else "fp32"})
    assert cfg.wrapper == "fsdp"
    dims = ParallelDims(1, world, 1)
    mesh = dims.build("cpu")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=61,
                                    attention_sinks=True))
    return wrap_model(model if bf16 else model.double(), cfg, mesh, dims), dims.cp_mesh(mesh)


def _batch(tokens, nano: int, cp_mesh):
    from distattn import plan as make_plan
    from distattn.train.model import LocalBatch
    from distattn.train.plan_ahead import agreed_nano_batches

    parts = agreed_nano_batches(DOCS, nano, 0.0, False, "cpu")
    assert len(parts) == nano
    plans = [make_plan(d, cp_mesh, scheduler="cad", backend="reference") for d, _, _ in parts]
    return LocalBatch.shard(tokens, DOCS, parts, plans)


def _full(tensors) -> list:
    """Whole tensors (FSDP2's are sharded); None for a gradient that never came."""
    return [t.full_tensor() if hasattr(t, "full_tensor") else t if t is None else t.detach().clone()
            for t in tensors]


def _tokens(model):
    torch.manual_seed(1)
    return torch.randint(0, model.cfg.vocab_size, (sum(DOCS),))


def _step(model, cp_mesh, counter, mode: str, nano: int):
    """One forward and backward: the collectives counted in each, the loss summed over the ranks."""
    batch = _batch(_tokens(model), nano, cp_mesh)
    counter.take()
    counter.phase = "forward"
    loss = model(batch, checkpointing=mode, loss_chunk=37)
    counter.phase = "backward"
    loss.backward()
    counter.phase = None
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)   # each rank's tokens differ between one nano-batch and two
    return counter.take(), total.item()


def _train(model, cp_mesh, counter, mode: str, nano: int, steps: int = 2):
    """``steps`` SGD steps on the same batch: per step the collectives counted, the loss and the
    gradients; then the weights."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    got = []
    for _ in range(steps):
        counts, loss = _step(model, cp_mesh, counter, mode, nano)
        got.append((counts, loss, _full(p.grad for p in model.parameters())))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return got, _full(model.parameters())


def _count_worker(mode: str):
    """Per nano-batch count a fresh fp64 model trained two steps; and one step of a bf16 one."""
    counter = _Counter()
    out = {}
    for nano in (1, 2):
        model, cp_mesh = _model()
        out[nano] = _train(model, cp_mesh, counter, mode, nano)
    model, cp_mesh = _model(bf16=True)
    for nano in (1, 2):
        model.zero_grad(set_to_none=True)
        out["bf16", nano] = (*_step(model, cp_mesh, counter, mode, nano), _full(p.grad for p in model.parameters()))
    return out


def _one_pass(n_layers: int = 3) -> dict:
    """A step's collectives with one nano-batch: each block gathered forward and backward, the root
    (embedding, norm, head) once, kept through backward; every block's gradients and the root's reduced."""
    return {("forward", "gather"): n_layers + 1, ("backward", "gather"): n_layers,
            ("backward", "scatter"): n_layers + 1}


def _check_same_step(got, mode: str):
    """Two nano-batches: the collectives, losses, gradients and weights of one (fp64); bf16: the
    collectives, the rest to bf16's rounding."""
    (steps1, weights1), (steps2, weights2) = got[1], got[2]
    for (counts1, loss1, grads1), (counts2, loss2, grads2) in zip(steps1, steps2, strict=True):
        assert counts1 == _one_pass(), (mode, counts1)
        assert counts2 == counts1, (mode, counts1, counts2)
        assert abs(loss2 - loss1) <= 1e-12 * abs(loss1), (mode, loss1, loss2)
        _same(grads2, grads1, mode)
    _same(weights2, weights1, mode)
    (counts1, loss1, grads1), (counts2, loss2, grads2) = got["bf16", 1], got["bf16", 2]
    assert counts1 == _one_pass() and counts2 == counts1, (mode, "bf16", counts1, counts2)
    assert abs(loss2 - loss1) <= 1e-2 * abs(loss1), (mode, "bf16", loss1, loss2)
    for a, b in zip(grads2, grads1, strict=True):
        assert a.dtype == torch.float32 and (a - b).norm() <= 2e-2 * b.norm(), (mode, "bf16", (a - b).norm() / b.norm())


def _same(got, want, what, rtol: float = 1e-12):
    for a, b in zip(got, want, strict=True):
        assert a is not None and b is not None, what
        assert torch.allclose(a, b, rtol=rtol, atol=rtol * 1e-2), (what, (a - b).abs().max())


@pytest.mark.parametrize("mode", ["none", "selective"])
def test_two_nano_batches_gather_and_reduce_like_one(mode):
    """3 cp ranks, cad, FSDP2 as the trainer wraps it, two SGD steps: per step each block gathers once
    forward and once backward and reduce-scatters once, with two nano-batches as with one, and the two
    runs' losses, gradients and weights agree."""
    for got in run_distributed(_count_worker, 3, mode, timeout=300):
        _check_same_step(got, mode)


def _settings_worker(mode: str, nano: int):
    """Steps (one nano-batch) after a forward of ``nano`` nano-batches that no backward followed -- under
    no_grad, with grad but the loss dropped, stopped by an error --, a step of ``nano`` with the blocks
    kept gathered after forward, and a caller's gradient accumulation (``set_requires_gradient_sync(False)``,
    then True) over two micro-batches of ``nano``: per step the collectives counted, the loss, the
    gradients."""
    counter = _Counter()
    model, cp_mesh = _model()
    out = {}

    def forward():
        return model(_batch(_tokens(model), nano, cp_mesh), checkpointing=mode, loss_chunk=37)

    def step(name, nano: int = 1):
        model.zero_grad(set_to_none=True)
        counts, loss = _step(model, cp_mesh, counter, mode, nano)
        out[name] = (counts, loss, _full(p.grad for p in model.parameters()))

    step("before")
    with torch.no_grad():
        forward()
    step("after no_grad")
    forward()   # never backward
    step("after no backward")

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    model.layers[1].out_and_mlp = boom   # the second block's first post fails: the others have run pieces
    with pytest.raises(RuntimeError, match="boom"):
        forward()
    del model.layers[1].out_and_mlp
    model.reset_iter_state()   # FSDP2's recovery after a failed forward
    step("after an error")
    step("after an error, as many nano-batches", nano)

    for layer in model.layers:   # the caller keeps the blocks gathered from forward to backward
        layer.set_reshard_after_forward(False)
    step("blocks kept gathered", nano)
    for layer in model.layers:
        layer.set_reshard_after_forward(True)

    model.zero_grad(set_to_none=True)   # two micro-batches, their gradients reduced once
    model.set_requires_gradient_sync(False)
    first, _ = _step(model, cp_mesh, counter, mode, nano)
    model.set_requires_gradient_sync(True)
    second, loss = _step(model, cp_mesh, counter, mode, nano)
    out["accumulated"] = ((first, second), loss, _full(p.grad for p in model.parameters()))
    return out


def _both_settings_workers(mode: str):
    return {nano: _settings_worker(mode, nano) for nano in (1, 2)}


@pytest.mark.parametrize("mode", ["none", "selective"])
def test_settings_come_back_after_a_forward_without_backward(mode):
    """The FSDP2 settings two nano-batches turn off outlive no forward: after a no_grad forward, one
    whose loss was dropped and one stopped by an error, the next step gathers and reduce-scatters as
    after one nano-batch's, with the same loss and gradients. The caller's own settings hold as with one
    nano-batch: ``set_reshard_after_forward(False)`` (no gather in backward), gradient accumulation with
    ``set_requires_gradient_sync`` (no reduce-scatter until it is True, the gradients summed alike)."""
    for got in run_distributed(_both_settings_workers, 3, mode, timeout=300):
        assert got[1].keys() == got[2].keys()
        (first, second), _, _ = got[1]["accumulated"]
        assert ("backward", "scatter") not in first and second == _one_pass(), (first, second)
        assert ("backward", "gather") not in got[1]["blocks kept gathered"][0]
        for name, (counts1, loss1, grads1) in got[1].items():
            counts2, loss2, grads2 = got[2][name]
            assert counts2 == counts1, (name, counts1, counts2)
            assert abs(loss2 - loss1) <= 1e-12 * abs(loss1), (name, loss1, loss2)
            _same(grads2, grads1, name)
