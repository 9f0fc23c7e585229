"""distattn.compat.ring_flash_attn: ring-flash-attention's functions, each on its own sharding
convention (written here as ring-flash-attention's tests write it), against the fp64 oracle on the
whole sequence: out, lse, dq, dk, dv; and its HF adapter against HF's own single-process run."""

import numpy as np
import pytest
import torch
import torch.distributed as dist

import distattn
from conftest import max_err, rand_qkv
from distattn.compat import _llama3 as llama3_split
from distattn.compat import ring_flash_attn as rfa
from distattn.distributed.spawn import run_distributed

HQ, HKV, D = 4, 2, 8


# --- each function's split, as ring-flash-attention's tests make it ------------------------------------

def ring_local(x, lens, r, p):          # test_ring_flash_attn_varlen_func.extract_local
    starts = [sum(lens[:i]) for i in range(len(lens))]
    return torch.cat([x[s:s + n].chunk(p)[r] for s, n in zip(starts, lens)])


def zigzag_local(x, lens, r, p):        # test_zigzag_ring_flash_attn_varlen_func.extract_local
    starts = [sum(lens[:i]) for i in range(len(lens))]
    parts = [x[s:s + n].chunk(2 * p) for s, n in zip(starts, lens)]
    return torch.cat([c for chunks in parts for c in (chunks[r], chunks[2 * p - 1 - r])])


def llama3_local(x, lens, r, p):        # test_llama3_flash_attn_varlen_func: x[rank * L:(rank + 1) * L]
    n = sum(lens) // p
    return x[r * n:(r + 1) * n]


def stripe_local(x, lens, r, p):        # test_stripe_flash_attn_func.extract_local, per batch row
    starts = [sum(lens[:i]) for i in range(len(lens))]
    return torch.cat([x[s + r:s + n:p] for s, n in zip(starts, lens)])


def local_cu(lens, p):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32) // p


# --- one case: (function, its split, doc lens, causal, window W or None, extra kwargs) ------------------

def _call(name, q, k, v, lens, causal, window_size, r, p, kw):
    """The compat function ``name`` on this rank's q, k, v (already split its way)."""
    forget = kw.pop("forget_prepared", False)
    common = dict(causal=causal, window_size=window_size, return_attn_probs=True, **kw)
    if name in ("ring_flash_attn_varlen_func", "zigzag_ring_flash_attn_varlen_func"):
        cu = local_cu(lens, p)
        return getattr(rfa, name)(q, k, v, cu, int((cu[1:] - cu[:-1]).max()), **common)
    if name == "zigzag_ring_flash_attn_varlen_qkvpacked_func":
        cu = local_cu(lens, p)
        return rfa.zigzag_ring_flash_attn_varlen_qkvpacked_func(torch.stack([q, k, v], 1), cu, 0, **common)
    if name.startswith("llama3"):
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        args = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, causal, r, p)
        if forget:   # as if ring_flash_attn's own prepare made them: found by an all-gather
            llama3_split._prepared.clear()
            llama3_split._last_llama3[:] = [None] * 6
        if name.endswith("kvpacked_func"):
            return rfa.llama3_flash_attn_varlen_kvpacked_func(q, torch.stack([k, v], 1), *args[:4], 1, args[4],
                                                              **common)
        return rfa.llama3_flash_attn_varlen_func(q, k, v, *args[:4], heads_k_stride=1, local_k_slice=args[4],
                                                 **common)
    # batch functions: rows of equal length
    b = len(lens)
    q, k, v = (t.view(b, -1, *t.shape[1:]) for t in (q, k, v))
    if name.endswith("qkvpacked_func"):
        out, lse, none = getattr(rfa, name)(torch.stack([q, k, v], 2), **common)
    elif name.endswith("kvpacked_func"):
        out, lse, none = getattr(rfa, name)(q, torch.stack([k, v], 2), **common)
    else:
        out, lse, none = getattr(rfa, name)(q, k, v, **common)
    assert lse.shape == (b, HQ, q.shape[1]) and none is None
    return out.reshape(-1, *out.shape[2:]), lse.transpose(0, 1).reshape(HQ, -1), None


SPLIT = {"ring_flash_attn_varlen_func": ring_local, "zigzag_ring_flash_attn_varlen_func": zigzag_local,
         "zigzag_ring_flash_attn_varlen_qkvpacked_func": zigzag_local, "llama3_flash_attn_varlen_func": llama3_local,
         "llama3_flash_attn_varlen_kvpacked_func": llama3_local, "ring_flash_attn_func": ring_local,
         "ring_flash_attn_kvpacked_func": ring_local, "zigzag_ring_flash_attn_func": zigzag_local,
         "zigzag_ring_flash_attn_qkvpacked_func": zigzag_local, "stripe_flash_attn_func": stripe_local,
         "stripe_flash_attn_kvpacked_func": stripe_local, "stripe_flash_attn_qkvpacked_func": stripe_local}


def cases(p):
    """A covering slice: every function, causal and not, windows, another scheduler, GQA."""
    z = 2 * p
    return [
        ("ring_flash_attn_varlen_func", [3 * p, p, 5 * p], True, None, {}),
        ("ring_flash_attn_varlen_func", [2 * p, 7 * p], False, 3, {"scheduler": "allgather"}),
        ("zigzag_ring_flash_attn_varlen_func", [z, 3 * z, 2 * z], True, None, {}),
        ("zigzag_ring_flash_attn_varlen_func", [z, 3 * z], True, 5, {"scheduler": "ring"}),
        ("zigzag_ring_flash_attn_varlen_func", [2 * z, z], False, None, {}),
        ("zigzag_ring_flash_attn_varlen_qkvpacked_func", [3 * z, z], True, None, {}),
        ("llama3_flash_attn_varlen_func", [5, 1, 17, 9], True, None, {}),
        ("llama3_flash_attn_varlen_func", [13, 3, 8, 8], False, None, {}),
        ("llama3_flash_attn_varlen_func", [11, 20, 1], True, 4, {"forget_prepared": True}),
        ("llama3_flash_attn_varlen_kvpacked_func", [7, 25], True, None, {"scheduler": "zigzag"}),
        ("ring_flash_attn_func", [3 * p, 3 * p], True, None, {}),
        ("ring_flash_attn_kvpacked_func", [4 * p], False, None, {}),
        ("zigzag_ring_flash_attn_func", [2 * z, 2 * z], True, None, {}),
        ("zigzag_ring_flash_attn_qkvpacked_func", [3 * z], True, 6, {}),
        # stripe: one band per (query rank, key rank, row), every scheduler on the striped layout
        ("stripe_flash_attn_func", [5 * p, 5 * p], True, None, {}),
        ("stripe_flash_attn_func", [3 * p, 3 * p], False, None, {}),
        ("stripe_flash_attn_func", [4 * p], True, 3, {"scheduler": "allgather"}),
        ("stripe_flash_attn_kvpacked_func", [6 * p], True, None, {"scheduler": "zigzag"}),
        ("stripe_flash_attn_qkvpacked_func", [2 * p, 2 * p], False, 5, {}),
        ("stripe_flash_attn_func", [7 * p], True, None, {"scheduler": "zigzag"}),
        ("stripe_flash_attn_func", [5 * p, 5 * p], True, None, {}),
    ]


def _case(name, lens, causal, window, kw, seed):
    r, p = dist.get_rank(), dist.get_world_size()
    split = SPLIT[name]
    hkv = HQ if "qkvpacked" in name else HKV   # one stacked tensor: as many KV heads as query heads
    q, k, v = rand_qkv(sum(lens), sum(lens), HQ, hkv, D, seed=seed)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = distattn.reference_attention(*ref_in, lens, causal=causal, window=window, return_lse=True)
    ref.backward(dout)
    mine = [split(t, lens, r, p).clone().requires_grad_() for t in (q, k, v)]
    w = -1 if window is None else window - 1
    out, lse, none = _call(name, *mine, lens, causal, (w, w), r, p, dict(kw))
    out.backward(split(dout, lens, r, p))
    assert none is None and lse.shape == (HQ, out.shape[0])
    errs = [max_err(out.detach(), split(ref.detach(), lens, r, p)),
            max_err(lse, split(ref_lse.detach(), lens, r, p).t())]
    return max(errs + [max_err(a.grad, split(b.grad, lens, r, p)) for a, b in zip(mine, ref_in)])


def _worker():
    p = dist.get_world_size()
    rows = [(name, lens, causal, window, _case(name, lens, causal, window, kw, seed=i))
            for i, (name, lens, causal, window, kw) in enumerate(cases(p))]
    # the layers of a step share one plan: calling again plans nothing
    before = distattn.runtime.varlen.PLANS.made
    _case(*cases(p)[-1], seed=0)
    return rows, distattn.runtime.varlen.PLANS.made - before


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_function_on_its_split_matches_fp64_oracle(world):
    for rows, new_plans in run_distributed(_worker, world, timeout=240):
        assert new_plans == 0
        assert len(rows) == len(cases(world))
        for name, lens, causal, window, err in rows:
            assert err <= 1e-12, (world, name, lens, causal, window, err)


def test_unsupported_arguments_name_themselves():
    q = torch.zeros(8, 2, 4)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="dropout_p=0.1: distattn has no attention dropout"):
        rfa.zigzag_ring_flash_attn_varlen_func(q, q, q, cu, 8, dropout_p=0.1)
    with pytest.raises(ValueError, match="alibi_slopes is not supported"):
        rfa.ring_flash_attn_func(q[None], q[None], q[None], alibi_slopes=torch.ones(2))
    with pytest.raises(ValueError, match="alibi_slopes is not supported"):
        rfa.llama3_flash_attn_varlen_func(q, q, q, cu, cu, 8, 8, 1, slice(0, 8), alibi_slopes=torch.ones(2))


def test_llama3_prepare_is_ring_flash_attentions():
    """Values of ring-flash-attention's own function (checked against its source on 2070 random
    cases when this was written) for its test's cu_seqlens [0, 120, 1248, 4232] on 8 ranks."""
    cu = torch.tensor([0, 120, 1248, 4232], dtype=torch.int32)
    cu_q, cu_k, max_q, max_k, kslice = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, True, 1, 8)
    assert cu_q.tolist() == [0, 529] and cu_k.tolist() == [0, 938] and (max_q, max_k) == (529, 938)
    assert kslice == slice(120, 1058)
    cu_q, cu_k, max_q, max_k, kslice = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, False, 0, 8)
    assert cu_q.tolist() == [0, 120, 529] and cu_k.tolist() == [0, 120, 1248] and kslice == slice(0, 1248)
    with pytest.raises(ValueError, match="multiple of world_size = 3"):
        rfa.llama3_flash_attn_prepare_cu_seqlens(cu, True, 0, 3)


# --- the HF adapter ------------------------------------------------------------------------------------

DOCS = [13, 20, 1, 6]     # 40 tokens: 20 a rank, documents crossing the split


def _model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float64)


def _loss_grads(model, ids, pos, labels, count):
    model.zero_grad()
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[0], labels, ignore_index=-100, reduction="sum") / count
    loss.backward()
    return loss.detach(), logits.detach()[0], torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _hf_worker():
    from distattn.planning.labels import next_token_labels

    r, p = dist.get_rank(), dist.get_world_size()
    model = _model()
    ids = torch.randint(0, 97, (1, sum(DOCS)), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(n) for n in DOCS])[None]
    labels = next_token_labels(ids[0], DOCS)
    count = (labels != -100).sum()
    # HF's own run: sdpa on the packed sequence (documents found from the position ids)
    ref_loss, ref_logits, ref_grads = _loss_grads(model, ids, pos, labels, count)

    rfa.substitute_hf_flash_attn(dist.group.WORLD, heads_k_stride=1)
    model.config._attn_implementation = "flash_attention_2"
    cu = torch.tensor([0, *torch.tensor(DOCS).cumsum(0).tolist()], dtype=torch.int32)
    rfa.update_ring_flash_attn_params(cu, dist.group.WORLD)
    plans = distattn.runtime.varlen.PLANS.made
    loss, logits, grads = _loss_grads(model, ids.chunk(p, 1)[r], pos.chunk(p, 1)[r], labels.chunk(p)[r], count)
    assert distattn.runtime.varlen.PLANS.made == plans + 1   # distattn ran it, one plan for both layers
    dist.all_reduce(loss)
    dist.all_reduce(grads)
    rel = (grads - ref_grads).abs().max() / ref_grads.abs().max()
    return (abs(loss - ref_loss) / ref_loss).item(), max_err(logits, ref_logits.chunk(p)[r]), rel.item()


def test_hf_llama_substituted_matches_hf_single_process():
    pytest.importorskip("transformers")
    for loss_err, logits_err, grad_err in run_distributed(_hf_worker, 2, timeout=240):
        assert loss_err < 1e-12 and logits_err < 1e-12 and grad_err < 1e-12, (loss_err, logits_err, grad_err)


def _stripe_worker():
    p = dist.get_world_size()
    return [(name, lens, causal, window, _case(name, lens, causal, window, kw, seed=i))
            for i, (name, lens, causal, window, kw) in enumerate(cases(p)) if name.startswith("stripe")]


@pytest.mark.parametrize("world", [3, 8])
def test_stripe_at_odd_and_larger_worlds_matches_fp64_oracle(world):
    """The stripe split's one band per (query rank, key rank, row): causal, windows, other schedulers."""
    for rows in run_distributed(_stripe_worker, world, timeout=300):
        assert len(rows) == 7
        for name, lens, causal, window, err in rows:
            assert err <= 1e-12, (world, name, lens, causal, window, err)


def test_the_stripe_split_is_a_band_per_rank_pair_not_a_segment_per_token():
    from distattn.compat._splits import SPLITS

    lens, p = (3824, 64), 4
    plan = distattn.plan(lens, p, scheduler="ring", layout=SPLITS["stripe"].layout(lens, p))
    assert len(plan.schedule.mask) <= len(lens) * p * p   # (it was a segment per token)
    stats = plan.stats(2, 2, 8)
    assert stats["kernel_segments"] == [2] * p and not stats["fragmented"], stats
