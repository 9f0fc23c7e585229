"""The data's identity: offsets must be integers, token ids are checked against the vocabulary as
a batch is read, prepared shards carry their SHA-256 (``distattn data verify``), and a resume onto
different data is refused before any rank starts."""

import numpy as np
import pytest

from distattn.train.data.corpus import write_token_file
from distattn.train.data.sources import make_corpus


@pytest.mark.parametrize("offsets", [np.array([0, 2.5, 5.5, 10]), np.array([0, 3, 6, 10], dtype=complex),
                                     np.array([False, True])])
def test_non_integer_offsets_refused(tmp_path, offsets):
    prefix = tmp_path / "corpus"
    write_token_file(prefix, [np.arange(3), np.arange(3), np.arange(4)])
    np.save(tmp_path / "corpus.idx.npy", offsets)
    with pytest.raises(ValueError, match=r"corpus\.idx\.npy holds .* not integers") as err:
        make_corpus("tokens", str(prefix))
    assert "\n" not in str(err.value)


def test_token_outside_vocabulary_named_when_read(tmp_path):
    from distattn.train.data.global_batch import GlobalBatches
    from distattn.train.data.packer import Packer
    prefix = tmp_path / "corpus"
    write_token_file(prefix, [np.arange(8), np.array([1, 2, 300, 4])])
    batches = GlobalBatches(Packer(make_corpus("tokens", str(prefix)), 12, 0, vocab_size=256), 1)
    with pytest.raises(ValueError, match=r"corpus\.bin at token 10 holds token id 300, outside "
                                         r"model.vocab_size 256") as err:
        batches.next(0)
    assert "\n" not in str(err.value)
    assert len(GlobalBatches(Packer(make_corpus("tokens", str(prefix)), 12, 0, vocab_size=301), 1).next(0).tokens) == 12


def _prepared(tmp_path):
    import json
    from distattn.train.data.prepare import prepare
    (tmp_path / "in").mkdir()
    for i in range(3):
        (tmp_path / "in" / f"{i}.txt").write_text(f"document number {i} " * 20)
    out = tmp_path / "prep"
    prepare([tmp_path / "in"], out, shard_tokens=400, say=lambda _: None)
    return out, json.loads((out / "index.json").read_text())


def test_prepare_records_hashes_and_verify_finds_a_flipped_byte(tmp_path, capsys):
    import json
    from distattn.cli import main
    out, index = _prepared(tmp_path)
    assert len(index["shards"]) >= 2 and all(len(s["bin_sha256"]) == 64 for s in index["shards"])
    assert main(["data", "verify", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith("verified, clean")
    data = bytearray((out / "shard_00001.bin").read_bytes())
    data[6] ^= 1                        # still inside the vocabulary: only the hash can tell
    (out / "shard_00001.bin").write_bytes(bytes(data))
    assert main(["data", "verify", str(out)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "shard_00001.bin: SHA-256" in lines[0]
    # an index from before the hashes: checked on everything else, and says so
    for s in index["shards"]:
        del s["bin_sha256"], s["idx_sha256"]
    (out / "index.json").write_text(json.dumps(index))
    data[6] = 0xff                      # now past the vocabulary of 256
    data[7] = 0x01
    (out / "shard_00001.bin").write_bytes(bytes(data))
    assert main(["data", "verify", str(out)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "cannot be fully verified" in lines[0]
    assert "shard_00001.bin at token 3: id 511 is outside the vocabulary of 256" in lines[1]


def test_verify_token_file_prefix(tmp_path, capsys):
    from distattn.cli import main
    prefix = tmp_path / "corpus"
    write_token_file(prefix, [np.arange(8), np.array([1, 2, 300, 4])])
    assert main(["data", "verify", str(prefix), "--vocab-size", "301"]) == 0
    assert main(["data", "verify", str(prefix), "--vocab-size", "256"]) == 1
    assert "corpus.bin at token 10: id 300" in capsys.readouterr().out
    np.save(tmp_path / "corpus.idx.npy", np.array([0, 2.5, 12]))
    assert main(["data", "verify", str(prefix)]) == 1
    assert "not integers" in capsys.readouterr().out


def _config(tmp_path, data: dict, vocab: int = 256):
    import yaml
    from distattn.train.config import load_config
    sections = {"model": {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64, "vocab_size": vocab},
                "data": {"source": "tokens", "seq_len": 64, **data}, "parallel": {"dp": 1, "cp": 2},
                "train": {"steps": 2, "warmup_steps": 1, "ckpt_every": 1, "out": str(tmp_path / "run")}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(sections))
    return load_config(path)


def test_data_verify_key_reads_the_data_through_in_preflight(tmp_path):
    from distattn.train.preflight import checks as preflight
    out, _ = _prepared(tmp_path)
    preflight.check_data(_config(tmp_path, {"path": str(out), "verify": True}))
    data = bytearray((out / "shard_00000.bin").read_bytes())
    data[0] ^= 1
    (out / "shard_00000.bin").write_bytes(bytes(data))
    preflight.check_data(_config(tmp_path, {"path": str(out)}))     # default: trusts index.json's counts
    with pytest.raises(ValueError, match=r"data.verify: .*shard_00000.bin: SHA-256") as err:
        preflight.check_data(_config(tmp_path, {"path": str(out), "verify": True}))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="data.verify"):
        _config(tmp_path, {"path": str(out), "verify": "yes"})


def test_resume_onto_other_data_refused_and_old_checkpoints_warned(tmp_path):
    from types import SimpleNamespace
    from distattn.train.checkpoint.resume import resume_config, run_info
    from distattn.train.data.identity import data_identity
    from distattn.train.data.prepare import prepare
    out, _ = _prepared(tmp_path)
    cfg = _config(tmp_path, {"path": str(out)})
    saved = SimpleNamespace(run=run_info(cfg), step=1)
    resume_config(cfg, saved)                                       # the same data: resumes
    (tmp_path / "in" / "0.txt").write_text("other words entirely " * 20)
    prepare([tmp_path / "in"], out, shard_tokens=400, overwrite=True, say=lambda _: None)
    data_identity.cache_clear()                                     # a new launch opens the data afresh
    with pytest.raises(ValueError, match=r"refusing to resume step 1: data.path .*prep holds other data .*"
                                         r"index.json SHA-256") as err:
        resume_config(cfg, saved)
    assert "\n" not in str(err.value)
    said = []
    old = SimpleNamespace(run={**saved.run, "data": {k: v for k, v in saved.run["data"].items() if k != "identity"}},
                          step=1)
    resume_config(cfg, old, say=said.append)
    assert len(said) == 1 and "records no data identity" in said[0]
    # a token file rewritten in place: the file and both digests named
    prefix = tmp_path / "corpus"
    write_token_file(prefix, [np.arange(8), np.arange(5)])
    cfg = _config(tmp_path, {"path": str(prefix)})
    saved = SimpleNamespace(run=run_info(cfg), step=2)
    write_token_file(prefix, [np.arange(8), np.arange(1, 6)])
    data_identity.cache_clear()
    with pytest.raises(ValueError, match=r"file .*corpus\.bin has 26 bytes, sampled SHA-256 \w+ \(checkpoint: "
                                         r"26 bytes, \w+\)"):
        resume_config(cfg, saved)
