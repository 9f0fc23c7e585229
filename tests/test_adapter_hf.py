"""HF transformers: a tiny LlamaForCausalLM from config at CP=2 gives the loss and grads of one process."""

import pytest
import torch
import torch.distributed as dist

import distattn
from distattn.distributed.spawn import run_distributed

pytest.importorskip("transformers")

DOCS = [13, 20, 1, 6]


def _model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from distattn.parallel import hf

    hf.register()
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="distattn", dtype=torch.float64)


def _loss_and_grads(model, plan, ids, group):
    from distattn.parallel import hf

    model.zero_grad()
    loss = hf.causal_lm_loss(model(**hf.shard_inputs(plan, ids)).logits, plan, ids, group=group)
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    if group is not None:
        loss = loss.detach().clone()
        dist.all_reduce(loss, group=group)
        dist.all_reduce(grads, group=group)
    return loss.item(), grads


def _worker(scheduler, layout=None):
    model = _model()
    ids = torch.randint(0, 97, (1, sum(DOCS)), generator=torch.Generator().manual_seed(1))
    alone = dist.new_group([dist.get_rank()])  # a one-rank group: the single-process reference
    ref_loss, ref_grads = _loss_and_grads(model, distattn.plan(DOCS, alone), ids, None)
    loss, grads = _loss_and_grads(model, distattn.plan(DOCS, dist.group.WORLD, scheduler=scheduler, layout=layout),
                                  ids, dist.group.WORLD)
    return abs(loss - ref_loss) / ref_loss, (grads - ref_grads).abs().max().item() / ref_grads.abs().max().item()


@pytest.mark.parametrize("scheduler,layout", [("zigzag", None), ("ulysses", None), ("cad", "zigzag")])
def test_llama_cp2_matches_one_process(scheduler, layout):
    for loss_err, grad_err in run_distributed(_worker, 2, scheduler, layout, timeout=300):
        assert loss_err < 1e-12 and grad_err < 1e-10


def test_same_logits_as_hf_sdpa_on_one_document():
    """On a single document our attention is HF's causal attention."""
    model = _model()
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(2))
    model.config._attn_implementation = "sdpa"
    want = model(ids).logits
    model.config._attn_implementation = "distattn"
    results = run_distributed(_one_rank_logits, 1, ids, timeout=120)
    assert (results[0] - want.detach()).abs().max() < 1e-12
    with pytest.raises(ValueError, match="needs distattn_plan=plan"):
        model(ids)


def _one_rank_logits(ids):
    from distattn.parallel import hf

    model = _model()
    plan = distattn.plan([ids.shape[1]], dist.group.WORLD)
    return model(**hf.shard_inputs(plan, ids)).logits.detach()


def _labels_worker():
    from distattn.parallel import hf

    model = _model()
    ids = torch.randint(0, 97, (1, sum(DOCS)), generator=torch.Generator().manual_seed(3))
    plan = distattn.plan(DOCS, dist.group.WORLD, scheduler="zigzag")
    inputs = hf.shard_inputs(plan, ids)
    try:  # what a user of HF's own loss writes: this rank's tokens as its labels
        model(**inputs, labels=inputs["input_ids"])
        error = None
    except ValueError as exc:
        error = str(exc)
    model.config._attn_implementation = "sdpa"
    return error, model(input_ids=ids, labels=ids).loss.item()


def test_labels_under_a_plan_are_refused():
    """HF's labels= would shift labels within this rank's shard (across shard and document
    edges): a wrong loss, so a ValueError on every rank; without a plan HF's loss is untouched."""
    for error, plain_loss in run_distributed(_labels_worker, 2, timeout=120):
        assert error is not None and "labels= with a distattn plan gives a wrong loss" in error
        assert "distattn.parallel.hf.causal_lm_loss(logits, plan, input_ids, group=cp_group)" in error
        assert plain_loss > 0


def _batch_worker(scheduler):
    """A batch of 2 rows under one batched plan at CP=2 against HF's own sdpa run of the same model
    on the same batch in one process (loss from labels=, logits, every gradient); and rows packed
    with documents against the one-process batched plan."""
    from distattn.parallel import hf

    model = _model()
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(4))
    model.config._attn_implementation = "sdpa"
    model.zero_grad()
    theirs = model(input_ids=ids, labels=ids)   # HF's loss reduces in fp32: its value is checked to 1e-6
    ref_loss = torch.nn.functional.cross_entropy(theirs.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    ref_loss.backward()   # the same shifted labels in fp64
    ref_grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.config._attn_implementation = "distattn"
    group = dist.group.WORLD
    plan = distattn.plan([[24], [24]], group, scheduler=scheduler)
    loss, grads = _loss_and_grads(model, plan, ids, group)
    logits = plan.unshard(model(**hf.shard_inputs(plan, ids)).logits.detach())
    rows = [[13, 11], [1, 20, 3]]
    alone = dist.new_group([dist.get_rank()])
    doc_loss, doc_grads = _loss_and_grads(model, distattn.plan(rows, group, scheduler=scheduler), ids, group)
    one_loss, one_grads = _loss_and_grads(model, distattn.plan(rows, alone), ids, None)
    rel = lambda a, b: (a - b).abs().max().item() / b.abs().max().item()  # noqa: E731
    assert abs(theirs.loss.item() - ref_loss.item()) / ref_loss.item() < 1e-6
    return (abs(loss - ref_loss.item()) / ref_loss.item(), rel(logits, theirs.logits.detach()), rel(grads, ref_grads),
            abs(doc_loss - one_loss) / one_loss, rel(doc_grads, one_grads), abs(doc_loss - loss) / loss)


@pytest.mark.parametrize("scheduler", ["zigzag", "ulysses"])
def test_batch_of_two_matches_hf_sdpa(scheduler):
    for loss, logits, grads, doc_loss, doc_grads, docs_differ in run_distributed(_batch_worker, 2, scheduler,
                                                                                 timeout=300):
        assert loss < 1e-12 and logits < 1e-12 and grads < 1e-10
        assert doc_loss < 1e-12 and doc_grads < 1e-10
        assert docs_differ > 1e-3   # the documents took effect
