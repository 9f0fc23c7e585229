"""`distattn data prepare`: text/JSONL/Parquet -> token shards, streamed, resumable, identical for any
number of workers; the trainer reads the shards and resumes exactly across shard boundaries."""

import json
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import yaml

from distattn.cli import main
from distattn.train.preflight import checks as preflight
from distattn.train.config import load_config
from distattn.train.data.packer import Packer
from distattn.train.data.sharded import ShardedCorpus, token_dtype
from distattn.train.data.sources import make_corpus
from distattn.train.data.prepare import STATE_NAME, prepare
from distattn.train.data.readers import load_tokenizer

SHARD_TOKENS = 40_000
SEQ_LEN = 2048
MODEL = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128}


def _stdlib_texts(limit_bytes: int) -> list[str]:
    """Python stdlib sources that are UTF-8, in a fixed order, about ``limit_bytes`` in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("json/*.py")):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text:
            texts.append(text)
            total += len(text)
        if total >= limit_bytes:
            break
    return texts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Inputs of all three formats, a BPE trained on them, and one uninterrupted prepare (2 workers)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("corpus")
    texts = _stdlib_texts(600_000)
    n = len(texts)
    txt, jsonl, rows = texts[: n // 3], texts[n // 3: 2 * n // 3], texts[2 * n // 3:]
    (root / "txt").mkdir()
    for i, text in enumerate(txt):
        (root / "txt" / f"doc_{i:04d}.txt").write_text(text)
    with open(root / "docs.jsonl", "w") as f:
        for i, text in enumerate(jsonl):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
            if i == 3:
                f.write("\n" + json.dumps({"text": ""}) + "\n")  # a blank line and an empty document
    pq.write_table(pa.table({"text": rows}), root / "rows.parquet", row_group_size=16)
    inputs = [root / "txt", root / "docs.jsonl", root / "rows.parquet"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|doc|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    (root / "tok").mkdir()
    tok.save(str(root / "tok" / "tokenizer.json"))
    out = root / "prepared"
    index = prepare(inputs, out, tokenizer=str(root / "tok"), shard_tokens=SHARD_TOKENS, workers=2, say=lambda m: None)
    return {"root": root, "inputs": inputs, "texts": txt + jsonl + rows, "tok": tok, "out": out, "index": index}


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if not p.name.startswith(".")}


def test_prepare_round_trips_in_shards_and_is_the_same_for_any_workers(corpus, tmp_path):
    index, out, tok, texts = corpus["index"], corpus["out"], corpus["tok"], corpus["texts"]
    assert len(index["shards"]) >= 3 and sorted(_files(out)) == sorted(
        ["index.json"] + [f"{s['name']}{ext}" for s in index["shards"] for ext in (".bin", ".idx.npy")])
    assert index["vocab_size"] == tok.get_vocab_size(with_added_tokens=True) == 600 and index["dtype"] == "uint16"
    assert index["documents"] == len(texts) and index["empty_documents"] == 1
    # a shard stays within --shard-tokens, except a longer document alone (there is one here)
    assert all(s["tokens"] <= SHARD_TOKENS or s["documents"] == 1 for s in index["shards"])
    assert any(s["tokens"] > SHARD_TOKENS for s in index["shards"])
    data = ShardedCorpus(out)
    assert len(data.lengths) == len(texts) and int(data.lengths.sum()) == index["tokens"]
    want = tok.encode_batch(texts)
    for doc in range(len(texts)):  # token-exact, in input order (txt files, JSONL lines, Parquet rows)
        assert data.read(doc, 0, int(data.lengths[doc])).tolist() == want[doc].ids, doc
    for doc in (0, len(texts) // 2, len(texts) - 1):
        assert tok.decode(data.read(doc, 0, int(data.lengths[doc])).tolist()) == texts[doc]
    assert data.read(5, 3, 9).tolist() == want[5].ids[3:9]
    one = prepare(corpus["inputs"], tmp_path / "one", tokenizer=str(corpus["root"] / "tok"),
                  shard_tokens=SHARD_TOKENS, workers=1, say=lambda m: None)
    assert one == index and _files(tmp_path / "one") == _files(out)
    assert token_dtype(256) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_interrupted_prepare_resumes_byte_identical(corpus, tmp_path, monkeypatch):
    """Stopped before the first shard is complete, then after every shard (once with the files of a
    half-written and an unrecorded shard left behind), each rerun continues; the result equals the
    uninterrupted run byte for byte."""
    from distattn.train.data import prepare as module

    out, said = tmp_path / "resumed", []
    kwargs = dict(tokenizer=str(corpus["root"] / "tok"), shard_tokens=SHARD_TOKENS, say=said.append)

    class Stop(Exception):
        pass

    def killed(self):
        raise Stop

    with monkeypatch.context() as patch:
        patch.setattr(module._ShardWriter, "commit", killed)
        with pytest.raises(Stop):
            prepare(corpus["inputs"], out, workers=1, **kwargs)
    assert (out / "shard_00000.bin.tmp").stat().st_size > 0 and not (out / "shard_00000.bin").exists()

    def stop_after_one(start):
        def hook(n):
            if n > start:
                raise Stop
        return hook

    done, runs = 0, 0
    while not (out / "index.json").exists():
        try:
            prepare(corpus["inputs"], out, workers=2 if runs == 1 else 1, on_shard=stop_after_one(done), **kwargs)
        except Stop:
            state = json.loads((out / STATE_NAME).read_text())
            assert len(state["shards"]) == done + 1
            done += 1
            if done == 2:  # as if killed while writing shard 2 after renaming its .bin
                (out / "shard_00002.bin").write_bytes(b"junk")
                (out / "shard_00002.idx.npy.tmp").write_bytes(b"junk")
        runs += 1
    assert done == len(corpus["index"]["shards"]) and runs == done + 1  # the last run only writes index.json
    assert any("resuming" in m and "0 shards done" in m for m in said)
    assert any("resuming" in m and "2 shards done" in m for m in said)
    assert _files(out) == _files(corpus["out"])
    said.clear()
    assert prepare(corpus["inputs"], out, workers=1, **kwargs) == corpus["index"]
    assert "already prepared" in said[-1]
    with pytest.raises(ValueError, match=r"other arguments \(--shard-tokens 40000, now 1000\).*new --out.*--overwrite"):
        prepare(corpus["inputs"], out, tokenizer=kwargs["tokenizer"], shard_tokens=1000)
    with pytest.raises(ValueError, match=r"other arguments \(--tokenizer .*tok, now bytes\)"):
        prepare(corpus["inputs"], out, shard_tokens=SHARD_TOKENS)
    with pytest.raises(ValueError, match="other arguments .*input #1"):
        prepare(corpus["inputs"][1:], out, **kwargs)


def _cfg(tmp_path, data_dir: Path, out: str, steps: int, vocab: int, seed: int = 0):
    sections = {"model": {**MODEL, "vocab_size": vocab},
                "data": {"source": "tokens", "path": str(data_dir), "seq_len": SEQ_LEN, "seed": seed},
                "parallel": {"dp": 1, "cp": 2},
                "train": {"steps": steps, "warmup_steps": 1, "ckpt_every": 2, "out": str(tmp_path / out)}}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(sections))
    return load_config(path)


def _crosses_shards(data: ShardedCorpus, seed: int) -> bool:
    """Whether the packer's first 4 sequences (data.seed ``seed``) read >= 3 shards, the two after
    the resume point (step 2) >= 2 of them, and step 2 ends inside a document."""
    shards, read = [], data.read
    data.read = lambda doc, start, end: (shards.append(data.locate(doc)[0]), read(doc, start, end))[1]
    packer = Packer(data, SEQ_LEN, seed=seed)
    packer.next(), packer.next()
    cut, offset = len(shards), packer.offset
    packer.next(), packer.next()
    data.read = read
    return offset > 0 and len(set(shards[cut:])) >= 2 and len(set(shards)) >= 3


def test_train_on_prepared_shards_resumes_exactly_across_shards(corpus, tmp_path):
    from distattn.train.trainer import run

    out, vocab = corpus["out"], corpus["index"]["vocab_size"]
    data = make_corpus("tokens", str(out))
    assert isinstance(data, ShardedCorpus)
    seed = next(seed for seed in range(100) if _crosses_shards(data, seed))
    full = run(_cfg(tmp_path, out, "full", 4, vocab, seed))
    # a run stopped after step 2: the full run's folder as it was then (two runs instead of three: each
    # costs ~20 s of process start-up on a 2-core machine)
    shutil.copytree(tmp_path / "full", tmp_path / "half")
    shutil.rmtree(tmp_path / "half" / "ckpt" / "step_4")
    metrics = (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "half" / "metrics.jsonl").write_text("".join(f"{row}\n" for row in metrics
                                                             if json.loads(row)["step"] <= 2))
    resumed = run(_cfg(tmp_path, out, "half", 4, vocab, seed), resume=True)
    assert [m["step"] for m in resumed] == [3, 4]
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in full[2:]], rel=1e-6)
    assert full[-1]["loss"] < full[0]["loss"]


def test_preflight_checks_vocab_and_shards(corpus, tmp_path):
    vocab = corpus["index"]["vocab_size"]
    preflight.check_data(_cfg(tmp_path, corpus["out"], "ok", 1, vocab))
    with pytest.raises(ValueError, match=rf"model.vocab_size 256 is smaller than the tokenizer's vocabulary {vocab} "
                                         rf"from .*index.json; set model.vocab_size >= {vocab}"):
        preflight.check_data(_cfg(tmp_path, corpus["out"], "small", 1, 256))
    broken = tmp_path / "broken"
    shutil.copytree(corpus["out"], broken)
    with open(broken / "shard_00001.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=r"shard_00001.bin holds 100 bytes but index.json says .* tokens"):
        preflight.check_data(_cfg(tmp_path, broken, "broken", 1, vocab))
    (broken / "shard_00001.bin").unlink()
    with pytest.raises(ValueError, match=r"shard_00001.bin is missing \(index.json lists it\)"):
        ShardedCorpus(broken)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="is a directory without index.json; write one with `distattn data prepare"):
        preflight.check_data(_cfg(tmp_path, tmp_path / "plain", "plain", 1, vocab))


def test_cli_prepare_and_bad_inputs(tmp_path, capsys):
    texts = _stdlib_texts(200_000)
    (tmp_path / "in").mkdir()
    for i, text in enumerate(texts):
        (tmp_path / "in" / f"{i:03d}.txt").write_text(text)
    done = subprocess.run([sys.executable, "-m", "distattn.cli", "data", "prepare", str(tmp_path / "in"), "--out",
                           str(tmp_path / "out"), "--shard-tokens", "64K"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    data = ShardedCorpus(tmp_path / "out")  # --tokenizer bytes: exactly the UTF-8 bytes, as data.source stdlib
    assert data.index["vocab_size"] == 256 and len(data.index["shards"]) >= 2
    assert [bytes(data.read(i, 0, int(n)).astype(np.uint8)).decode() for i, n in enumerate(data.lengths)] == texts

    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    cases = {"missing": ([str(tmp_path / "nope.jsonl")], "INPUT .*nope.jsonl does not exist"),
             "no_text": ([str(tmp_path / "bad.jsonl")], r"bad.jsonl line 2: no string 'text' field \(found: body\)"),
             "extension": ([str(tmp_path / "x.csv")], r"unknown extension '.csv'"),
             "tokenizer": ([str(tmp_path / "bad.jsonl"), "--tokenizer", "no-such-org/no-such-model"],
                           "no-such-org/no-such-model is not 'bytes'.*huggingface-cli download")}
    (tmp_path / "x.csv").write_text("text\nhello\n")
    for name, (args, message) in cases.items():
        code = main(["data", "prepare", *args, "--out", str(tmp_path / f"out_{name}")])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, (name, err)
        assert err.startswith("distattn data prepare: error: ") and re.search(message, err), (name, err)
    with pytest.raises(ValueError, match="not a tokenizer.json"):
        load_tokenizer(str(tmp_path / "x.csv"))
