"""Megatron-core: a tiny GPTModel (CPU) with our core attention under CP gives the loss, logits and
gradients of CP=1: learned positions, plain and packed (sbhd); Megatron's RoPE with padded packed
thd documents split per document as TransformerEngine does (CP=2, 4 against CP=1, and CP=1 against
Megatron's own local attention, fp64); attention masks and documents honoured or refused."""

import contextlib

import pytest
import torch
import torch.distributed as dist

from distattn.distributed.spawn import run_distributed

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
        # sbhd with document boundaries keeps the whole-sequence zigzag split (thd: per document, below)
        params = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=19,
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


# ---- packed thd documents with Megatron's own RoPE: the per-document layout ---------------------
REAL = [16, 5, 24, 37]  # document lengths; Megatron pads each to a multiple of 2 * cp (cp = 1, 2, 4) ...
PADDED = [16, 8, 24, 40]  # ... giving cu_seqlens_q_padded, which both RoPE and the adapter split


@contextlib.contextmanager
def _megatron_on_cpu():
    """Megatron-core code on this path that assumes CUDA, pointed at the CPU (test only):

    * ``torch.cuda.current_device`` -> ``"cpu"``: ``RotaryEmbedding.get_emb`` moves its ``inv_freq``
      to the current CUDA device on the first forward;
    * ``fused_softmax.get_default_causal_mask``: the local ``DotProductAttention`` (the CP=1
      reference) builds its causal mask with ``device="cuda"`` when ``attention_mask`` is None;
    * ``tensor_parallel.get_cuda_rng_tracker``: the same ``DotProductAttention`` forks the CUDA RNG
      around its attention dropout (p = 0 here), so a tracker whose fork does nothing.
    Nothing else changes: the RoPE (``_apply_rotary_pos_emb_thd``) and the attention math are Megatron's.
    """
    from unittest import mock

    class _NoRngTracker:
        def fork(self, *args, **kwargs):
            return contextlib.nullcontext()

    with mock.patch("torch.cuda.current_device", lambda: "cpu"), \
            mock.patch("megatron.core.fusions.fused_softmax.get_default_causal_mask",
                       lambda sq: torch.ones(sq, sq, dtype=torch.bool).triu(1)), \
            mock.patch("megatron.core.tensor_parallel.get_cuda_rng_tracker", lambda *a, **k: _NoRngTracker()):
        yield


def _gpt(cp: int, spec):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            use_cpu_initialization=True, context_parallel_size=cp, params_dtype=torch.float64,
                            attention_dropout=0.0, hidden_dropout=0.0)
    torch.manual_seed(0)  # the same weights for every CP size and for the reference
    model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=97, max_sequence_length=sum(PADDED),
                     position_embedding_type="rope").to(torch.float64)
    # RotaryEmbedding keeps inv_freq as a plain fp32 attribute (not a buffer, so .to() misses it):
    # make the rotary angles fp64 too, so that the whole computation is fp64
    model.rotary_pos_emb.inv_freq = model.rotary_pos_emb.inv_freq.double()
    return model


def _thd_partitioned_indices(cu_padded: list[int], cp: int, rank: int) -> torch.Tensor:
    """The tokens of ``rank``, as TransformerEngine's ``thd_get_partitioned_indices`` picks them for
    Megatron's ``get_thd_batch_on_this_cp_rank``: chunks ``rank`` and ``2cp-1-rank`` of every document
    (written out here, independent of distattn's plan)."""
    out = []
    for start, end in zip(cu_padded[:-1], cu_padded[1:]):
        chunk = (end - start) // (2 * cp)
        out += [torch.arange(start + c * chunk, start + (c + 1) * chunk) for c in (rank, 2 * cp - 1 - rank)]
    return torch.cat(out)


def _thd_batch():
    """Token ids and labels of the padded packed batch, and which positions hold real tokens."""
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(1, 97, (sum(PADDED),), generator=g), torch.randint(0, 97, (sum(PADDED),), generator=g)
    real = torch.cat([torch.arange(n) < r for r, n in zip(REAL, PADDED)])
    ids[~real] = 0  # padding
    return ids, labels, real


def _megatron_reference(ids, labels, real):
    """Megatron's own local spec at CP=1, one document at a time (its DotProductAttention takes no
    packed_seq_params): loss, logits of the real tokens, gradients."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    model = _gpt(1, get_gpt_layer_local_spec())
    ids, labels = ids[real], labels[real]
    logits, start = [], 0
    for n in REAL:
        logits.append(model(ids[None, start:start + n], torch.arange(n)[None], None)[0])
        start += n
    logits = torch.cat(logits)
    loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    loss.backward()
    return loss.item(), logits.detach(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _run_thd_rope():
    """Each CP rank holds its per-document share of the packed thd batch (as Megatron splits THD):
    fp64 loss, logits of the real tokens in global order and summed gradients; at CP=1 also
    Megatron's own reference."""
    from megatron.core import parallel_state
    from megatron.core.packed_seq_params import PackedSeqParams

    from distattn.parallel.megatron import get_gpt_layer_spec

    cp, rank = dist.get_world_size(), dist.get_rank()
    parallel_state.initialize_model_parallel(1, 1, context_parallel_size=cp)
    ids, labels, real = _thd_batch()
    cu_real = torch.tensor([0, *torch.tensor(REAL).cumsum(0).tolist()], dtype=torch.int32)
    cu_padded = torch.tensor([0, *torch.tensor(PADDED).cumsum(0).tolist()], dtype=torch.int32)
    mine = _thd_partitioned_indices(cu_padded.tolist(), cp, rank)
    # as get_thd_batch_on_this_cp_rank builds it: cu_seqlens of the whole (global) batch
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_real, cu_seqlens_kv=cu_real,
                             cu_seqlens_q_padded=cu_padded, cu_seqlens_kv_padded=cu_padded,
                             max_seqlen_q=max(PADDED), max_seqlen_kv=max(PADDED))
    with _megatron_on_cpu():
        model = _gpt(cp, get_gpt_layer_spec())
        logits = model(ids[mine][None], None, None, packed_seq_params=params)[0]  # [t/cp, vocab]
        assert logits.dtype == torch.float64
        loss = torch.nn.functional.cross_entropy(logits, labels[mine], reduction="none")[real[mine]].sum()
        loss.backward()
        reference = _megatron_reference(ids, labels, real) if cp == 1 else None
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    dist.all_reduce(grads)  # CP ranks hold different tokens: the full gradient is the sum
    total_loss = loss.detach().clone()
    dist.all_reduce(total_loss)
    gathered = [torch.empty_like(logits.detach()) for _ in range(cp)]
    dist.all_gather(gathered, logits.detach().contiguous())
    full = torch.empty(sum(PADDED), logits.shape[-1], dtype=logits.dtype)
    for r in range(cp):
        full[_thd_partitioned_indices(cu_padded.tolist(), cp, r)] = gathered[r]
    parallel_state.destroy_model_parallel()
    return (total_loss.item(), full[real], grads), reference


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_thd_documents_with_rope_match_cp1():
    (loss1, logits1, grads1), (loss0, logits0, grads0) = run_distributed(_run_thd_rope, 1, timeout=300)[0]
    # CP=1 through the adapter is Megatron's own attention, document by document
    assert abs(loss1 - loss0) / loss0 <= 1e-12
    assert _rel(logits1, logits0) <= 1e-12 and _rel(grads1, grads0) <= 1e-12
    for cp in (2, 4):
        (loss, logits, grads), _ = run_distributed(_run_thd_rope, cp, timeout=300)[0]
        assert abs(loss - loss1) / loss1 <= 1e-12, cp
        assert _rel(logits, logits1) <= 1e-12, (cp, _rel(logits, logits1))
        assert _rel(grads, grads1) <= 1e-12, (cp, _rel(grads, grads1))


def _run_mbs2():
    """Micro-batch size 2 (sbhd, a sequence per row, Megatron's RoPE), fp64: each CP rank holds
    get_batch_on_this_cp_rank's zigzag chunks of both rows, and the layers run one batched plan;
    loss, logits in global order, summed gradients -- at CP=1 also Megatron's own local attention
    on the same batch."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_cpu import megatron_on_cpu   # (also RoPE's CP position index, made for the GPU)

    from distattn.parallel.megatron import get_gpt_layer_spec

    cp, rank = dist.get_world_size(), dist.get_rank()
    parallel_state.initialize_model_parallel(1, 1, context_parallel_size=cp)
    g = torch.Generator().manual_seed(7)
    ids, labels = torch.randint(0, 97, (2, S), generator=g), torch.randint(0, 97, (2, S), generator=g)
    n = S // (2 * cp)

    def mine(r):
        return torch.cat([torch.arange(c * n, (c + 1) * n) for c in (r, 2 * cp - 1 - r)])

    def run(spec, index):
        model = _gpt(cp if spec is None else 1, spec or get_gpt_layer_spec())
        logits = model(ids[:, index], None, None)   # [b, s/cp, vocab]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, index].reshape(-1),
                                                 reduction="sum")
        loss.backward()
        return loss.detach(), logits.detach(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    with megatron_on_cpu():
        loss, logits, grads = run(None, mine(rank))
        reference = run(get_gpt_layer_local_spec(), torch.arange(S)) if cp == 1 else None
    dist.all_reduce(grads)
    dist.all_reduce(loss)
    gathered = [torch.empty_like(logits) for _ in range(cp)]
    dist.all_gather(gathered, logits.contiguous())
    full = torch.empty(2, S, logits.shape[-1], dtype=logits.dtype)
    for r in range(cp):
        full[:, mine(r)] = gathered[r]
    parallel_state.destroy_model_parallel()
    return (loss.item(), full, grads), reference


def test_micro_batch_of_two_matches_megatron_and_cp1():
    (loss1, logits1, grads1), (loss0, logits0, grads0) = run_distributed(_run_mbs2, 1, timeout=300)[0]
    assert abs(loss1 - loss0) / loss0 <= 1e-12   # CP=1 through the adapter is Megatron's own attention
    assert _rel(logits1, logits0) <= 1e-12 and _rel(grads1, grads0) <= 1e-12
    for cp in (2, 4):
        (loss, logits, grads), _ = run_distributed(_run_mbs2, cp, timeout=300)[0]
        assert abs(loss - loss1) / loss1 <= 1e-12, cp
        assert _rel(logits, logits1) <= 1e-12 and _rel(grads, grads1) <= 1e-12, cp


def _refusal_worker():
    """One core attention layer under CP=2: outputs or ValueError texts for Megatron-LM's own
    attention masks (get_ltor_masks_and_position_ids, split by get_batch_on_this_cp_rank) and for a
    thd document that is not a multiple of 2 * cp."""
    from megatron.core import parallel_state
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.utils import get_batch_on_this_cp_rank

    from distattn.parallel.megatron import DistAttnCoreAttention

    cp = dist.get_world_size()
    parallel_state.initialize_model_parallel(1, 1, context_parallel_size=cp)
    cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True,
                            context_parallel_size=cp, attention_dropout=0.0, hidden_dropout=0.0)
    attn = DistAttnCoreAttention(cfg, 1, AttnMaskType.causal)
    s, eod = 16, 0
    q, k, v = (torch.randn(s // cp, 1, 2, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    tokens = torch.arange(1, s + 1)
    tokens[7] = eod  # two documents of 8 tokens

    def attempt(**kwargs):
        try:
            return attn(q, k, v, **kwargs), None
        except ValueError as exc:
            return None, str(exc)

    results = {}
    for reset in (False, True):  # True: Megatron-LM's --reset-attention-mask
        mask, _, _ = _get_ltor_masks_and_position_ids(tokens, eod, reset_position_ids=False,
                                                      reset_attention_mask=reset, eod_mask_loss=False,
                                                      create_attention_mask=True)
        mask = get_batch_on_this_cp_rank({"attention_mask": mask[None]})["attention_mask"]  # [1, 1, s/cp, s]
        out, error = attempt(attention_mask=mask)
        results["documents" if reset else "causal"] = (out is not None and torch.equal(out, attn(q, k, v)), error)
    cu = torch.tensor([0, 6, s], dtype=torch.int32)  # a 6-token document: not a multiple of 2 * cp = 4
    thd = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=10, max_seqlen_kv=10)
    results["thd"] = attempt(attention_mask=None, packed_seq_params=thd)[1]
    parallel_state.destroy_model_parallel()
    return results


def test_attention_masks_and_thd_documents_are_honoured_or_refused():
    for res in run_distributed(_refusal_worker, 2, timeout=300):
        assert res["causal"] == (True, None)  # Megatron-LM's default causal mask: honoured
        ok, error = res["documents"]
        assert not ok and "honours attention_mask only when it is None or the layer's own causal mask" in error
        assert "(e.g. --reset-attention-mask) pass packed_seq_params with cu_seqlens_q" in error
        assert "document 0 has 6 tokens" in res["thd"] and "pad each document to a multiple of 4" in res["thd"]


def _run_choice():
    """Two micro-batches, gradients accumulated, fp64: each run with a scheduler of its own
    (MicroBatchChoice), then both with the spec's zigzag."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer import TransformerConfig

    from distattn.parallel.megatron import MicroBatchChoice, get_gpt_layer_spec

    cp, rank = dist.get_world_size(), dist.get_rank()
    parallel_state.initialize_model_parallel(1, 1, context_parallel_size=cp)
    cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            use_cpu_initialization=True, context_parallel_size=cp, params_dtype=torch.float64,
                            attention_dropout=0.0, hidden_dropout=0.0)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, 97, (1, S), generator=g), torch.randint(0, 97, (1, S), generator=g), cu)
               for cu in ([0, 10, 11, 30, S], [0, 40, S])]

    def shard(x):
        return x.view(1, 2 * cp, S // (2 * cp))[:, [rank, 2 * cp - 1 - rank]].reshape(1, -1)

    def train(choices):
        choice = MicroBatchChoice()
        torch.manual_seed(0)
        model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_spec(choice=choice), vocab_size=97,
                         max_sequence_length=S, position_embedding_type="learned_absolute").to(torch.float64)
        pos, total = torch.arange(S)[None], 0.0
        for (ids, labels, cu), picked in zip(batches, choices):
            if picked is None:
                choice.clear()
            else:
                choice.set(*picked)
            cu = torch.tensor(cu, dtype=torch.int32)
            params = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=S,
                                     max_seqlen_kv=S)
            loss = model(shard(ids), shard(pos), None, labels=shard(labels), packed_seq_params=params).sum()
            loss.backward()
            total += loss.item()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        dist.all_reduce(grads)
        return total, grads, model, choice

    chosen = train([("ulysses", cp), ("allgather", cp)])
    fixed = train([None, None])
    # a choice of another CP size than Megatron's groups is refused, naming both
    _, _, model, choice = chosen
    choice.set("zigzag", 2 * cp)
    ids, labels, cu = batches[0]
    cu = torch.tensor(cu, dtype=torch.int32)
    try:
        model(shard(ids), shard(torch.arange(S)[None]), None, labels=shard(labels),
              packed_seq_params=PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                                max_seqlen_q=S, max_seqlen_kv=S))
        refused = None
    except ValueError as e:
        refused = str(e)
    parallel_state.destroy_model_parallel()
    return chosen[:2], fixed[:2], refused


def test_a_choice_per_micro_batch_gives_the_fixed_schedulers_gradients():
    for chosen, fixed, refused in run_distributed(_run_choice, 2, timeout=300):
        assert abs(chosen[0] - fixed[0]) <= 1e-12 * abs(fixed[0])
        assert torch.allclose(chosen[1], fixed[1], rtol=1e-12, atol=1e-14)
        assert refused is not None and "cp=4" in refused and "2 ranks" in refused, refused
