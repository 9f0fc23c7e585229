"""Megatron-core on CPU gloo ranks, under its own tensor, pipeline, data and context parallelism, with
distattn's core attention -- against Megatron's own single-process run of its local spec (fp64).

Used by ``tests/test_megatron_parallel.py``. The harness:

* :func:`megatron_on_cpu` -- the CUDA-only calls on this path pointed at the CPU (tests only, never
  in installed code);
* :func:`set_weights` -- every parameter set from a full tensor drawn per *global* parameter name,
  TP shards cut from it along Megatron's ``partition_dim``: the same weights at any TP x PP shape;
* :func:`reference` -- Megatron's local spec at TP = PP = CP = 1, one document at a time (its
  ``DotProductAttention`` takes no packed sequences): loss, logits and every gradient per batch;
* :func:`parallel_run` -- one rank of a TP x CP x DP x PP job: ``GPTModel`` with
  ``distattn.parallel.megatron.get_gpt_layer_spec(scheduler=...)`` driven by Megatron's
  ``get_forward_backward_func`` (1F1B under PP), batches split as Megatron splits them
  (``get_batch_on_this_cp_rank``'s zigzag for ``sbhd``, TransformerEngine's per-document split for
  ``thd``); every gradient summed over the CP and DP groups and compared with the reference's
  shard, logits and loss on the last stage; and the nano-batch pieces each forward ran, in order
  (``distattn.parallel.megatron_pingpong.run_piece`` recorded).
"""

from __future__ import annotations

import contextlib
import zlib
from unittest import mock

import torch
import torch.distributed as dist

VOCAB, HIDDEN, HEADS, GROUPS, LAYERS = 96, 64, 4, 2, 2
# packed batches of the same length (a pipeline sends fixed shapes): real document lengths and, for
# thd, each padded to a multiple of 2 * cp (cp <= 2 here), as Megatron pads them; C is one document
# (it cannot be cut into nano-batches)
BATCHES = {"A": ([16, 5, 24, 37], [16, 8, 24, 40]), "B": ([3, 40, 29, 9], [4, 40, 32, 12]), "C": ([85], [88])}
# sbhd: one sequence per row, no packed_seq_params; sbhd-packed: documents marked by cu_seqlens; thd
FORMATS = ("sbhd", "sbhd-packed", "thd")


@contextlib.contextmanager
def megatron_on_cpu():
    """Megatron-core code on this path that assumes CUDA, pointed at the CPU (test only):

    * ``torch.cuda.current_device`` -> ``"cpu"``: RoPE's ``inv_freq`` and the pipeline's receive
      buffers and shape tensors are made on the current CUDA device;
    * ``torch.cuda.synchronize`` -> nothing: the pipeline's p2p guards ``batch_isend_irecv`` with it;
    * ``torch.zeros(..., device="cuda")`` -> CPU: the 1F1B schedule's token counter;
    * ``torch.tensor(..., pin_memory=True).cuda()`` -> a CPU tensor: RoPE's zigzag position index
      under context parallelism (``get_pos_emb_on_this_cp_rank``);
    * ``fused_softmax.get_default_causal_mask``: the local ``DotProductAttention`` (the reference)
      builds its causal mask with ``device="cuda"``;
    * ``tensor_parallel.get_cuda_rng_tracker``: the same attention forks the CUDA RNG around its
      dropout (p = 0 here), so a tracker whose fork does nothing.
    The model math, RoPE, TP layers and schedules are Megatron's own."""
    class _NoRngTracker:
        def fork(self, *args, **kwargs):
            return contextlib.nullcontext()

    real_zeros, real_tensor = torch.zeros, torch.tensor

    def zeros(*args, device=None, **kwargs):
        return real_zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)

    def tensor(*args, pin_memory=False, **kwargs):
        return real_tensor(*args, **kwargs)

    with mock.patch("torch.cuda.current_device", lambda: "cpu"), \
            mock.patch("megatron.core.models.common.embeddings.rope_utils.torch.tensor", tensor), \
            mock.patch("torch.Tensor.cuda", lambda self, *a, **k: self), \
            mock.patch("torch.cuda.synchronize", lambda *a, **k: None), \
            mock.patch("megatron.core.pipeline_parallel.schedules.torch.zeros", zeros), \
            mock.patch("megatron.core.fusions.fused_softmax.get_default_causal_mask",
                       lambda sq: torch.ones(sq, sq, dtype=torch.bool).triu(1)), \
            mock.patch("megatron.core.tensor_parallel.get_cuda_rng_tracker", lambda *a, **k: _NoRngTracker()):
        yield


def gpt(spec, tp: int = 1, pp: int = 1, cp: int = 1, first: bool = True, last: bool = True, **config):
    """A tiny fp64 GPTModel with RoPE and GQA (untied output layer, full-vocabulary logits);
    ``config``: other TransformerConfig fields."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                            num_query_groups=GROUPS, use_cpu_initialization=True, tensor_model_parallel_size=tp,
                            pipeline_model_parallel_size=pp, context_parallel_size=cp, params_dtype=torch.float64,
                            pipeline_dtype=torch.float64, attention_dropout=0.0, hidden_dropout=0.0,
                            calculate_per_token_loss=True, **config)
    model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=128,
                     pre_process=first, post_process=last, position_embedding_type="rope", parallel_output=False,
                     share_embeddings_and_output_weights=False).to(torch.float64)
    # RotaryEmbedding keeps inv_freq as a plain fp32 attribute (.to() misses it): fp64 throughout
    model.rotary_pos_emb.inv_freq = model.rotary_pos_emb.inv_freq.double()
    return model


def global_name(name: str, layer_offset: int) -> str:
    """A parameter's name with its stage-local layer index made global (pipeline stages)."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(int(parts[2]) + layer_offset)
    return ".".join(parts)


def full_tensor(name: str, shape) -> torch.Tensor:
    """The full (unsharded) value of parameter ``name``, the same in every process."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    noise = torch.randn(tuple(shape), generator=g, dtype=torch.float64)
    return 1 + 0.1 * noise if "layernorm.weight" in name or "norm.weight" in name else 0.05 * noise


def shards(model, tp: int, tp_rank: int, layer_offset: int):
    """``(param, its global name, its TP partition dim or None)`` for every parameter."""
    for name, p in model.named_parameters():
        dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) and tp > 1 else None
        yield p, global_name(name, layer_offset), dim


def cut(full: torch.Tensor, dim, tp: int, tp_rank: int) -> torch.Tensor:
    return full if dim is None else full.chunk(tp, dim=dim)[tp_rank]


def set_weights(model, tp: int = 1, tp_rank: int = 0, layer_offset: int = 0) -> None:
    with torch.no_grad():
        for p, name, dim in shards(model, tp, tp_rank, layer_offset):
            shape = list(p.shape)
            if dim is not None:
                shape[dim] *= tp
            p.copy_(cut(full_tensor(name, shape), dim, tp, tp_rank))


def batch(name: str, fmt: str):
    """``(docs, ids [T], labels [T], real [T] bool)``: sbhd-packed holds the padded lengths as real
    documents, sbhd one document of all the tokens."""
    real_lens, padded = BATCHES[name]
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    total = sum(padded)
    ids, labels = torch.randint(1, VOCAB, (total,), generator=g), torch.randint(0, VOCAB, (total,), generator=g)
    if fmt != "thd":
        return padded if fmt == "sbhd-packed" else [total], ids, labels, torch.ones(total, dtype=torch.bool)
    real = torch.cat([torch.arange(n) < r for r, n in zip(real_lens, padded)])
    ids[~real] = 0
    return padded, ids, labels, real


def split_indices(fmt: str, docs, cp: int, rank: int) -> torch.Tensor:
    """The tokens Megatron gives CP rank ``rank`` (written out here, independent of distattn):
    ``get_batch_on_this_cp_rank``'s chunks ``rank`` and ``2cp-1-rank`` of the sequence (sbhd), or
    ``thd_get_partitioned_indices``' chunks of every document (thd)."""
    spans = [(0, sum(docs))] if fmt != "thd" else list(zip(torch.tensor([0, *docs]).cumsum(0)[:-1].tolist(),
                                                             torch.tensor(docs).cumsum(0).tolist()))
    out = []
    for start, end in spans:
        chunk = (end - start) // (2 * cp)
        out += [torch.arange(start + c * chunk, start + (c + 1) * chunk) for c in (rank, 2 * cp - 1 - rank)]
    return torch.cat(out)


def packed_params(fmt: str, docs, real):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32)
    if fmt == "sbhd":
        return None
    if fmt == "sbhd-packed":  # RoPE spans max_seqlen_q positions of the sbhd sequence: all of it (what a document
        # sees is relative, so the positions need not restart at documents)
        return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=sum(docs),
                               max_seqlen_kv=sum(docs))
    lens = torch.stack([r.sum() for r in torch.split(real, docs)])
    cu_real = torch.tensor([0, *lens.cumsum(0).tolist()], dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_real, cu_seqlens_kv=cu_real, cu_seqlens_q_padded=cu,
                           cu_seqlens_kv_padded=cu, max_seqlen_q=max(docs), max_seqlen_kv=max(docs))


def reference(names=tuple(BATCHES), formats=FORMATS) -> dict:
    """Inside one gloo rank: Megatron's local spec at TP = PP = CP = 1, document by document, fp64:
    ``{(batch, fmt): (loss, logits [T, V] (zeros on padding), {global name: full grad})}``."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    parallel_state.initialize_model_parallel(1, 1, context_parallel_size=1)
    out = {}
    with megatron_on_cpu():
        for name in names:
            for fmt in formats:
                model = gpt(get_gpt_layer_local_spec())
                set_weights(model)
                out[(name, fmt)] = run_by_document(model, *batch(name, fmt))
    parallel_state.destroy_model_parallel()
    return out


def run_by_document(model, docs, ids, labels, real) -> tuple:
    """A single-process Megatron model over a packed batch, one document at a time (its padding left
    out), loss summed and backward run: ``(loss, logits [T, V] (zeros on padding), {name: grad})``."""
    logits, start = torch.zeros(sum(docs), VOCAB, dtype=torch.float64), 0
    loss = torch.zeros((), dtype=torch.float64)
    for n in docs:
        keep = real[start:start + n]
        y = model(ids[start:start + n][keep][None], None, None)[0]
        loss = loss + torch.nn.functional.cross_entropy(y, labels[start:start + n][keep], reduction="sum")
        logits[torch.arange(start, start + n)[keep]] = y.detach()
        start += n
    loss.backward()
    return loss.item(), logits, {n: p.grad.clone() for n, p in model.named_parameters()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def parallel_run(tp: int, pp: int, cp: int, cases, ref: dict, replicas=("A", "B")) -> dict:
    """Inside each gloo rank of a ``tp x cp x dp x pp`` world (Megatron's rank order): for every
    ``(scheduler, fmt, spec_kwargs)`` of ``cases``, ``(errors, checked logits, ranks balanced over,
    pieces)``: the largest relative error of this rank's loss, logits and gradients against ``ref``
    (:func:`reference`), whether this rank checked logits (the last stage), the ranks its plans
    balanced attention over, and the nano-batch pieces its forwards ran, ``(piece, nano-batch, layer
    of the stage)`` in order. Microbatches: under PP two (batches A and B, Megatron's 1F1B); else
    one, batch A -- or, with DP, replica ``i``'s batch ``replicas[i]``."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    import distattn.parallel.megatron_pingpong as pingpong
    from distattn.parallel.megatron import get_gpt_layer_spec

    ps.initialize_model_parallel(tp, pp, context_parallel_size=cp)
    tp_rank, cp_rank, dp_rank = ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank(), \
        ps.get_data_parallel_rank()
    stage, dp = ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_world_size()
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    names = ["A", "B"] if pp > 1 else [replicas[dp_rank]]
    used = ["A", "B"] if pp > 1 else list(replicas[:dp])   # the batches whose gradients the job sums
    results = {}
    with megatron_on_cpu():
        for scheduler, fmt, kwargs in cases:
            torch.manual_seed(0)
            model = gpt(get_gpt_layer_spec(scheduler=scheduler, **kwargs), tp, pp, cp, first, last)
            offset = stage * (LAYERS // pp)
            set_weights(model, tp, tp_rank, offset)
            micro, seen = [], []
            for name in names:
                docs, ids, labels, real = batch(name, fmt)
                mine = split_indices(fmt, docs, cp, cp_rank)
                micro.append((ids[mine][None], labels[mine], real[mine], packed_params(fmt, docs, real), name, mine))

            def forward_step(data_iterator, model_):
                ids, labels, real, params, name, mine = next(data_iterator)
                out = model_(ids, None, None, packed_seq_params=params)

                def loss_func(logits):
                    logits = logits[0]
                    loss = torch.nn.functional.cross_entropy(logits[real], labels[real], reduction="sum")
                    seen.append((name, mine, real, logits.detach(), loss.detach()))
                    return loss, torch.tensor(1, dtype=torch.int), {"loss": loss.detach()}
                return out, loss_func

            pieces, run_piece = [], pingpong.run_piece
            layers = list(model.decoder.layers)

            def record(piece, layer, plan, nano, n):   # layer: one Megatron layer's pieces (its .layer)
                pieces.append((piece, n, next(i for i, m in enumerate(layers) if m is layer.layer)))
                return run_piece(piece, layer, plan, nano, n)

            seq = micro[0][0].shape[1] * cp   # the whole sequence: the schedule divides it by cp
            with mock.patch.object(pingpong, "run_piece", record):
                get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(micro),
                                            model=[model], num_microbatches=len(micro), seq_length=seq,
                                            micro_batch_size=1)
            errs = {"loss": 0.0, "logits": 0.0, "grads": 0.0}
            for name, mine, real, logits, loss in seen:   # the last stage: its loss and logits
                total = loss.clone()
                dist.all_reduce(total, group=ps.get_context_parallel_group())
                ref_loss, ref_logits, _ = ref[(name, fmt)]
                errs["loss"] = max(errs["loss"], abs(total.item() - ref_loss) / abs(ref_loss))
                errs["logits"] = max(errs["logits"], _rel(logits[real], ref_logits[mine][real]))
            for p, gname, dim in shards(model, tp, tp_rank, offset):
                grad = p.grad.clone()
                dist.all_reduce(grad, group=ps.get_context_parallel_group())   # CP ranks hold different tokens
                if dp > 1:
                    dist.all_reduce(grad, group=ps.get_data_parallel_group())  # replicas hold different batches
                want = sum(ref[(name, fmt)][2][gname] for name in used)
                errs["grads"] = max(errs["grads"], _rel(grad, cut(want, dim, tp, tp_rank)))
            # the ranks the plans balanced attention over (cad_pool="dp": every dp x cp rank of the stage)
            plans = model.decoder.layers[0].self_attention.core_attention.plans
            balanced = {plan.schedule.stat_ranks for plan in plans}
            results[(scheduler, fmt, tuple(sorted(kwargs.items())))] = (errs, bool(seen), balanced, tuple(pieces))
    ps.destroy_model_parallel()
    return results
