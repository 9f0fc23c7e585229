"""Megatron-core: a tiny GPTModel (learned absolute positions, CPU) with our core attention at CP=2
gives the loss and gradients of CP=1, plain and with packed sequences."""

import pytest
import torch
import torch.distributed as dist

from distattn.spawn import run_distributed

pytest.importorskip("megatron.core")
S = 48


def _run(packed: bool):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer import TransformerConfig

    from distattn.parallel.megatron import get_gpt_layer_spec

    cp = dist.get_world_size()
    parallel_state.initialize_model_parallel(1, 1, context_parallel_size=cp)
    cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            use_cpu_initialization=True, context_parallel_size=cp, params_dtype=torch.float32,
                            attention_dropout=0.0, hidden_dropout=0.0)
    torch.manual_seed(0)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_spec(), vocab_size=97, max_sequence_length=S,
                     position_embedding_type="learned_absolute")
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 97, (1, S), generator=g), torch.randint(0, 97, (1, S), generator=g)
    pos = torch.arange(S)[None]
    rank = dist.get_rank()

    def shard(x):  # what get_batch_on_this_cp_rank does
        return x.view(1, 2 * cp, S // (2 * cp))[:, [rank, 2 * cp - 1 - rank]].reshape(1, -1)

    params = None
    if packed:
        cu = torch.tensor([0, 10, 11, 30, S], dtype=torch.int32)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=19,
                                 max_seqlen_kv=19)
    loss = model(shard(ids), shard(pos), None, labels=shard(labels), packed_seq_params=params).sum()
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    dist.all_reduce(grads)  # CP ranks hold different tokens: the full gradient is the sum
    total = loss.detach().clone()
    dist.all_reduce(total)
    parallel_state.destroy_model_parallel()
    return total.item(), grads


@pytest.mark.parametrize("packed", [False, True])
def test_gpt_cp2_matches_cp1(packed):
    loss1, grads1 = run_distributed(_run, 1, packed, timeout=300)[0]
    loss2, grads2 = run_distributed(_run, 2, packed, timeout=300)[0]
    assert abs(loss2 - loss1) / loss1 < 1e-6
    assert (grads2 - grads1).abs().max() / grads1.abs().max() < 1e-5
    if packed:  # the document boundaries took effect
        assert abs(run_distributed(_run, 1, False, timeout=300)[0][0] - loss1) > 1e-3
