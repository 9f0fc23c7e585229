"""The data users already have: Megatron indexed datasets, Hugging Face datasets on disk (save_to_disk
folders, Parquet), and blends of sources by weight -- read document for document, packed, resumed
exactly, and refused in one line before any rank starts."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import small_yaml
from distattn.train.preflight import checks as preflight
from distattn.train.config import RunConfig, validate
from distattn.train.data.packer import Blend, Packer
from distattn.train.data.sources import make_corpus
from distattn.train.data.corpus import write_token_file
from distattn.train.data.hf import HFCorpus
from distattn.train.data.megatron import MegatronCorpus

SMALL = {"model": {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64},
         "data": {"seq_len": 256}, "parallel": {"dp": 1, "cp": 2},
         "train": {"steps": 2, "warmup_steps": 1, "ckpt_every": 1}}
# Megatron documents as lists of sequences (several with --split-sentences), an empty one included
MEGATRON_DOCS = [[[1, 2, 3]], [[4, 5], [6, 7, 8, 9]], [], [[10]], [[11, 12], [], [13]], [[14] * 7]]


def write_megatron(prefix: Path, docs: list[list[list[int]]], dtype=np.uint16) -> None:
    """``PREFIX.bin`` + ``PREFIX.idx`` as Megatron-core's IndexedDatasetBuilder writes them (checked
    byte for byte against it below), so the tests need no Megatron beyond that one."""
    seqs = [np.asarray(s, dtype=dtype) for doc in docs for s in doc]
    lengths = np.array([len(s) for s in seqs], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)]) * np.dtype(dtype).itemsize
    bounds = np.concatenate([[0], np.cumsum([len(doc) for doc in docs])]).astype(np.int64)
    code = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.uint16: 8}[dtype]
    (prefix.parent / (prefix.name + ".bin")).write_bytes(b"".join(s.tobytes() for s in seqs))
    (prefix.parent / (prefix.name + ".idx")).write_bytes(
        b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(seqs), len(bounds)) + lengths.tobytes()
        + pointers.astype(np.int64).tobytes() + bounds.tobytes())


def _random_docs(rng, count: int, longest: int, low: int, high: int) -> list[list[list[int]]]:
    return [[rng.integers(low, high, rng.integers(1, longest + 1)).tolist()] for _ in range(count)]


def _docs(corpus) -> list[list[int]]:
    return [corpus.read(d, 0, int(corpus.lengths[d])).tolist() for d in range(len(corpus.lengths))]


# ---- Megatron -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_corpus_reads_what_megatron_core_wrote(tmp_path, dtype):
    indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    import torch

    prefix = str(tmp_path / "mega")
    builder = indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in MEGATRON_DOCS:
        if len(doc) == 1:   # item by item, as preprocess_data.py without --split-sentences
            builder.add_item(torch.tensor(doc[0]))
            builder.end_document()
        else:
            builder.add_document(np.array([t for s in doc for t in s], dtype=np.int64), [len(s) for s in doc])
    builder.finalize(prefix + ".idx")
    theirs = indexed.IndexedDataset(prefix)
    bounds = theirs.document_indices
    want = [np.concatenate([theirs[i] for i in range(bounds[d], bounds[d + 1])] or [np.zeros(0, dtype)]).tolist()
            for d in range(len(bounds) - 1)]
    assert want == [[t for s in doc for t in s] for doc in MEGATRON_DOCS]
    ours = MegatronCorpus(prefix)
    assert ours.lengths.tolist() == [len(w) for w in want] and _docs(ours) == want
    assert ours.read(4, 1, 3).tolist() == [12, 13]    # a range across two of the document's sequences
    write_megatron(tmp_path / "mine", MEGATRON_DOCS, dtype)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"mine{ext}").read_bytes() == Path(prefix + ext).read_bytes()


def test_megatron_packs_every_token_once_and_passes_over_empty_documents(tmp_path):
    write_megatron(tmp_path / "m", MEGATRON_DOCS)
    corpus = make_corpus("megatron", str(tmp_path / "m"))
    total = int(corpus.lengths.sum())
    tokens, lens = Packer(corpus, total, seed=0).next()
    assert sorted(tokens.tolist()) == sorted(t for doc in MEGATRON_DOCS for s in doc for t in s)
    assert 0 not in lens and sorted(lens) == sorted(n for n in corpus.lengths.tolist() if n)


# ---- Hugging Face -------------------------------------------------------------------------------
TEXTS = ["first document", "", "zweites Dokument ünd mehr", "x" * 300, "the end"]


def _word_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for t in TEXTS for w in t.split()})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def test_hf_folder_and_parquet_read_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [[5, 6, 7], [8], [9, 10, 11, 12], [1] * 40]
    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "texts.parquet", row_group_size=2)
    (tmp_path / "many").mkdir()   # a folder of Parquet files: read in path order
    pq.write_table(pa.table({"input_ids": ids[:2]}), tmp_path / "many" / "a.parquet")
    pq.write_table(pa.table({"input_ids": ids[2:]}), tmp_path / "many" / "b.parquet", row_group_size=1)
    as_bytes = [list(t.encode()) for t in TEXTS]
    assert _docs(HFCorpus(tmp_path / "texts.parquet")) == as_bytes
    assert _docs(HFCorpus(tmp_path / "many")) == ids
    tokenizer = _word_tokenizer(tmp_path / "tokenizer.json")
    from distattn.train.data.readers import load_tokenizer

    words = [x.tolist() for x in load_tokenizer(str(tokenizer)).encode(TEXTS)]
    assert _docs(HFCorpus(tmp_path / "texts.parquet", str(tokenizer))) == words
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "saved"))
    datasets.Dataset.from_dict({"input_ids": ids, "text": ["a"] * 4}).save_to_disk(str(tmp_path / "saved_ids"))
    assert [r["text"] for r in datasets.load_from_disk(str(tmp_path / "saved"))] == TEXTS
    assert _docs(HFCorpus(tmp_path / "saved")) == as_bytes
    assert _docs(HFCorpus(tmp_path / "saved", str(tokenizer))) == words
    saved_ids = HFCorpus(tmp_path / "saved_ids")   # input_ids as they are; with a tokenizer, the text
    assert _docs(saved_ids) == ids and isinstance(saved_ids.lengths, np.ndarray)
    assert _docs(HFCorpus(tmp_path / "saved_ids", "bytes")) == [[97]] * 4


def test_hf_text_is_tokenized_only_when_the_packer_reaches_it(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"document {i} " * (i % 7 + 1) for i in range(2000)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "t.parquet", row_group_size=500)
    corpus = HFCorpus(tmp_path / "t.parquet")
    seen = []
    encode = corpus.tokenizer.encode
    corpus.tokenizer.encode = lambda batch: (seen.extend(batch), encode(batch))[1]
    a, b = Packer(corpus, 512, seed=4), Packer(HFCorpus(tmp_path / "t.parquet"), 512, seed=4)
    got = [a.next() for _ in range(3)]
    assert len(seen) < 60   # a few documents, not 2000
    for tokens, lens in got:   # deterministic: the same stream from a fresh corpus
        again = b.next()
        assert np.array_equal(tokens, again[0]) and lens == again[1]


# ---- blends -------------------------------------------------------------------------------------
def _two_sources(tmp_path) -> tuple:
    """A Megatron corpus of long documents (ids < 100) and a token file of short ones (ids 100..199):
    with equal odds per document the long one would take most of the tokens."""
    rng = np.random.default_rng(0)
    write_megatron(tmp_path / "long", _random_docs(rng, 400, 3000, 0, 100))
    write_token_file(tmp_path / "short", [rng.integers(100, 200, rng.integers(1, 301)) for _ in range(3000)])
    return make_corpus("megatron", str(tmp_path / "long")), make_corpus("tokens", str(tmp_path / "short"))


def test_a_blend_gives_each_source_its_share_of_tokens(tmp_path):
    long, short = _two_sources(tmp_path)
    packer = Packer(Blend([long, short], [0.3, 0.7]), 4096, seed=5)
    tokens = np.concatenate([packer.next()[0] for _ in range(245)])   # 1,003,520 tokens
    share = float((tokens < 100).mean())
    assert len(tokens) >= 1_000_000 and abs(share - 0.3) < 0.01, share
    # the schedule keeps the shares close all along, not only on average
    assert abs(float((tokens[:200_000] < 100).mean()) - 0.3) < 0.02
    # the same blend from a config, as the trainer makes it
    cfg = validate(RunConfig().replace(data={"source": "blend", "seed": 5, "blend": [
        {"path": str(tmp_path / "long"), "weight": 0.3, "source": "megatron"},
        {"path": str(tmp_path / "short"), "weight": 0.7}]}))
    preflight.check_data(cfg)
    again = Packer(make_corpus(cfg.data), 4096, seed=cfg.data.seed)
    assert np.array_equal(np.concatenate([again.next()[0] for _ in range(245)]), tokens)


def _batches(packer: Packer, count: int, dp: int = 2, rank: int = 0) -> list:
    return [packer.next_batch(dp, rank) for _ in range(count)]


@pytest.mark.parametrize("kind", ["blend", "megatron"])
def test_a_packer_resumes_exactly_from_its_state(tmp_path, kind):
    long, short = _two_sources(tmp_path)

    def fresh():
        return Packer(Blend([long, short], [0.3, 0.7]) if kind == "blend" else long, 1000, seed=2)

    whole = fresh()
    _batches(whole, 10)
    want = _batches(whole, 10)
    first = fresh()
    _batches(first, 10)
    state = first.state()
    assert len(state) == (7 if kind == "blend" else 3) and all(type(x) is int for x in state)
    resumed = fresh()
    resumed.load_state(state)
    for (tokens, lens), (w_tokens, w_lens) in zip(_batches(resumed, 10), want):
        assert np.array_equal(tokens, w_tokens) and lens == w_lens
    # the stream does not depend on the world size: dp 2's rank 1 reads dp 1's odd sequences
    single, rank1 = fresh(), fresh()
    odd = [single.next() for _ in range(8)][1::2]
    for (tokens, lens), (w_tokens, w_lens) in zip(_batches(rank1, 4, 2, 1), odd):
        assert np.array_equal(tokens, w_tokens) and lens == w_lens
    with pytest.raises(ValueError, match="the checkpoint's data cursor has 4 numbers"):
        fresh().load_state([0, 0, 0, 0])


# ---- refusals -----------------------------------------------------------------------------------
def _cfg(tmp_path, vocab: int = 256, **data) -> RunConfig:
    # train.out: where preflight keeps its scan of an hf source (not the default runs/tiny)
    return validate(RunConfig().replace(model={"vocab_size": vocab}, data=data, train={"out": str(tmp_path / "run")}))


def _one_line(call, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as err:
        call(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_refusals_name_the_file_or_key(tmp_path):
    write_megatron(tmp_path / "m", MEGATRON_DOCS)
    good = _cfg(tmp_path, source="megatron", path=str(tmp_path / "m"))
    preflight.check_data(good)
    idx = tmp_path / "m.idx"
    data = idx.read_bytes()
    idx.write_bytes(b"NOTMEGA!!" + data[9:])
    assert f"data.path: {idx} is not a Megatron index" in _one_line(preflight.check_data, good)
    idx.write_bytes(data[:9] + struct.pack("<Q", 2) + data[17:])
    assert "version-2 Megatron index" in _one_line(preflight.check_data, good)
    idx.write_bytes(data[:17] + bytes([7]) + data[18:])
    assert "holds floating-point tokens" in _one_line(preflight.check_data, good)
    idx.write_bytes(data[:-8])
    assert "it is truncated or damaged" in _one_line(preflight.check_data, good)
    idx.write_bytes(data)
    (tmp_path / "m.bin").write_bytes((tmp_path / "m.bin").read_bytes()[:-2])
    assert "m.bin holds 38 bytes but m.idx describes 40" in _one_line(preflight.check_data, good)
    (tmp_path / "m.bin").unlink()
    assert f"data.path: {tmp_path / 'm.bin'} does not exist" in _one_line(preflight.check_data, good)
    message = _one_line(MegatronCorpus, tmp_path / "m.idx")
    assert f"data.path is the prefix without the extension: {tmp_path / 'm'}" in message
    write_megatron(tmp_path / "wide", [[[1, 300]], [[-2]]], np.int32)
    wide = _cfg(tmp_path, source="megatron", path=str(tmp_path / "wide"))
    assert "wide.bin holds token id 300, but model.vocab_size is 256" in _one_line(preflight.check_data, wide)
    assert "wide.bin holds token id -2, below 0" in _one_line(preflight.check_data, wide.replace(
        model={"vocab_size": 400}))
    # weights, entries and keys of a blend
    blend = [{"path": str(tmp_path / "wide"), "weight": 0.3, "source": "megatron"}, {"path": "x", "weight": -1}]
    assert _one_line(_cfg, tmp_path, 256, source="blend", blend=blend) == \
        "data.blend[1].weight must be > 0 (the source's share of the tokens), got -1.0"
    assert "data.blend[1].weight must be a finite number" in _one_line(
        _cfg, tmp_path, 256, source="blend", blend=[blend[0], {"path": "x", "weight": float("inf")}])
    assert "data.blend is read only with data.source: blend" in _one_line(_cfg, tmp_path, 256, blend=blend)
    write_megatron(tmp_path / "m", MEGATRON_DOCS)
    first = {"path": str(tmp_path / "m"), "weight": 0.3, "source": "megatron"}
    missing = _cfg(tmp_path, 400, source="blend", blend=[first, {"path": str(tmp_path / "none"), "weight": 1}])
    assert _one_line(preflight.check_data, missing).startswith(f"data.blend[1].path: {tmp_path / 'none.bin'} does "
                                                              f"not exist")


def test_hf_refusals(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert "does not exist (data.source: hf reads" in _one_line(HFCorpus, tmp_path / "nothing")
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "body.parquet")
    assert "has no 'text' column or 'input_ids' column (columns: body)" in _one_line(HFCorpus, tmp_path / "body.parquet")
    pq.write_table(pa.table({"text": ["a", None, "b"]}), tmp_path / "nulls.parquet")
    nulls = _cfg(tmp_path, source="hf", path=str(tmp_path / "nulls.parquet"))
    assert "nulls.parquet row 2: 'text' is null (1 bad row in 1 file); fix or drop it" in \
        _one_line(preflight.check_data, nulls)
    pq.write_table(pa.table({"input_ids": [[1, 2], [70000]]}), tmp_path / "ids.parquet")
    ids = _cfg(tmp_path, source="hf", path=str(tmp_path / "ids.parquet"))
    assert "ids.parquet holds token id 70000, but model.vocab_size is 256" in _one_line(preflight.check_data, ids)
    pq.write_table(pa.table({"input_ids": [[1, None]]}), tmp_path / "holes.parquet")
    holes = _cfg(tmp_path, source="hf", path=str(tmp_path / "holes.parquet"))
    assert "holes.parquet has null token ids inside 'input_ids' lists" in _one_line(preflight.check_data, holes)
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "text.parquet")
    missing = _cfg(tmp_path, source="hf", path=str(tmp_path / "text.parquet"), tokenizer=str(tmp_path / "no.json"))
    assert f"data.tokenizer {tmp_path / 'no.json'} is not 'bytes', an existing path" in \
        _one_line(preflight.check_data, missing)
    small = _cfg(tmp_path, 100, source="hf", path=str(tmp_path / "text.parquet"))
    assert "model.vocab_size 100 is smaller than the vocabulary of data.tokenizer bytes (256)" in \
        _one_line(preflight.check_data, small)
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert f"holds a DatasetDict (splits: train, test); name one split's folder, e.g. {tmp_path / 'dd' / 'train'}" \
        in _one_line(HFCorpus, tmp_path / "dd")


# ---- the trainer ----------------------------------------------------------------------------------
def test_train_on_a_megatron_corpus_and_resume(tmp_path, capfd):
    from distattn.cli import main

    rng = np.random.default_rng(1)
    write_megatron(tmp_path / "corpus", _random_docs(rng, 60, 400, 0, 256))
    config = small_yaml(SMALL, tmp_path, data={"source": "megatron", "path": str(tmp_path / "corpus")})
    assert main(["train", str(config)]) == 0
    assert main(["train", str(config), "--resume", "--steps", "4"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    assert yaml.safe_load(config.read_text())["data"]["source"] == "megatron"
