"""Issue 54: a step's global batch over the data-parallel ranks (distattn/train/data/global_batch.py), no
process group: stream packing is the packer's old ``next_batch``; balanced packing trains exactly the
stream's tokens (held pieces placed first the next step), every rank computing the same packing and
reading only its own pieces; the state carries the held pieces and old states still load; the
config keys ``data.packing`` and ``data.token_cap``."""

import numpy as np
import pytest

from distattn.planning.packing import DEFAULT_CAP_FACTOR, default_token_cap, imbalance, pack_balanced
from distattn.train.config import RunConfig, load_config, validate
from distattn.train.data.packer import Blend, Packer
from distattn.train.data.corpus import TokenFileCorpus, write_token_file
from distattn.train.data.global_batch import GlobalBatches

SEQ, DP, WEIGHT = 256, 3, 0.008


def heavy_tailed(path, docs: int = 600, seed: int = 0, ids: bool = False) -> TokenFileCorpus:
    """Log-normal lengths (median 40, a few past SEQ); ``ids``: each token is its offset in the file."""
    lens = np.maximum(1, np.random.default_rng(seed).lognormal(np.log(40), 1.3, docs).astype(int))
    offsets = np.concatenate([[0], np.cumsum(lens)])
    write_token_file(path, [np.arange(a, b) if ids else np.arange(a, b) % 256 for a, b in zip(offsets, offsets[1:])],
                     dtype=np.uint32 if ids else np.uint16)
    return TokenFileCorpus(path)


def ranks(corpus, packing: str, cap: int | None = None, dp: int = DP) -> list[GlobalBatches]:
    """One GlobalBatches per rank, each with its own packer, as the trainer's ranks hold them."""
    return [GlobalBatches(Packer(corpus, SEQ, seed=3), dp, packing, cap, WEIGHT, seed=3) for _ in range(dp)]


def step(batches: list[GlobalBatches]):
    return [b.next(r) for r, b in enumerate(batches)]


def test_stream_packing_is_the_packers_next_batch(tmp_path):
    corpus = heavy_tailed(tmp_path / "c")
    mine, old = ranks(corpus, "stream"), [Packer(corpus, SEQ, seed=3) for _ in range(DP)]
    for _ in range(6):
        got = step(mine)
        for r, (b, packer) in enumerate(zip(got, old)):
            tokens, lens = packer.next_batch(DP, r)
            assert np.array_equal(b.tokens, tokens) and b.doc_lens == lens
            assert b.trained == DP * SEQ and b.held is None and mine[r].state() == packer.state()
        work = [sum(n + WEIGHT * n * (n + 1) / 2 for n in b.doc_lens) for b in got]
        assert got[0].imbalance == pytest.approx(imbalance(work))


def test_balanced_packing_trains_the_streams_tokens_redistributed(tmp_path):
    """Token ids are file offsets: each step trains the held pieces and the stream's next tokens, no
    token twice or skipped; a rank's tokens keep their order in the stream; held pieces go first."""
    corpus = heavy_tailed(tmp_path / "c", ids=True)
    stream = Packer(corpus, SEQ, seed=3)
    flat = np.concatenate([stream.next()[0] for _ in range(40 * DP)])
    batches = ranks(corpus, "balanced", SEQ)       # the tightest cap: pieces are held often
    held, pos, held_steps = np.zeros(0, np.int64), 0, 0
    for _ in range(30):
        got = step(batches)
        assert len({(b.imbalance, b.trained, b.held) for b in got}) == 1     # every rank agrees
        room = DP * SEQ - len(held)
        offered = np.concatenate([held, flat[pos:pos + room]])
        pos += room
        trained = np.concatenate([b.tokens for b in got])
        assert len(trained) == got[0].trained and all(len(b.tokens) <= SEQ for b in got)
        assert all(0 < n <= SEQ for b in got for n in b.doc_lens) and all(len(b.tokens) for b in got)
        where = {int(t): i for i, t in enumerate(offered)}
        for b in got:
            order = [where[int(t)] for t in b.tokens]
            assert order == sorted(order)                                 # stream order inside a rank
        assert np.isin(held, trained).all()                               # a held piece waits one step
        new_held = np.setdiff1d(offered, trained)
        assert len(np.unique(trained)) == len(trained) and len(trained) + len(new_held) == len(offered)
        assert got[0].held == len(batches[0].held) < DP
        held = offered[np.isin(offered, new_held)]
        held_steps += bool(got[0].held)
    assert held_steps >= 3, held_steps


def test_balanced_packing_evens_the_workload_of_a_heavy_tail(tmp_path):
    corpus = heavy_tailed(tmp_path / "c")
    means = {}
    for packing in ("stream", "balanced"):
        batches = ranks(corpus, packing, default_token_cap(SEQ))
        means[packing] = np.mean([step(batches)[0].imbalance for _ in range(40)])
    assert 1.0 <= means["balanced"] < means["stream"] - 0.02, means
    batches = ranks(corpus, "balanced", default_token_cap(SEQ), dp=1)[:1]
    assert {step(batches)[0].imbalance for _ in range(3)} == {1.0}


def test_balancing_tokens_alone_for_a_scheduler_that_spreads_attention(tmp_path):
    """balance_weight 0 (pooled cad): the packer evens tokens; the metric still weighs attention."""
    corpus = heavy_tailed(tmp_path / "c")
    even = [GlobalBatches(Packer(corpus, SEQ, seed=3), DP, "balanced", default_token_cap(SEQ), WEIGHT, seed=3,
                          balance_weight=0.0) for _ in range(DP)]
    work = ranks(corpus, "balanced", default_token_cap(SEQ))
    spread = {"even": [], "work": []}
    for _ in range(20):
        for name, batches in (("even", even), ("work", work)):
            got = step(batches)
            spread[name].append(max(len(b.tokens) for b in got) / np.mean([len(b.tokens) for b in got]))
            weighed = [sum(n + WEIGHT * n * (n + 1) / 2 for n in b.doc_lens) for b in got]
            assert got[0].imbalance == pytest.approx(imbalance(weighed))
    assert np.mean(spread["even"]) < np.mean(spread["work"]) and np.mean(spread["even"]) < 1.02, spread


def _blend(tmp_path) -> Blend:
    return Blend([heavy_tailed(tmp_path / "a", 200, seed=1), heavy_tailed(tmp_path / "b", 300, seed=2)], [0.4, 0.6])


@pytest.mark.parametrize("kind", ["one corpus", "blend"])
def test_the_state_carries_held_pieces_and_old_states_load(tmp_path, kind):
    corpus = heavy_tailed(tmp_path / "c") if kind == "one corpus" else _blend(tmp_path)
    whole = ranks(corpus, "balanced", SEQ)
    for _ in range(50):
        step(whole)
        if whole[0].held:
            break
    state = whole[0].state()
    width = 3 if kind == "one corpus" else 7
    assert all(type(x) is int for x in state) and state[width] == len(whole[0].held) > 0
    assert len(state) == width + 1 + 4 * state[width]
    resumed = ranks(corpus, "balanced", SEQ)
    for b in resumed:
        b.load_state(state)
    for _ in range(5):
        for a, b in zip(step(whole), step(resumed)):
            assert np.array_equal(a.tokens, b.tokens) and (a.doc_lens, a.imbalance, a.held) == \
                (b.doc_lens, b.imbalance, b.held)
    # a checkpoint from before balanced packing (the packer's state alone): nothing held
    old = Packer(corpus, SEQ, seed=3)
    old.next_batch(DP, 0)
    balanced, stream = ranks(corpus, "balanced", SEQ)[0], ranks(corpus, "stream")[0]
    balanced.load_state(old.state())
    stream.load_state(old.state())
    assert balanced.held == [] and balanced.state() == old.state() + [0] and stream.state() == old.state()
    assert np.array_equal(stream.next(0).tokens, old.next_batch(DP, 0)[0])


def test_bad_states_are_refused(tmp_path):
    corpus = heavy_tailed(tmp_path / "c")
    fresh = ranks(corpus, "balanced", SEQ)[0]
    with pytest.raises(ValueError, match="1 \\+ 4 per held piece"):
        fresh.load_state([0, 0, 0, 2, 0, 0, 0, 5])
    with pytest.raises(ValueError, match="is not in this data"):
        fresh.load_state([0, 0, 0, 1, 0, 10**6, 0, 5])
    with pytest.raises(ValueError, match="more than data.token_cap"):
        GlobalBatches(Packer(corpus, 4, seed=3), DP, "balanced", 4).load_state(
            [0, 0, 0, 1, 0, int(np.argmax(corpus.lengths)), 0, 5])
    with pytest.raises(ValueError, match="resume with data.packing: balanced"):
        ranks(corpus, "stream")[0].load_state([0, 0, 0, 1, 0, 0, 0, 1])
    with pytest.raises(ValueError, match="data cursor has 2 numbers"):
        fresh.load_state([0, 0])


def test_config_keys(tmp_path):
    cfg = validate(RunConfig())
    assert (cfg.data.packing, cfg.data.token_cap, cfg.packing, cfg.rank_tokens) == (None, None, "stream", 8192)
    two = validate(RunConfig().replace(parallel={"dp": 2}))
    assert two.packing == "balanced" and two.rank_tokens == two.data.cap == 10240 == default_token_cap(8192)
    assert DEFAULT_CAP_FACTOR == 1.25
    assert load_config("tiny", ["parallel.dp=2", "data.packing=stream"]).rank_tokens == 8192
    assert load_config("tiny", ["data.packing=balanced", "data.token_cap=8192"]).rank_tokens == 8192
    with pytest.raises(ValueError, match="^data.packing must be one of stream, balanced, got 'lpt'"):
        load_config("tiny", ["data.packing=lpt"])
    with pytest.raises(ValueError, match="^data.token_cap \\(8191\\) must be at least data.seq_len \\(8192\\)"):
        load_config("tiny", ["data.token_cap=8191"])
    with pytest.raises(ValueError, match="^data.token_cap must be an int"):
        load_config("tiny", ["data.token_cap=1.5e4"])


def test_print_config_and_dry_run_show_the_keys(capsys):
    import yaml

    from distattn.cli import main

    assert main(["train", "tiny", "parallel.dp=2", "data.token_cap=9000", "--print-config"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    assert (data["packing"], data["token_cap"]) == (None, 9000)
    assert main(["train", "tiny", "parallel.dp=2", "parallel.cp=2", "data.token_cap=9000", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "a rank's sequence holds up to data.token_cap 9,000 tokens" in text
    assert "tokens per rank: 4,500 (data.token_cap 9,000 / cp 2)" in text


def test_pack_balanced_places_held_documents_first_in_empty_ranks():
    """The trainer's guarantee: fewer than dp pieces are held, and placed first they each take an empty rank."""
    packing = pack_balanced([3] * 6 + [2], 2, token_cap=10, pair_weight=0.0)
    assert packing.held == [6] and packing.tokens.sum() == 18
    again = pack_balanced([4, 4, 9, 9], 3, token_cap=10, pair_weight=0.0, first=[0, 1])
    rank_of = {i: r for r, (mb,) in enumerate(again) for i in mb}
    assert rank_of[0] != rank_of[1] and len(again.held) == 1


def test_the_benchs_corpus_is_heavy_tailed_and_scaled_to_the_sequence():
    from distattn.bench.packing import corpus_lengths, summary

    lens, line = corpus_lengths(None, 1024, 50_000)
    assert lens.sum() >= 50_000 and 200 < lens.mean() < 320 and lens.max() > 1024 > np.median(lens)
    assert "log-normal stand-in" in line
    row = {name: {"step_time_s": t, "dp_imbalance": i, "held_documents": 1}
           for name, t, i in (("stream", 2.0, 1.5), ("balanced", 1.0, 1.1))}
    assert summary([row, row])[1].endswith("ratio stream / balanced 2.000")
