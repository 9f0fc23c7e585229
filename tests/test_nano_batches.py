"""Issue 41: ``parallel.nano_batches: 2`` -- a micro-batch cut into two nano-batches of whole documents,
ping-ponged through the blocks (``distattn.runtime.pingpong.run_layers``) -- gives the trainer step of one
nano-batch: loss and every gradient equal in fp64 (1e-12) for ``cad`` on 3 ranks, in every
checkpointing mode, eager and compiled, with FSDP2, and pooled over data-parallel replicas (compiled in
two modes and FSDP2 in two by default, every mode of each with ``--slow``)."""

import pytest
import torch

from conftest import small_run
from distattn.runtime.pingpong import nano_batches, split_nano_batches
from distattn.distributed.spawn import run_distributed

DOCS = [300, 17, 211, 64, 150, 9]
MODES = ("none", "selective", "full", "offload")


def _grads(model) -> list[torch.Tensor]:
    """Every gradient summed over the ranks (ranks hold other tokens with one nano-batch than with two);
    FSDP2 has reduced them already."""
    import torch.distributed as dist

    out = []
    for p in model.parameters():
        if hasattr(p.grad, "full_tensor"):
            out.append(p.grad.full_tensor())
        else:
            out.append(p.grad.clone())
            dist.all_reduce(out[-1])
    return out


def _step_worker(modes, compiled: bool, fsdp: bool, dp: int = 1, mlp_chunk: int = 0):
    """fp64: per checkpointing mode, the loss and gradients of one trainer step with 1 and with 2
    nano-batches (the trainer's own cut and batch: ``agreed_nano_batches``, ``LocalBatch.shard``)."""
    import torch.distributed as dist

    from distattn import plan as make_plan
    from distattn.distributed.mesh import ParallelDims
    from distattn.train.config import ModelConfig
    from distattn.train.model.transformer import Transformer
    from distattn.train.model import Block, LocalBatch
    from distattn.train.plan_ahead import agreed_nano_batches

    cfg = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=61, attention_sinks=True)
    world = dist.get_world_size()
    dims = ParallelDims(dp, world // dp, 1)
    mesh = dims.build("cpu")
    cp_mesh, replica = dims.cp_mesh(mesh), mesh.get_local_rank("dp")
    docs = DOCS if replica == 0 else DOCS[::-1]
    options = {"pool": dist.group.WORLD} if dp > 1 else {}
    torch.manual_seed(0)
    model = Transformer(cfg).double()
    if compiled:
        model.compile_blocks()
    if fsdp:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        for layer in model.layers:
            fully_shard(layer, mesh=mesh._flatten("dp_cp"))
            for method in Block.FORWARD_METHODS:
                register_fsdp_forward_method(layer, method)
        fully_shard(model, mesh=mesh._flatten("dp_cp"))
    torch.manual_seed(1 + replica)
    tokens = torch.randint(0, cfg.vocab_size, (sum(docs),))
    out = {}
    for mode in modes:
        got = []
        for nano in (1, 2):
            parts = agreed_nano_batches(docs, nano, 0.0, dp > 1, "cpu")
            plans = [make_plan(d, cp_mesh, scheduler="cad", backend="reference", **options) for d, _, _ in parts]
            model.zero_grad(set_to_none=True)
            loss = model(LocalBatch.shard(tokens, docs, parts, plans), checkpointing=mode, loss_chunk=37,
                         mlp_chunk=mlp_chunk)
            loss.backward()
            total = loss.detach().clone()
            dist.all_reduce(total)
            got.append((len(plans), total.item(), _grads(model)))
        out[mode] = got
    return out


def _check(results) -> None:
    for per_rank in results:
        for mode, ((n1, loss1, grads1), (n2, loss2, grads2)) in per_rank.items():
            assert (n1, n2) == (1, 2), mode
            assert abs(loss2 - loss1) <= 1e-12 * abs(loss1), (mode, loss1, loss2)
            for a, b in zip(grads2, grads1, strict=True):
                assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), (mode, (a - b).abs().max())


# compiled, by default: full checkpointing (the blocks recomputed inside the compiled graph) and offload
# (saved tensors through hooks); every mode compiled: --slow's test below (tests/test_compile.py compiles
# none, selective and full without nano-batches by default; this is the default run's compiled offload)
COMPILED_MODES = ("full", "offload")


@pytest.mark.parametrize("compiled", [False, True])
def test_nano_batches_are_exact_in_every_checkpointing_mode(compiled):
    """3 ranks, cad, attention sinks, fp64: the step of two ping-ponged nano-batches is the step of one,
    eager in every checkpointing mode, compiled in COMPILED_MODES."""
    _check(run_distributed(_step_worker, 3, COMPILED_MODES if compiled else MODES, compiled, False, timeout=900))


@pytest.mark.slow
def test_nano_batches_are_exact_compiled_in_every_checkpointing_mode():
    _check(run_distributed(_step_worker, 3, MODES, True, False, timeout=900))


def test_nano_batches_are_exact_under_fsdp2_and_a_pool(request):
    """FSDP2 (each block's pieces gather its parameters) over 3 cp ranks, and cad pooled over 2 replicas
    (DDP-style sums here) with the MLP tiled."""
    modes = MODES if request.config.getoption("--slow") else ("none", "full")
    _check(run_distributed(_step_worker, 3, modes, False, True, timeout=900))
    _check(run_distributed(_step_worker, 4, ("selective",), False, False, 2, 16, timeout=900))


def test_split_balances_work_at_document_boundaries():
    head, tail, cut = split_nano_batches([10, 10, 10, 10])
    assert (head, tail, cut) == ([10, 10], [10, 10], 20)
    # tokens alone: the cut nearest half the tokens; with attention weighed in, the long document alone
    assert split_nano_batches([400, 100, 100, 100, 100])[0] == [400]
    assert split_nano_batches([100, 100, 100, 100, 400], pair_weight=0.0)[0] == [100, 100, 100, 100]
    assert split_nano_batches([100, 100, 100, 100, 300], pair_weight=0.0)[0] == [100, 100, 100]
    assert split_nano_batches([100, 100, 100, 100, 300], pair_weight=0.1)[0] == [100, 100, 100, 100]
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_nano_batches([64])
    # the trainer's parts: the half with more attention first (its transfers get the other's linear
    # layers to hide behind), one part for one document
    assert nano_batches([100, 100, 100, 300], 2) == [([300], 300, 600), ([100, 100, 100], 0, 300)]
    assert nano_batches([300, 100, 100, 100], 2) == [([300], 0, 300), ([100, 100, 100], 300, 600)]
    assert nano_batches([64], 2) == [([64], 0, 64)] and nano_batches([8, 8], 1) == [([8, 8], 0, 16)]


def _default_worker(run_cfg: dict, out: str):
    """The trainer with ``parallel.nano_batches`` unset: the count it chose and its losses, then the
    losses of the other count set by name."""
    from distattn.train.trainer import Trainer

    trainer = Trainer(small_run(run_cfg, f"{out}/default"), progress="none")
    losses = [m["loss"] for m in trainer.run()]
    other = 3 - trainer.nano_batches
    named = Trainer(small_run(run_cfg, f"{out}/named", parallel={"nano_batches": other}), progress="none")
    return trainer.nano_batches, losses, [m["loss"] for m in named.run()]


def test_the_trainer_takes_the_simulator_s_nano_batches_when_unset(tmp_path):
    """Unset, the trainer runs the count :func:`choose_nano_batches` prices faster on the stream's first
    steps (every rank the same, the planner's clock left out); its losses equal the other count's
    (fp32: to rounding), and a config refuses counts other than 1 and 2."""
    from distattn.train.config import load_config
    from distattn.train.data.global_batch import GlobalBatches
    from distattn.train.data.packer import Packer
    from distattn.train.data.sources import make_corpus
    from distattn.train.nano_default import STEPS, choose_nano_batches

    run_cfg = {"model": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128},
               "data": {"seq_len": 2048}, "parallel": {"dp": 1, "cp": 2, "scheduler": "cad"},
               "train": {"steps": 2, "warmup_steps": 1, "ckpt_every": 100}}
    cfg = small_run(run_cfg, tmp_path / "default")
    d = cfg.data
    stream = GlobalBatches(Packer(make_corpus(d), d.seq_len, d.seed, cfg.model.vocab_size), cfg.parallel.dp)
    first = stream.peek_lengths(STEPS)
    assert stream.peek_lengths(STEPS) == first   # peeking leaves the stream where it was
    choice = choose_nano_batches(cfg, first, "resend")
    assert choice == choose_nano_batches(cfg, first, "resend") and set(choice.step_s) == {1, 2}
    assert choice.line().startswith(f"parallel.nano_batches: {choice.count} (unset: the simulator prices")

    (count, losses, other), _ = run_distributed(_default_worker, 2, run_cfg, str(tmp_path), timeout=300)
    assert count == choice.count
    assert losses == pytest.approx(other, rel=1e-5)
    bad = tmp_path / "bad.yaml"
    bad.write_text("parallel: {nano_batches: 3}\n")
    with pytest.raises(ValueError, match="parallel.nano_batches must be 1 or 2"):
        load_config(bad)
