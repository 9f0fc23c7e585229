"""DeepSpeed ZeRO-2 with distattn's drop-in DistributedAttention: SP 2 x DP 2 on 4 gloo processes.

    python examples/deepspeed_ulysses.py

``SequenceParallelMPU`` tells DeepSpeed which groups to shard and average over;
each rank holds a contiguous half of its replica's sequence, as DeepSpeed expects.
"""

import os
from pathlib import Path

import torch
import torch.distributed as dist

from distattn.distributed.spawn import run_distributed

EXTENSIONS = str(Path(__file__).resolve().parents[1] / ".venv" / "torch_extensions")


class Model(torch.nn.Module):
    def __init__(self, attn, vocab=128, dim=64, heads=4):
        super().__init__()
        self.heads, self.attn = heads, attn
        self.embed = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, vocab)

    def forward(self, tokens):  # [s_local, b]
        x = self.embed(tokens)
        q, k, v = (t.reshape(*t.shape[:2], self.heads, -1) for t in self.qkv(x).chunk(3, dim=-1))
        return self.out(x + self.attn(q, k, v, 1, doc_lens=[40, 88]).flatten(2))


def main_rank(steps: int = 5, sp_size: int = 2):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXTENSIONS)  # DeepSpeed's CPU comm op is built once
    os.environ["LOCAL_RANK"] = str(dist.get_rank())
    import deepspeed

    from distattn.parallel.deepspeed import DistAttnDistributedAttention, SequenceParallelMPU

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    mpu = SequenceParallelMPU.from_world(sp_size)
    torch.manual_seed(0)
    model = Model(DistAttnDistributedAttention(None, mpu.get_sequence_parallel_group(), scheduler="ulysses",
                                                causal=True))  # the mask: causal within each document
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3),
                                      config={"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
                                              "zero_optimization": {"stage": 2}}, mpu=mpu)
    s = 128 // sp_size
    rows = slice(mpu.get_sequence_parallel_rank() * s, (mpu.get_sequence_parallel_rank() + 1) * s)
    g = torch.Generator().manual_seed(mpu.get_data_parallel_rank())
    ids = torch.randint(0, 128, (129, 1), generator=g)
    losses = []
    for _ in range(steps):
        logits = engine(ids[:-1][rows])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), ids[1:][rows].reshape(-1))
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / dist.get_world_size())
    return losses


if __name__ == "__main__":
    for step, loss in enumerate(run_distributed(main_rank, 4, timeout=900)[0]):
        print(f"step {step}: loss {loss:.4f}")
