"""DeepSpeed: ZeRO-2 with SequenceParallelMPU at SP=2 x DP=2 matches the run without SP; our drop-in
equals DeepSpeed's own DistributedAttention on the same inputs."""

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

import distattn.schedulers
from distattn.distributed.spawn import run_distributed

pytest.importorskip("deepspeed")
EXT_DIR = os.path.join(os.path.dirname(__file__), "..", ".venv", "torch_extensions")


class TinyModel(torch.nn.Module):
    def __init__(self, attn, vocab=64, dim=32, heads=4):
        super().__init__()
        self.heads, self.attn = heads, attn
        self.embed = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, vocab)

    def forward(self, tokens):  # tokens [s_local, b]
        x = self.embed(tokens)
        q, k, v = (t.reshape(*t.shape[:2], self.heads, -1) for t in self.qkv(x).chunk(3, dim=-1))
        o = self.attn(q, k, v, 1, doc_lens=[20, 44])
        return self.out(x + o.reshape(*o.shape[:2], -1))


def _train(sp_size, steps=3):
    os.environ["TORCH_EXTENSIONS_DIR"] = EXT_DIR
    os.environ["LOCAL_RANK"] = str(dist.get_rank())
    import deepspeed

    from distattn.parallel.deepspeed import DistAttnDistributedAttention, SequenceParallelMPU

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    mpu = SequenceParallelMPU.from_world(sp_size)
    made = []  # a second MPU (e.g. one per engine) finds the first one's groups
    real_new_group = c10d._new_group_with_tag  # what dist.new_group and DeviceMesh call
    c10d._new_group_with_tag = lambda *a, **k: made.append(a) or real_new_group(*a, **k)
    again = SequenceParallelMPU.from_world(sp_size)
    c10d._new_group_with_tag = real_new_group
    assert not made and again.get_sequence_parallel_group() is mpu.get_sequence_parallel_group(), made
    assert again.get_model_parallel_group() is mpu.get_model_parallel_group()
    torch.manual_seed(0)
    model = TinyModel(DistAttnDistributedAttention(None, mpu.get_sequence_parallel_group()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
           "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, mpu=mpu)
    dp_rank, sp_rank = mpu.get_data_parallel_rank(), mpu.get_sequence_parallel_rank()
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(100 * step + dp_rank)
        tokens, targets = torch.randint(0, 64, (64, 1), generator=g), torch.randint(0, 64, (64, 1), generator=g)
        s = 64 // sp_size
        rows = slice(sp_rank * s, (sp_rank + 1) * s)  # DeepSpeed's contiguous sequence shards
        logits = engine(tokens[rows])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), targets[rows].reshape(-1))
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / dist.get_world_size())
    return losses


def test_zero2_sequence_parallel_matches_data_parallel():
    with_sp = run_distributed(_train, 4, 2, timeout=600)[0]   # SP 2 x DP 2
    without = run_distributed(_train, 2, 1, timeout=600)[0]   # DP 2, whole sequences
    assert torch.allclose(torch.tensor(with_sp), torch.tensor(without), rtol=1e-5), (with_sp, without)


def _same_as_deepspeed():
    os.environ["TORCH_EXTENSIONS_DIR"] = EXT_DIR
    import deepspeed.comm
    from deepspeed.sequence.layer import DistributedAttention

    from distattn import local_attention
    from distattn.parallel.deepspeed import DistAttnDistributedAttention

    deepspeed.comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    group = dist.group.WORLD
    g = torch.Generator().manual_seed(0)
    s_local, heads = 16, 8
    q, k, v = (torch.randn(s_local * 4, 2, heads, 8, generator=g, dtype=torch.float64) for _ in range(3))
    rows = slice(dist.get_rank() * s_local, (dist.get_rank() + 1) * s_local)
    docs = [30, 34]

    def theirs_local(a, b, c):  # [S, b, h/P, d]: DeepSpeed's local attention, here our single-device kernel
        return torch.stack([local_attention(a[:, i], b[:, i], c[:, i], docs) for i in range(a.shape[1])], dim=1)

    def bidirectional(a, b, c):  # a non-causal local attention: replaced, with a warning, never silently
        return torch.stack([local_attention(a[:, i], b[:, i], c[:, i], docs, causal=False)
                            for i in range(a.shape[1])], dim=1)

    theirs = DistributedAttention(theirs_local, group)(q[rows], k[rows], v[rows], 1)
    ours = DistAttnDistributedAttention(None, group)(q[rows], k[rows], v[rows], 1, doc_lens=docs)
    # every scheduler on DeepSpeed's contiguous shards (issue 29)
    every = {s: (DistAttnDistributedAttention(None, group, scheduler=s)(q[rows], k[rows], v[rows], 1, doc_lens=docs)
                 - theirs).abs().max().item() for s in distattn.schedulers.NAMES}
    theirs_bi = DistributedAttention(bidirectional, group)(q[rows], k[rows], v[rows], 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        drop_in = DistAttnDistributedAttention(bidirectional, group, causal=False)
        ours_bi = [drop_in(q[rows], k[rows], v[rows], 1, doc_lens=docs) for _ in range(2)]
    return ((ours - theirs).abs().max().item(), max((o - theirs_bi).abs().max().item() for o in ours_bi),
            [str(w.message) for w in caught], every)


def test_drop_in_equals_deepspeed_distributed_attention():
    """Causal, and bidirectional when the user says causal=False: one warning for the replaced
    local attention (at construction, not per call)."""
    for diff, diff_bi, caught, every in run_distributed(_same_as_deepspeed, 4, timeout=600):
        assert diff < 1e-12 and diff_bi < 1e-12
        assert max(every.values()) < 1e-12 and len(every) == 6, every
        assert len(caught) == 1, caught
        assert "distattn's ulysses attention (causal=False, window=None) replaces local_attention=" in caught[0]
        assert "bidirectional" in caught[0] and "which is not called" in caught[0]


def test_a_local_attention_is_replaced_with_a_warning():
    """A bidirectional local attention would silently become causal: the drop-in says what runs."""
    def bidirectional(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=False)

    from distattn.parallel.deepspeed import DistAttnDistributedAttention

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DistAttnDistributedAttention(bidirectional, object())
    assert len(caught) == 1 and caught[0].category is UserWarning
    assert str(caught[0].message) == (
        "distattn's ulysses attention (causal=True, window=None) replaces local_attention=test_a_local_attention_"
        "is_replaced_with_a_warning.<locals>.bidirectional, which is not called; pass causal=False for "
        "bidirectional attention, and local_attention=None to silence this")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DistAttnDistributedAttention(None, object(), causal=False)  # nothing to replace: silent
    with pytest.raises(ValueError, match="causal must be True .* or False"):
        DistAttnDistributedAttention(None, object(), causal="bidirectional")
