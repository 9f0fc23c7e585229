"""Issue 54: ``data.packing: balanced`` in the trainer, 4 gloo ranks (dp 2 x cp 2) on a heavy-tailed
corpus with pieces held: in fp64 its losses are those of the same micro-batches -- packed here by hand
with ``distattn.pack_balanced`` -- fed through the trainer's model and step functions; a run stopped
and resumed (held pieces in its checkpoint) gives the uninterrupted losses bitwise; ``dp_imbalance`` is
in every metrics row, lower than stream packing's."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import small_run
from distattn.distributed.spawn import run_distributed
from distattn.train.data.corpus import write_token_file
from distattn.train.trainer import run

SEQ = 128
SMALL = {"model": {"dim": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64},
         "data": {"source": "tokens", "seq_len": SEQ, "token_cap": SEQ, "seed": 1},
         "parallel": {"dp": 2, "cp": 2},
         "train": {"steps": 4, "warmup_steps": 1, "ckpt_every": 2}}


def _corpus(path) -> str:
    rng = np.random.default_rng(0)
    lens = np.maximum(1, rng.lognormal(np.log(20), 1.2, 300).astype(int))
    write_token_file(path, [rng.integers(0, 256, n) for n in lens])
    return str(path)


def _by_hand_batches(cfg, steps: int) -> list[list[tuple[np.ndarray, list[int]]]]:
    """Per step, per DP rank: (tokens, document lengths), cut from the stream and packed here: the held
    pieces first, then the stream's next tokens cut at every seq_len and at the step's end."""
    from distattn import pack_balanced
    from distattn.train.data.packer import Packer
    from distattn.train.data.corpus import TokenFileCorpus

    d, dp = cfg.data, cfg.parallel.dp
    tokens, lens = Packer(TokenFileCorpus(d.path), steps * dp * d.seq_len, seed=d.seed).next()
    docs = np.split(tokens, np.cumsum(lens)[:-1])      # the stream's documents, in order
    held, out = [], []
    for _ in range(steps):
        room, pieces = dp * d.seq_len - sum(map(len, held)), list(held)
        while room > 0:
            cut = min(room, d.seq_len)
            while cut > 0:
                take = min(cut, len(docs[0]))
                pieces.append(docs[0][:take])
                docs[0], cut, room = docs[0][take:], cut - take, room - take
                if not len(docs[0]):
                    docs.pop(0)
        packing = pack_balanced([len(p) for p in pieces], dp, 1, d.cap, cfg.model.shape.pair_weight(), d.seed,
                                first=range(len(held)))
        out.append([(np.concatenate([pieces[i] for i in mb]), [len(pieces[i]) for i in mb]) for (mb,) in packing])
        held = [pieces[i] for i in packing.held]
    return out


def _by_hand_losses(cfg, batches: list) -> list[float]:
    """The trainer's step written out (DDP, AdamW, its learning rate and clipping) on ``batches``
    (:func:`_by_hand_batches`), through its own model, plan and batch functions."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from distattn import plan as make_plan
    from distattn.distributed.mesh import ParallelDims
    from distattn.schedulers import spec
    from distattn.train.model.transformer import Transformer
    from distattn.train.model import LocalBatch
    from distattn.train.plan_ahead import agreed_nano_batches
    from distattn.train.trainer import lr_at

    p, t = cfg.parallel, cfg.train
    dims = ParallelDims(p.dp, p.cp, spec(p.scheduler).ulysses_axis(p.cp, cfg.plan_context()))
    mesh = dims.build("cpu")
    cp_mesh, dp_rank = dims.cp_mesh(mesh), mesh.get_local_rank("dp")
    torch.manual_seed(t.seed)
    model = DistributedDataParallel(Transformer(cfg.model))
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, 0.95), weight_decay=t.weight_decay)
    losses = []
    for step, per_rank in enumerate(batches):
        tokens, doc_lens = per_rank[dp_rank]
        tokens = torch.from_numpy(tokens).long()
        parts = agreed_nano_batches(doc_lens, 1, cfg.model.shape.pair_weight(), True, "cpu")
        plans = [make_plan(docs, cp_mesh, scheduler=p.scheduler, backend=p.backend, context=cfg.plan_context())
                 for docs, _, _ in parts]
        local = LocalBatch.shard(tokens, doc_lens, parts, plans)
        loss_sum = model(local, loss_chunk=t.loss_chunk)
        sums = torch.stack([local.labelled().to(torch.float64), loss_sum.detach().to(torch.float64)])
        dist.all_reduce(sums)
        (loss_sum / sums[0] * cfg.world_size).backward()
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append((sums[1] / sums[0]).item())
    return losses


def _runs(balanced, stream, fp64) -> dict:
    """On each rank: the trainer's balanced and stream runs (fp32), then fp64 the balanced run (the
    micro-batches it trained recorded) and the micro-batches packed by hand."""
    import torch.distributed as dist

    from distattn.train.data.global_batch import GlobalBatches
    from distattn.train.trainer import Trainer

    out = {"balanced": Trainer(balanced).run(), "stream": Trainer(stream).run(), "trained": []}
    torch.set_default_dtype(torch.float64)
    original = GlobalBatches.next

    def recorded(self, dp_rank):
        batch = original(self, dp_rank)
        out["trained"].append((batch.tokens, batch.doc_lens))
        return batch
    GlobalBatches.next = recorded       # (this rank's process only)
    try:
        out["fp64"] = Trainer(fp64).run()
        GlobalBatches.next = original
        batches = _by_hand_batches(fp64, fp64.train.steps)
        out["by_hand"] = [per_rank[(dist.get_rank() // fp64.parallel.cp)] for per_rank in batches]
        out["by_hand_losses"] = _by_hand_losses(fp64, batches)
    finally:
        GlobalBatches.next = original
        torch.set_default_dtype(torch.float32)
    return out


def test_balanced_packing_trains_the_packed_micro_batches_and_resumes_exactly(tmp_path):
    path = _corpus(tmp_path / "corpus")
    # FSDP2, as the other bitwise resume tests: under DDP the resumed run's second step differed from the
    # straight run's by 1e-8 relative (its gradient buckets are those of a first iteration, not rebuilt)
    fsdp = {"dp_mode": "fsdp"}
    balanced = small_run(SMALL, tmp_path / "balanced", data={"path": path}, parallel=fsdp)
    assert balanced.packing == "balanced"
    stream = small_run(SMALL, tmp_path / "stream", data={"path": path, "packing": "stream"}, parallel=fsdp)
    fp64 = small_run(SMALL, tmp_path / "fp64", data={"path": path}, parallel={"backend": "reference"},
                     train={"steps": 3, "ckpt_every": 100})
    threads = max(1, (os.cpu_count() or 1) // balanced.world_size)   # as run() gives each rank
    ranks = run_distributed(_runs, 4, balanced, stream, fp64, timeout=600, threads_per_rank=threads)
    got = ranks[0]

    # fp64: each rank trained the micro-batches packed by hand, and the losses are theirs (pieces held
    # at steps 1 and 2 change which tokens a step trains; where they go, only the ranks' shares)
    for mine in ranks:
        assert len(mine["trained"]) == len(mine["by_hand"]) == 3
        for (tokens, lens), (hand_tokens, hand_lens) in zip(mine["trained"], mine["by_hand"]):
            assert np.array_equal(tokens, hand_tokens) and lens == hand_lens
    want = got["by_hand_losses"]
    assert [m["held_documents"] > 0 for m in got["fp64"]][:2] == [True, True], got["fp64"]
    for m, loss in zip(got["fp64"], want, strict=True):
        assert abs(m["loss"] - loss) <= 1e-12 * abs(loss), (m["loss"], loss)

    # metrics: dp_imbalance in every row (and held_documents under balanced), lower than stream's; a
    # step with held pieces trains fewer than dp * seq_len tokens, which tokens_per_s counts
    rows = [json.loads(line) for line in (tmp_path / "balanced" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["dp_imbalance"] >= 1 for r in rows)
    assert all("held_documents" not in m and m["dp_imbalance"] >= 1 for m in got["stream"])
    mean = {name: np.mean([m["dp_imbalance"] for m in got[name]]) for name in ("balanced", "stream")}
    assert mean["balanced"] < mean["stream"], mean
    for r in rows:
        trained = r["tokens_per_s"] * r["step_time_s"]
        assert (trained < 2 * SEQ - 0.5) if r["held_documents"] else trained == pytest.approx(2 * SEQ)

    # resume: held pieces in the step-2 checkpoint; the resumed steps are the uninterrupted ones, bitwise
    assert rows[1]["held_documents"] > 0
    shutil.rmtree(tmp_path / "balanced" / "ckpt" / "step_4")
    resumed = [m["loss"] for m in run(balanced, resume=True)]
    assert resumed == [m["loss"] for m in got["balanced"]][2:], (resumed, got["balanced"])
