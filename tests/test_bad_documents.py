"""Bad documents (issue 57, item 4): found and named before any rank starts, or skipped and counted
(``data.on_bad_document``); ``distattn data prepare`` names the file and line or row of each."""

import fcntl
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distattn.cli import main
from distattn.train.config import RunConfig, validate
from distattn.train.data.bad_rows import SCAN_DIR
from distattn.train.data.hf import HFCorpus
from distattn.train.data.packer import Packer
from distattn.train.data.prepare import prepare
from distattn.train.preflight import checks as preflight


def _cfg(tmp_path, path, **data) -> RunConfig:
    return validate(RunConfig().replace(data={"source": "hf", "path": str(path), **data},
                                        train={"out": str(tmp_path / "run")}))


def _one_line(call, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as err:
        call(*args, **kwargs)
    assert "\n" not in str(err.value), str(err.value)
    return str(err.value)


def _invalid_utf8(texts: list[bytes]) -> pa.Array:
    """A string array holding bytes that are not UTF-8: Arrow takes them unchecked, as some writers do."""
    offsets = np.cumsum([0] + [len(t) for t in texts]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(texts), [None, pa.py_buffer(offsets.tobytes()),
                                                           pa.py_buffer(b"".join(texts))])


def _corrupt(path: Path, group: int = 1) -> Path:
    """``path`` written in 3 row groups of 100 rows, then 64 bytes in the middle of ``group``'s column
    chunk overwritten: its (snappy) page no longer decodes."""
    texts = [f"document number {i} " * 20 for i in range(300)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=100, compression="snappy")
    chunk = pq.read_metadata(path).row_group(group).column(0)
    middle = (chunk.dictionary_page_offset or chunk.data_page_offset) + chunk.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    data[middle:middle + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(Exception):   # the fixture is what it claims
        pq.ParquetFile(path).read_row_group(group)
    return path


# ---- data.source: hf -----------------------------------------------------------------------------
def test_train_and_prepare_name_the_same_row_of_a_bad_parquet_row(tmp_path, capsys):
    """Rows counted from 1 in every message, as lines are: the 151st row is row 151 to both."""
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": [f"doc {i}" if i != 150 else None for i in range(300)]}), path,
                   row_group_size=100)
    assert main(["data", "prepare", str(path), "--out", str(tmp_path / "prep")]) == 2
    assert f"INPUT {path} row 151: 'text' is null" in capsys.readouterr().err
    assert _one_line(preflight.check_data, _cfg(tmp_path, path)).startswith(f"data.path: {path} row 151: 'text' is null")


def test_nulls_without_statistics_are_refused_by_preflight_naming_file_and_row(tmp_path):
    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["a", None, "b", None]}), path, write_statistics=False)
    assert pq.read_metadata(path).row_group(0).column(0).statistics is None
    message = _one_line(preflight.check_data, _cfg(tmp_path, path))
    assert message == (f"data.path: {path} row 2: 'text' is null (2 bad rows in 1 file); fix or drop them, or set "
                       f"data.on_bad_document: skip to train without them")


def test_undecodable_text_and_damaged_pages_are_refused(tmp_path):
    bad = tmp_path / "utf8.parquet"
    pq.write_table(pa.table({"text": _invalid_utf8([b"ok", b"\xff no", b"\xed\xa0\x80 surrogate"])}), bad)
    assert f"data.path: {bad} row 2: 'text' is not valid UTF-8 at byte 0 (invalid start byte) (2 bad rows" in \
        _one_line(preflight.check_data, _cfg(tmp_path, bad))
    damaged = _corrupt(tmp_path / "damaged.parquet")
    message = _one_line(preflight.check_data, _cfg(tmp_path, damaged))
    assert message.startswith(f"data.path: {damaged} row 101: row group 1 (rows 101-200) cannot be decoded (")
    assert "(100 bad rows in 1 file); fix or drop them, or set data.on_bad_document: skip" in message


def test_skip_passes_over_bad_documents_and_counts_them(tmp_path, caplog):
    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"text": _invalid_utf8([b"one", b"\xff", b"three", b""])}).append_column(
        "n", pa.array([1, 2, 3, 4])), path, write_statistics=False)
    nulls = tmp_path / "nulls.parquet"   # a null row too, in a second table
    pq.write_table(pa.table({"text": ["four", None]}), nulls, write_statistics=False)
    folder = tmp_path / "both"
    folder.mkdir()
    path.rename(folder / "a.parquet")
    nulls.rename(folder / "b.parquet")
    with caplog.at_level(logging.WARNING):
        preflight.check_data(_cfg(tmp_path, folder, on_bad_document="skip"))
    assert "data.on_bad_document: skip: 2 of 6 documents of" in caplog.text
    assert f"(2 bad rows in 2 files; first: {folder / 'a.parquet'} row 2: 'text' is not valid UTF-8" in caplog.text
    corpus = HFCorpus(folder, None, "skip")
    packer = Packer(corpus, 8, seed=0)
    seen = b"".join(bytes(packer.next()[0].astype(np.uint8).tolist()) for _ in range(2))
    assert sorted(seen[:len(b"onethreefour")]) == sorted(b"onethreefour")
    assert sorted(corpus.skipped) == [1, 5]
    with pytest.raises(ValueError, match=r"b.parquet row 2: 'text' is null; fix or drop it, or set "
                                         r"data.on_bad_document: skip"):
        HFCorpus(folder).tokens(5)


def test_skip_passes_over_a_damaged_row_group_whole(tmp_path):
    damaged = _corrupt(tmp_path / "damaged.parquet")
    preflight.check_data(_cfg(tmp_path, damaged, on_bad_document="skip"))
    corpus = HFCorpus(damaged, None, "skip")
    assert [int(corpus.lengths[d]) for d in (99, 100, 199, 200)] == [len(f"document number {99} " * 20), 0, 0,
                                                                     len(f"document number {200} " * 20)]
    assert len(corpus.skipped) == 2 and "row group 1 (rows 101-200)" in corpus.skipped[100]


def test_the_scan_is_cached_per_file_and_a_damaged_cache_is_scanned_again(tmp_path, monkeypatch):
    from distattn.train.data import bad_rows

    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["a", None]}), path, write_statistics=False)
    cfg = _cfg(tmp_path, path, on_bad_document="skip")
    preflight.check_data(cfg)
    entries = list((tmp_path / "run" / SCAN_DIR).glob("*.json"))
    assert len(entries) == 1 and json.loads(entries[0].read_text())["bad"] == 1
    scanned = []
    real = bad_rows._scan_file
    monkeypatch.setattr(bad_rows, "_scan_file", lambda *a: scanned.append(a[1]) or real(*a))
    preflight.check_data(cfg)
    assert scanned == []   # from the cache
    for damage in ("{not json", json.dumps({"key": 1}), "[]", json.dumps({"key": json.loads(entries[0].read_text())[
            "key"], "rows": "2", "bad": 1, "first": [[1, "x"]]})):
        entries[0].write_text(damage)
        preflight.check_data(cfg)
    assert scanned == [path] * 4
    pq.write_table(pa.table({"text": ["a", None, None]}), path, write_statistics=False)   # a new file: rescanned
    assert "(2 bad rows in 1 file)" in _one_line(preflight.check_data, _cfg(tmp_path, path))


def test_ranks_sharing_an_out_wait_for_one_scan(tmp_path):
    import threading

    from distattn.train.data import bad_rows

    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["a", None]}), path, write_statistics=False)
    cache = tmp_path / "run" / SCAN_DIR
    entry, _ = bad_rows._cache_path(cache, path, "text")
    cache.mkdir(parents=True)
    found = []
    with open(entry.with_suffix(".lock"), "a") as held:   # another rank, scanning this file
        fcntl.flock(held, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: found.append(bad_rows.scan_hf("parquet", [path], "text", cache)))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not found
    waiter.join(10)
    assert found[0][0].bad == 1 and entry.is_file()


def test_a_save_to_disk_folder_is_scanned_too(tmp_path):
    folder = tmp_path / "saved"
    folder.mkdir()
    table = pa.table({"text": _invalid_utf8([b"a", b"b", b"\xc3"])})
    with pa.ipc.new_stream(folder / "data-00000-of-00001.arrow", table.schema) as stream:
        stream.write_table(pa.table({"text": ["x", None]}))   # two chunks: rows are counted across them
        stream.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    message = _one_line(preflight.check_data, _cfg(tmp_path, folder))
    assert f"data.path: {folder / 'data-00000-of-00001.arrow'} row 2: 'text' is null (2 bad rows in 1 file)" in message
    corpus = HFCorpus(folder, None, "skip")
    assert [len(corpus.tokens(d)) for d in range(5)] == [1, 0, 1, 1, 0] and sorted(corpus.skipped) == [1, 4]


def test_the_scan_says_how_far_it_is_where_no_terminal_shows_a_bar(tmp_path, monkeypatch):
    from distattn.train.data import bad_rows, progress

    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False, raising=False)
    path = tmp_path / "text.parquet"
    pq.write_table(pa.table({"text": ["abc"] * 10}), path, row_group_size=5)
    lines = []
    scans = bad_rows.scan_hf("parquet", [path], "text", None, lines.append)
    assert scans[0].rows == 10 and scans[0].bad == 0
    assert lines and all(line.startswith("data scan: ") and "MB/s" in line for line in lines), lines


def test_on_bad_document_is_a_checked_config_key(tmp_path):
    assert "data.on_bad_document must be one of fail, skip, got 'ignore'" in \
        _one_line(_cfg, tmp_path, tmp_path, on_bad_document="ignore")


# ---- distattn data prepare -------------------------------------------------------------------------
def _tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "ok": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (input, what its refusal says after the file name)."""
    files = {"deep.jsonl": '{"text": "ok"}\n{"text": ' + "[" * 100000 + "]" * 100000 + "}\n",
             "surrogate.jsonl": '{"text": "ok"}\n{"text": "\\ud800"}\n',
             "huge.jsonl": '{"text": "ok"}\n{"text": "a", "n": ' + "9" * 5000 + "}\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "latin1.txt").write_bytes(b"ok\ncaf\xe9\n")
    pq.write_table(pa.table({"text": _invalid_utf8([b"ok", b"\xff"])}), tmp_path / "bytes.parquet")
    pq.write_table(pa.table({"text": ["ok", None]}), tmp_path / "null.parquet", write_statistics=False)
    _corrupt(tmp_path / "damaged.parquet")
    return {"deep.jsonl": "line 2: JSON nested too deeply to read",
            "surrogate.jsonl": "line 2: 'text' holds a lone surrogate '\\ud800' at character 0",
            "huge.jsonl": "line 2: not a JSON object (Exceeds the limit (4300 digits)",
            "latin1.jsonl": "line 2: not a JSON object ('utf-8' codec can't decode byte 0xe9",
            "latin1.txt": "line 2: not UTF-8 text at byte 6",
            "bytes.parquet": "row 2: 'text' is not valid UTF-8 at byte 0",
            "null.parquet": "row 2: 'text' is null",
            "damaged.parquet": "row 101: row group 1 (rows 101-200) cannot be decoded ("}


def test_prepare_names_the_file_and_line_or_row_of_every_bad_input(tmp_path, capsys):
    tokenizer = _tokenizer(tmp_path / "tokenizer.json")
    for name, said in _bad_inputs(tmp_path).items():
        for tok in ("bytes", str(tokenizer)) if name == "surrogate.jsonl" else ("bytes",):
            out = tmp_path / f"out_{name}"
            assert main(["data", "prepare", str(tmp_path / name), "--out", str(out), "--tokenizer", tok,
                         "--overwrite"]) == 2, name
            err = capsys.readouterr().err.strip()
            assert "\n" not in err and f"INPUT {tmp_path / name} {said}" in err, err
            assert err.endswith("or pass --on-bad-document skip to leave it out"), err


def test_prepare_skip_leaves_bad_documents_out_and_counts_them(tmp_path, capsys):
    _bad_inputs(tmp_path)
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n' * 5)
    assert main(["data", "prepare", str(tmp_path), "--out", str(tmp_path / "out"), "--on-bad-document", "skip"]) == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    # 8 inputs: one bad document each but damaged.parquet's 100; one good each but latin1.txt's none
    # (a .txt is one document) and damaged.parquet's 200
    assert (index["documents"], index["empty_documents"], index["skipped_documents"]) == (6 + 200, 5, 7 + 100)
    assert len(index["skipped"]) == 5 and index["skipped"][0].startswith(f"INPUT {tmp_path / 'bytes.parquet'} row 2")
    assert "(5 empty, 107 skipped left out)" in capsys.readouterr().out


def test_prepare_counts_empty_documents_when_none_has_tokens(tmp_path):
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n' * 5)
    pq.write_table(pa.table({"text": [""] * 5}), tmp_path / "empty.parquet")
    for name in ("empty.jsonl", "empty.parquet"):
        assert "no document has any tokens (5 empty, 0 skipped)" in _one_line(
            prepare, [tmp_path / name], tmp_path / f"out_{name}")


def test_the_prepare_lock_stays_and_still_keeps_a_second_prepare_out(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "hello"}\n')
    out = tmp_path / "out"
    prepare([tmp_path / "a.jsonl"], out)
    lock = out / ".prepare.lock"
    assert lock.is_file()   # not unlinked: another process may be waiting on this very file
    with open(lock, "r+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        message = _one_line(prepare, [tmp_path / "a.jsonl"], out, overwrite=True)
        assert message == f"--out {out} is being prepared by another process; wait for it or use a new --out"
    assert prepare([tmp_path / "a.jsonl"], out)["documents"] == 1   # the lock file is no obstacle itself


def test_skipped_counts_survive_a_resume_and_a_damaged_count_is_refused(tmp_path):
    lines = ['{"text": "document %d"}' % i if i % 3 else '{"text": "\\ud800"}' for i in range(30)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    whole = prepare([tmp_path / "in.jsonl"], tmp_path / "whole", shard_tokens=40, on_bad_document="skip")

    class Stop(Exception):
        pass

    def stop(n):
        if n == 2:
            raise Stop

    with pytest.raises(Stop):
        prepare([tmp_path / "in.jsonl"], tmp_path / "part", shard_tokens=40, on_bad_document="skip", on_shard=stop)
    resumed = prepare([tmp_path / "in.jsonl"], tmp_path / "part", shard_tokens=40, on_bad_document="skip")
    assert whole["skipped_documents"] == resumed["skipped_documents"] == 10 and resumed["skipped"] == whole["skipped"]
    assert resumed["documents"] == whole["documents"] == 20
    index = tmp_path / "part" / "index.json"
    index.write_text(index.read_text().replace('"skipped": [', '"skipped": [5, '))
    assert "index.json gives skipped=[5, " in _one_line(prepare, [tmp_path / "in.jsonl"], tmp_path / "part",
                                                        shard_tokens=40)
