"""Mistakes in a config, its data or `distattn data prepare --out` that only the ranks used to find
(exit 1, often a rank's traceback): each is now one line on stderr and exit code 2 from the parent,
before any rank starts.

One probe of each kind runs the command line in a process of its own, as a user would, two at a
time; each costs ~3 s of CPU importing torch, which a 2-core machine cannot spend on every probe, so
the other probes of a kind run the same ``main`` in this process.
"""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from distattn.train.config import RunConfig, load_config, validate
from distattn.train.data.corpus import write_token_file

SMALL = {"model": {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64},
         "data": {"seq_len": 64}, "parallel": {"dp": 1, "cp": 2}, "train": {"steps": 1}}
# a probe takes ~3 s alone; train.out left absent is the proof that no rank started (the lock, then the
# ranks' metrics, go there), this only a bound for a busy 2-core machine
SECONDS = 30


def _config(folder: Path, **changes) -> list[str]:
    """argv of `distattn train` on SMALL with ``changes`` (per section), train.out in ``folder/run``."""
    sections = {name: {**values, **changes.get(name, {})} for name, values in SMALL.items()}
    sections["train"]["out"] = str(folder / "run")
    (folder / "cfg.yaml").write_text(yaml.safe_dump(sections))
    return ["train", str(folder / "cfg.yaml")]


def _text_config(folder: Path, text: str) -> list[str]:
    (folder / "cfg.yaml").write_text(text)
    return ["train", str(folder / "cfg.yaml")]


def _old_prepared(folder: Path, ids, **shard) -> Path:
    """A prepared corpus of one shard holding ``ids`` in two documents, its index.json as an older
    `distattn data prepare` wrote it (no max_token) plus ``shard``'s keys."""
    data = folder / "data"
    data.mkdir()
    np.asarray(ids, dtype="<u2").tofile(data / "shard_00000.bin")
    np.save(data / "shard_00000.idx.npy", np.array([0, 4, len(ids)], dtype=np.int64))
    entry = {"name": "shard_00000", "tokens": len(ids), "documents": 2, **shard}
    (data / "index.json").write_text(json.dumps({"format": "distattn-tokens", "version": 1, "tokenizer": "bytes",
                                                 "vocab_size": 256, "dtype": "uint16", "tokens": len(ids),
                                                 "documents": 2, "shards": [entry]}))
    return data


def _damage_header(idx: Path) -> None:
    """An .idx.npy whose header dict is never closed (numpy's parser raises tokenize.TokenError)."""
    idx.write_bytes(idx.read_bytes().replace(b"}", b" ", 1))


def _tokens(folder: Path, **data) -> list[str]:
    return _config(folder, model={"vocab_size": 256}, data={"source": "tokens", **data})


def _raw_ids(folder: Path) -> list[str]:
    write_token_file(folder / "raw", [np.array([1, 2, 3, 300]), np.array([5, 6, 7])])
    return _tokens(folder, path=str(folder / "raw"))


def _raw_header(folder: Path) -> list[str]:
    write_token_file(folder / "raw", [np.array([1, 2, 3, 4]), np.array([5, 6, 7])])
    _damage_header(folder / "raw.idx.npy")
    return _tokens(folder, path=str(folder / "raw"))


def _prepared_header(folder: Path) -> list[str]:
    data = _old_prepared(folder, range(10))
    _damage_header(data / "shard_00000.idx.npy")
    return _tokens(folder, path=str(data))


def _prepare(folder: Path, out: Path, index=None, state=None) -> list[str]:
    (folder / "in.txt").write_text("some text")
    for name, content in (("index.json", index), ("prepare_state.json", state)):
        if content is not None:
            out.mkdir(exist_ok=True)
            (out / name).write_text(content)
    return ["data", "prepare", str(folder / "in.txt"), "--out", str(out)]


def _file_out(folder: Path) -> list[str]:
    (folder / "afile").write_text("keep me")
    return _prepare(folder, folder / "afile")


DUPLICATE = """model: {{dim: 32, n_layers: 1, n_heads: 2, n_kv_heads: 1, ffn_dim: 64}}
train:
  steps: 1
  lr: 1.0e-3
  lr: 3.0e-3
  out: {out}
"""

# name: (argv maker given a fresh folder, what the one line says); run as commands
PROBES = {
    "backend": (lambda f: _config(f, parallel={"backend": "foo"}),
                "parallel.backend 'foo' is unknown; choose auto"),
    "stdlib vocabulary": (lambda f: _config(f, model={"vocab_size": 1}),
                          "model.vocab_size 1 is smaller than the 256 byte values data.source: stdlib feeds; "
                          "set model.vocab_size >= 256"),
    "huge timeout": (lambda f: _config(f, parallel={"timeout_s": 1e300}),   # written as 1.0e+300
                     "parallel.timeout_s must be at most 604800"),
    "seq_len 1": (lambda f: _config(f, data={"seq_len": 1}), "data.seq_len must be at least 3, got 1"),
    "top level []": (lambda f: _text_config(f, "[]\n"), "the top level is list [], but a config is a mapping"),
    "duplicate key": (lambda f: _text_config(f, DUPLICATE.format(out=f / "run")),
                      "line 5 column 3: not valid YAML: key 'lr' appears twice (first on line 4); keep one"),
    "ids in an older prepared shard": (lambda f: _tokens(f, path=str(_old_prepared(f, [1, 2, 3, 300, 5, 6]))),
                                       "data/shard_00000.bin holds token id 300, but model.vocab_size is 256"),
    "damaged shard .idx.npy": (_prepared_header, "shard_00000.idx.npy is not a readable .npy array"),
    "prepare --out FILE": (_file_out, "afile exists and is not a folder; pass a new --out"),
    "prepare --out /proc/...": (lambda f: _prepare(f, Path("/proc/distattn-no-such-folder")),
                                "--out /proc/distattn-no-such-folder cannot be made a folder"),
    "prepare index.json []": (lambda f: _prepare(f, f / "out", index="[]"),
                              "index.json holds a JSON list, not an object; pass a new --out, or --overwrite"),
    "prepare_state.json not JSON": (lambda f: _prepare(f, f / "out", state="{oops"),
                                    "prepare_state.json cannot be read (Expecting property name"),
    "prepare_state.json malformed": (lambda f: _prepare(f, f / "out", state='{"settings": {"inputs": []}, '
                                                                           '"shards": 5}'),
                                     "prepare_state.json has no list of shards; pass a new --out, or --overwrite"),
}


# more of the same kinds, run by ``main`` in this process
IN_PROCESS = {
    "infinite timeout": (lambda f: _config(f, parallel={"timeout_s": float("inf")}),   # written as .inf
                         "parallel.timeout_s must be a finite number"),
    "nan lr": (lambda f: _config(f, train={"lr": float("nan")}), "train.lr must be a finite number"),
    "huge lr": (lambda f: _config(f, train={"lr": 3.0e3}), "train.lr must be at most 1"),
    "lr_decay_steps 0": (lambda f: _config(f, train={"lr_decay_steps": 0}), "train.lr_decay_steps must be > 0"),
    # the last token of one document and the first of the next: nothing to predict
    "seq_len 2": (lambda f: _config(f, data={"seq_len": 2}), "data.seq_len must be at least 3, got 2"),
    "top level false": (lambda f: _text_config(f, "false\n"), "the top level is bool False"),
    "top level 0": (lambda f: _text_config(f, "0\n"), "the top level is int 0"),
    "top level ''": (lambda f: _text_config(f, '""\n'), "the top level is str ''"),
    "empty file": (lambda f: _text_config(f, "# nothing\n"), "is empty; a config is a mapping of sections"),
    "ids in PATH.bin": (_raw_ids, "raw.bin holds token id 300, but model.vocab_size is 256"),
    # recorded by prepare: the parent trusts index.json and reads no shard
    "ids recorded in index.json": (lambda f: _tokens(f, path=str(_old_prepared(f, range(6), max_token=70000))),
                                   "shard_00000.bin holds token id 70000, but model.vocab_size is 256 (ids must be "
                                   "below it); set model.vocab_size >= 70001"),
    "damaged PATH.idx.npy": (_raw_header, "raw.idx.npy is not a readable .npy array of document offsets "
                                          "(EOF in multi-line statement)"),
}


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """name -> (argv, folder, exit code, stderr, seconds) of every probe, run two at a time."""
    cases = {}
    for i, (name, (make, _)) in enumerate(PROBES.items()):
        folder = tmp_path_factory.mktemp(f"probe{i}")
        cases[name] = (make(folder), folder)

    def run(item):
        name, (argv, folder) = item
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "distattn.cli", *argv], capture_output=True, text=True,
                              timeout=120)
        return name, (argv, folder, done.returncode, done.stderr, time.monotonic() - start)

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(run, cases.items()))


@pytest.mark.parametrize("name", list(PROBES))
def test_refused_in_one_line_before_any_rank(probes, name):
    argv, folder, code, err, seconds = probes[name]
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err[-2000:])
    assert lines[0].startswith(f"distattn {argv[0]}") and PROBES[name][1] in lines[0], lines[0]
    assert "rank" not in lines[0] and seconds < SECONDS, (lines[0], seconds)
    assert not (folder / "run").exists()   # train.out: the lock and the metrics come after these checks


@pytest.mark.parametrize("name", list(IN_PROCESS))
def test_more_of_the_same_kinds(tmp_path, capfd, name):
    from distattn.cli import main

    make, message = IN_PROCESS[name]
    argv = make(tmp_path)
    capfd.readouterr()
    assert main(argv) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "run").exists()


def test_nothing_damaged(probes):
    assert (probes["prepare --out FILE"][1] / "afile").read_text() == "keep me"
    assert not Path("/proc/distattn-no-such-folder").exists()


def test_the_fixes_the_messages_name_work(tmp_path):
    """What the lines above suggest is accepted: ``{}``, vocab 256 for stdlib, --overwrite over a broken
    prepare; and a key a ``<<:`` merge brought in may be set again (that is what a merge is for)."""
    (tmp_path / "empty.yaml").write_text("{}\n")
    assert load_config(tmp_path / "empty.yaml") == validate(RunConfig())
    (tmp_path / "merge.yaml").write_text("train: {<<: &base {steps: 5, lr: 1.0e-3}, lr: 2.0e-3}\n")
    assert load_config(tmp_path / "merge.yaml").train.lr == 2.0e-3
    assert validate(RunConfig().replace(model={"vocab_size": 256}, data={"seq_len": 3},
                                        train={"lr_decay_steps": 10})).train.lr_decay_steps == 10
    argv = _prepare(tmp_path, tmp_path / "out", state="{oops")
    done = subprocess.run([sys.executable, "-m", "distattn.cli", *argv, "--overwrite"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    top = max(b"some text")   # --tokenizer bytes: the ids are the bytes
    assert index["max_token"] == index["shards"][0]["max_token"] == top


def test_overwrite_removes_links_not_what_they_point_to(tmp_path):
    from distattn.train.preflight import checks as preflight

    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    out.mkdir()
    (elsewhere / "ckpt").mkdir(parents=True)
    (elsewhere / "ckpt" / "precious").write_text("x")
    (elsewhere / "tb").mkdir()
    (elsewhere / "metrics.jsonl").write_text("{}\n")
    for name in preflight.RUN_FILES:
        os.symlink(elsewhere / name, out / name)
    cfg = validate(RunConfig().replace(train={"out": str(out)}))
    said = []
    assert preflight.prepare_out(cfg, False, True, say=said.append) is None
    assert not any(os.path.lexists(out / name) for name in preflight.RUN_FILES), said
    assert (elsewhere / "ckpt" / "precious").read_text() == "x" and (elsewhere / "tb").is_dir()
    assert (elsewhere / "metrics.jsonl").read_text() == "{}\n"
    # a link to nothing goes too (a run would otherwise write through it)
    os.symlink(tmp_path / "nowhere", out / "ckpt")
    preflight.prepare_out(cfg, False, True, say=said.append)
    assert not os.path.lexists(out / "ckpt") and not (tmp_path / "nowhere").exists()
