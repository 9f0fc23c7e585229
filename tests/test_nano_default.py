"""``parallel.nano_batches`` unset: the trainer's count is the simulator's (``distattn/train/nano_default.py``):
two where they hide enough transfer to pay, one where there is nothing to cut or hide."""

import pytest

from conftest import small_run
from distattn.sim.simulate import simulate
from distattn.train.auto_plan import job_of, network_of
from distattn.train.nano_default import MARGIN, choose_nano_batches

LLAMA_8B = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "ffn_dim": 14336, "vocab_size": 128256}
SEQ = 131072


def _cfg(tmp_path, **parallel):
    return small_run({"model": LLAMA_8B, "data": {"seq_len": SEQ},
                      "parallel": {"dp": 1, "cp": 16, "scheduler": "ulysses", **parallel},
                      "train": {"activation_checkpointing": "full"}}, tmp_path)


def test_two_where_they_pay_one_where_nothing_can_be_cut(tmp_path):
    """8B at 128K on 16 ranks: sequences of several documents take two (the priced times are the
    simulator's own rows, summed over the steps); sequences of one document each cannot be cut, the
    two counts price alike, and one is kept."""
    cfg = _cfg(tmp_path)
    many = [[[8192] * 16], [[4096] * 8 + [98304]]]
    choice = choose_nano_batches(cfg, many)
    assert choice.count == 2 and choice.step_s[2] < (1 - MARGIN) * choice.step_s[1], choice
    from dataclasses import replace

    job = replace(job_of(cfg), cp=16, packing=cfg.packing, dp_mode=cfg.parallel.dp_mode, dp_shard=cfg.parallel.dp_shard,
                  planning="ignored", activation_checkpointing="full", mlp_chunk=0)
    for count in (1, 2):
        rows = [simulate(replace(job, nano_batches=count), network_of(cfg), ["ulysses"], replica_docs=s)[0] for s in many]
        assert choice.step_s[count] == pytest.approx(sum(r["step_time_s"] for r in rows), rel=1e-12)

    whole = choose_nano_batches(cfg, [[[SEQ]], [[SEQ]]])
    assert whole.count == 1 and whole.step_s[1] == pytest.approx(whole.step_s[2], rel=1e-9), whole


def test_set_counts_and_one_cp_rank_price_nothing(tmp_path):
    assert choose_nano_batches(_cfg(tmp_path, nano_batches=2), [[[SEQ]]]).line() == \
        "parallel.nano_batches: 2 (set in the config)"
    one = choose_nano_batches(small_run({"model": LLAMA_8B, "data": {"seq_len": SEQ}, "parallel": {"dp": 2, "cp": 1},
                                         "train": {}}, tmp_path), [[[SEQ], [SEQ]]])
    assert (one.count, one.step_s) == (1, {}) and "one CP rank has no attention transfers to hide" in one.reason
