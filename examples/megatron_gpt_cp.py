"""A tiny Megatron-core GPTModel with distattn as core attention, context-parallel over 2 gloo processes.

    python examples/megatron_gpt_cp.py

Megatron's own local attention refuses CP > 1 without TransformerEngine; with
``distattn.parallel.megatron.get_gpt_layer_spec(scheduler="cad", nano_batches=2)`` it runs on CPU: core
attention disaggregation on packed documents (``packed_seq_params``), each batch cut into two
nano-batches whose attention transfers hide behind each other's linear layers (DistCA's ping-pong).
"""

import torch
import torch.distributed as dist

from distattn.distributed.spawn import run_distributed

SEQ = 64
DOCS = [20, 12, 32]   # the packed documents of the sequence: none sees another


def main_rank(steps: int = 5):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer import TransformerConfig

    from distattn.parallel.megatron import get_gpt_layer_spec

    cp, rank = dist.get_world_size(), dist.get_rank()
    parallel_state.initialize_model_parallel(1, 1, context_parallel_size=cp)
    cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
                            context_parallel_size=cp, attention_dropout=0.0, hidden_dropout=0.0)
    torch.manual_seed(0)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_spec(scheduler="cad", nano_batches=2),
                     vocab_size=128, max_sequence_length=SEQ, position_embedding_type="learned_absolute")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 128, (1, SEQ + 1), generator=torch.Generator().manual_seed(0))
    tokens, labels, pos = ids[:, :-1], ids[:, 1:], torch.arange(SEQ)[None]
    cu = torch.tensor([0, *torch.tensor(DOCS).cumsum(0).tolist()], dtype=torch.int32)
    # sbhd with document boundaries: the batch split as get_batch_on_this_cp_rank splits it
    params = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=SEQ,
                             max_seqlen_kv=SEQ)

    def shard(x):  # get_batch_on_this_cp_rank's zigzag split
        return x.view(1, 2 * cp, SEQ // (2 * cp))[:, [rank, 2 * cp - 1 - rank]].reshape(1, -1)

    losses = []
    for _ in range(steps):
        loss = model(shard(tokens), shard(pos), None, labels=shard(labels), packed_seq_params=params).sum() / SEQ
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item())
    return losses


if __name__ == "__main__":
    for step, loss in enumerate(run_distributed(main_rank, 2)[0]):
        print(f"step {step}: loss {loss:.4f}")
