"""A tiny HF LlamaForCausalLM trained context-parallel on 2 local gloo processes with distattn.

    python examples/hf_llama_cp.py

Each rank holds half of one packed sequence of documents; attention runs through
attn_implementation="distattn"; gradients are summed over the CP group.
"""

import torch
import torch.distributed as dist

import distattn
from distattn.parallel import hf
from distattn.distributed.spawn import run_distributed


def main_rank(steps: int = 5):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf.register()
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="distattn")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    doc_lens = [700, 120, 1200, 28]
    group = dist.group.WORLD
    losses = []
    for step in range(steps):
        ids = torch.randint(0, 256, (1, sum(doc_lens)), generator=torch.Generator().manual_seed(step % 2))
        plan = distattn.plan(doc_lens, group, scheduler="zigzag")
        loss = hf.causal_lm_loss(model(**hf.shard_inputs(plan, ids)).logits, plan, ids, group=group)
        loss.backward()
        for p in model.parameters():  # CP ranks hold different tokens: sum their gradients
            dist.all_reduce(p.grad, group=group)
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total, group=group)
        losses.append(total.item())
    return losses


if __name__ == "__main__":
    for step, loss in enumerate(run_distributed(main_rank, 2)[0]):
        print(f"step {step}: loss {loss:.4f}")
