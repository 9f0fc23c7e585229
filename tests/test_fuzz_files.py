"""Fuzz the files a run reads (issue 57, item 8): every field of a checkpoint's ``manifest.json``, a
prepared folder's ``index.json``, an interrupted prepare's ``prepare_state.json``, the ``.idx.npy``
offsets of a shard and of a token file, and Megatron's ``.idx`` is mutated by type, range, nesting,
links and truncation (:mod:`fuzz_mutations`). Each run of ``distattn ckpt verify``, ``data verify``,
``data prepare`` (resuming) and ``train --resume`` must end with exit 0, 1 or 2, at most one line on
stderr, no traceback, no hang, and no file it did not write changed or removed (a resume may move a
checkpoint aside to ``step_N.rejected``: its files must be there, byte for byte).

The commands run in this process (``distattn.cli.main``), a few hundredths of a second each; a
resume with ``--steps 1`` stops before any rank starts whichever checkpoint it takes; two runs at the
end are real processes (one resumes and trains). The default run takes a covering slice (every field,
every kind of mutation); ``--slow`` takes all of them. Each test prints what it tried
(``fuzz manifest.json: N mutations, ... 0 tracebacks, 0 hangs, 0 foreign files changed``)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from fuzz_mutations import (Mutation, foreign_changes, json_mutations, megatron_mutations, npy_mutations,
                            file_mutations, snapshot)
from test_data_sources import write_megatron
from distattn.cli import main
from distattn.train.checkpoint import manifest
from distattn.train.data.corpus import write_token_file
from distattn.train.data.identity import data_identity

DISTATTN = str(Path(sys.executable).with_name("distattn"))
MODEL = {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64, "vocab_size": 256}
SHARD_TOKENS = "70000"           # two shards of the corpus below
TIMEOUT = 20                     # seconds one in-process run may take (they take under 2) before it is a hang
PREPARE = ["data", "prepare", "data/c.jsonl", "--out", "data/part", "--shard-tokens", SHARD_TOKENS]
RESUME = ["--resume", "--steps", "1"]   # every checkpoint here is step 1 or 2: finished, no rank starts
# the mutations a finding in a file of another part of the project covers: {(file kind, name): finding}
# (none open: F1 and F2 of /work/runs/i57/fuzz_prepare_findings.md are fixed)
KNOWN: dict[tuple[str, str], str] = {}


# ---- one folder for the module: a corpus prepared, a token file, a Megatron pair, a trained run -----------
def _corpus(path: Path) -> None:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    with open(path, "w") as f:
        for _ in range(200):
            f.write(json.dumps({"text": " ".join(rng.choice(words, rng.integers(20, 200)))}) + "\n")


def _config(tree: Path, name: str, source: str, path: str, out: str) -> None:
    cfg = {"model": MODEL, "data": {"source": source, "path": path, "seq_len": 256},
           "parallel": {"dp": 1, "cp": 1}, "train": {"steps": 2, "ckpt_every": 1, "warmup_steps": 1, "out": out}}
    (tree / name).write_text(yaml.safe_dump(cfg))


class _Stop(Exception):
    pass


def _stop(shards: int) -> None:
    raise _Stop


def _build(tree: Path) -> None:
    """Everything a fuzzed command reads, with paths relative to ``tree`` (each mutation's copy of it
    runs there, so a checkpoint's recorded data path still names its data)."""
    from distattn.train.checkpoint.resume import run_info
    from distattn.train.config import load_config
    from distattn.train.data.prepare import prepare
    from distattn.train.data.sharded import ShardedCorpus

    data = tree / "data"
    data.mkdir(parents=True)
    _corpus(data / "c.jsonl")
    with contextlib.chdir(tree):
        prepare(["data/c.jsonl"], "data/prep", shard_tokens=int(SHARD_TOKENS), say=lambda line: None)
        with pytest.raises(_Stop):   # an interrupted prepare: prepare_state.json and one shard
            prepare(["data/c.jsonl"], "data/part", shard_tokens=int(SHARD_TOKENS), say=lambda line: None,
                    on_shard=_stop)
        corpus = ShardedCorpus("data/prep")
        docs = [corpus.read(d, 0, int(corpus.lengths[d])) for d in range(len(corpus.lengths))]
    write_token_file(data / "tok", docs)
    write_megatron(data / "meg", [[d.tolist()] for d in docs[:-2]] + [[docs[-2].tolist(), docs[-1].tolist()]])
    _config(tree, "prep.yaml", "tokens", "data/prep", "run")
    _config(tree, "tok.yaml", "tokens", "data/tok", "run_tok")
    _config(tree, "meg.yaml", "megatron", "data/meg", "run_meg")
    done = subprocess.run([DISTATTN, "train", "prep.yaml"], cwd=tree, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # the same checkpoints, recorded as trained on the token file and on the Megatron pair: a resume
    # with --steps 1 reads no tensor, only the manifest's record of the run
    for name, out in (("tok.yaml", "run_tok"), ("meg.yaml", "run_meg")):
        shutil.copytree(tree / "run", tree / out)
        with contextlib.chdir(tree):
            run = run_info(load_config(name))
            data_identity.cache_clear()
        for step in (1, 2):
            ckpt = tree / out / "ckpt" / f"step_{step}"
            manifest.write(ckpt, step, manifest.read(ckpt).files, run)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "outside").mkdir()
    (root / "outside" / "victim.txt").write_text("keep me\n")
    _build(root / "tree")
    # each mutation runs in a copy at the path it was built at: the absolute input paths an interrupted
    # prepare records still name its inputs
    (root / "tree").rename(root / "pristine")
    return root


# ---- one command, in this process -------------------------------------------------------------------------
class _Hang(BaseException):   # not an Exception: no `except Exception` in the library swallows it
    pass


def _alarm(signum, frame):
    raise _Hang


def run_cli(argv: list[str]) -> tuple[int | str, str, str]:
    """(exit code, or "hang" / "traceback"; stdout; stderr) of ``distattn ARGV`` run here."""
    out, err = io.StringIO(), io.StringIO()
    term, alarm = signal.getsignal(signal.SIGTERM), signal.signal(signal.SIGALRM, _alarm)
    data_identity.cache_clear()   # keyed by path: each mutation's copy has the same relative paths
    signal.setitimer(signal.ITIMER_REAL, TIMEOUT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code: int | str = main(argv)
    except SystemExit as exc:   # argparse
        code = exc.code if isinstance(exc.code, int) else 2
    except _Hang:
        code = "hang"
    except BaseException:   # noqa: BLE001 - what the fuzz is looking for
        code = "traceback"
        err.write(traceback.format_exc())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, alarm)
        signal.signal(signal.SIGTERM, term)
    return code, out.getvalue(), err.getvalue()


def verdict(code, out: str, err: str) -> str | None:
    """What is wrong with one run's ending, or None: exit 0, 1 or 2, no traceback, and at most one
    non-empty line on stderr (the CLI's messages go to stdout; an error is one line on stderr)."""
    lines = [line for line in err.splitlines() if line.strip()]
    if code == "hang":
        return f"no answer in {TIMEOUT} s"
    if code == "traceback" or "Traceback" in out + err:
        return "traceback: " + " | ".join(err.strip().splitlines()[-3:])
    if code not in (0, 1, 2):
        return f"exit {code}: {err.strip()[-300:]}"
    if len(lines) > 1:
        return f"{len(lines)} lines on stderr: {lines[:3]}"
    return None


# ---- a file kind's mutations, each on a fresh copy of the tree ----------------------------------------------
_PREPARE_OWN = re.compile(r"data/part/(shard_\d+\.(bin|idx\.npy)(\.tmp)?|index\.json|prepare_state\.json|"
                          r"\.prepare\.lock|[^/]*\.json\.tmp)")


def owned(rel: str) -> bool:
    """What the fuzzed commands write: a train's lock file, a prepare's files in its --out."""
    if not rel.startswith("tree/"):
        return False
    return re.fullmatch(r"run[^/]*/\.lock", rel[5:]) is not None or _PREPARE_OWN.fullmatch(rel[5:]) is not None


def _fresh(base: Path) -> Path:
    """A copy of the pristine tree where it was built (``base/tree``)."""
    shutil.rmtree(base / "tree", ignore_errors=True)
    shutil.copytree(base / "pristine", base / "tree", symlinks=True)
    return base / "tree"


def fuzz(base: Path, label: str, target: str, mutations: list[Mutation], commands: list[list[str]]) -> dict:
    """Each mutation applied to ``target`` in a fresh copy of the tree, then each command run there;
    the tally: mutations, runs, exit codes, and every problem (``KNOWN`` ones apart)."""
    tally = {"mutations": len(mutations), "runs": 0, "codes": Counter(), "problems": [], "known": []}
    for mutation in mutations:
        tree = _fresh(base)
        mutation.apply(tree / target, base / "outside")
        for argv in commands:
            before = _both(base)
            with contextlib.chdir(tree):
                code, out, err = run_cli(argv)
            problem = verdict(code, out, err)
            changed = foreign_changes(before, _both(base), owned)
            if changed:
                problem = (problem + "; " if problem else "") + f"changed or removed: {changed[:3]}"
            tally["runs"] += 1
            tally["codes"][code] += 1
            if problem:
                where = "known" if (label, mutation.name) in KNOWN else "problems"
                tally[where].append(f"{mutation.name} / {' '.join(argv)}: {problem}")
    shutil.rmtree(base / "tree")
    return tally


def _both(base: Path) -> dict:
    """The tree's files and the outside folder beside it (a link's target must not change either)."""
    return {**{f"tree/{k}": v for k, v in snapshot(base / "tree").items()},
            **{f"outside/{k}": v for k, v in snapshot(base / "outside").items()}}


def report(capsys, label: str, tally: dict) -> None:
    bad = tally["problems"]
    tracebacks = sum("traceback" in p for p in bad)
    hangs = sum("no answer in" in p for p in bad)
    foreign = sum("changed or removed" in p for p in bad)
    codes = ", ".join(f"{k}: {v}" for k, v in sorted(tally["codes"].items(), key=str))
    with capsys.disabled():
        print(f"\nfuzz {label}: {tally['mutations']} mutations, {tally['runs']} runs (exit {codes}), "
              f"{tracebacks} tracebacks, {hangs} hangs, {foreign} foreign files changed"
              + (f"; {len(tally['known'])} known (xfail)" if tally["known"] else ""))
    assert not bad, "\n".join(bad[:20])
    if tally["known"]:
        pytest.xfail("; ".join(sorted({KNOWN[(label, p.split(' / ')[0])] for p in tally["known"]})))


def _everything(request) -> bool:
    return request.node.get_closest_marker("slow") is not None


def _read(base: Path, target: str) -> bytes:
    return (base / "pristine" / target).read_bytes()


# ---- the tests: the covering slice, then all under --slow ---------------------------------------------------
CASES = {
    "manifest.json": ("run/ckpt/step_2/manifest.json",
                      [["ckpt", "verify", "run/ckpt"], ["ckpt", "verify", "run/ckpt/step_2"],
                       ["train", "prep.yaml", *RESUME]]),
    # the identity of a token file (each file's size, mtime and sampled SHA-256) instead of an index's hash
    "manifest.json, token file run": ("run_tok/ckpt/step_2/manifest.json",
                                      [["ckpt", "verify", "run_tok/ckpt"], ["train", "tok.yaml", *RESUME]]),
    "index.json": ("data/prep/index.json", [["data", "verify", "data/prep"], ["train", "prep.yaml", *RESUME]]),
    "prepare_state.json": ("data/part/prepare_state.json", [PREPARE]),
    "shard .idx.npy": ("data/prep/shard_00000.idx.npy",
                       [["data", "verify", "data/prep"], ["train", "prep.yaml", *RESUME]]),
    "token file .idx.npy": ("data/tok.idx.npy", [["data", "verify", "data/tok"], ["train", "tok.yaml", *RESUME]]),
    "Megatron .idx": ("data/meg.idx", [["train", "meg.yaml", *RESUME]]),
}


def mutations_of(base: Path, label: str, everything: bool) -> list[Mutation]:
    target = CASES[label][0]
    if target.endswith(".json"):
        return json_mutations(_read(base, target), everything) + file_mutations()
    if target.endswith(".idx.npy"):
        return npy_mutations()
    return megatron_mutations()


def _check(base, capsys, request, label: str) -> None:
    target, commands = CASES[label]
    tally = fuzz(base, label, target, mutations_of(base, label, _everything(request)), commands)
    report(capsys, label, tally)


@pytest.mark.parametrize("label", list(CASES))
def test_fuzz_covering_slice(base, capsys, request, label):
    _check(base, capsys, request, label)


@pytest.mark.slow
@pytest.mark.parametrize("label", list(CASES))
def test_fuzz_every_mutation(base, capsys, request, label):
    _check(base, capsys, request, label)


def test_the_covering_slice_covers_every_field_and_every_kind(base):
    for label in [label for label, (target, _) in CASES.items() if target.endswith(".json")]:
        some, every = mutations_of(base, label, False), mutations_of(base, label, True)
        assert {m.field for m in some} == {m.field for m in every}, label
        assert {m.kind for m in some} == {m.kind for m in every}, label
        assert len(some) < len(every)


# ---- two runs that start ranks: a real resume past a mutated checkpoint, and one onto mutated offsets ---------
def _train(base: Path, target: str, mutation: Mutation) -> tuple[subprocess.CompletedProcess, list]:
    """``distattn train prep.yaml --resume --steps 3`` in a fresh copy of the tree with ``mutation``
    applied to ``target``: the finished process and what it changed that it did not write."""
    tree = _fresh(base)
    mutation.apply(tree / target, base / "outside")
    before = _both(base)
    done = subprocess.run([DISTATTN, "train", "prep.yaml", "--resume", "--steps", "3"], cwd=tree,
                          capture_output=True, text=True, timeout=300)
    own = re.compile(r"tree/run/(\.lock|metrics\.jsonl|tb/.*)")
    return done, foreign_changes(before, _both(base), lambda rel: own.fullmatch(rel) is not None)


def _pick(mutations: list[Mutation], name: str) -> Mutation:
    return next(m for m in mutations if m.name == name)


def test_a_real_resume_moves_a_mutated_checkpoint_aside_and_trains_from_the_one_before(base):
    target = CASES["manifest.json"][0]
    mutation = _pick(json_mutations(_read(base, target), True), "files.__0_0.distcp.sha256:type:str")
    done, changed = _train(base, target, mutation)
    assert done.returncode == 0 and verdict(0, done.stdout, done.stderr) is None, done.stderr[-3000:]
    assert "resuming from step_1, the newest checkpoint that verifies; skipped step_2: " in done.stdout
    assert not changed, changed
    assert (base / "tree" / "run" / "ckpt" / "step_2.rejected" / "REJECTED").is_file()


def test_a_real_train_on_decreasing_offsets_is_refused_before_any_rank(base):
    """The resume takes step_2 (the data's identity is its index.json, unchanged), so what stops it is
    the shard's offsets: read_index checks them as ShardedCorpus would in every rank."""
    done, changed = _train(base, CASES["shard .idx.npy"][0],
                           _pick(npy_mutations(), "value:value:non-monotone"))
    assert done.returncode == 2 and verdict(2, done.stdout, done.stderr) is None, done.stderr[-3000:]
    assert "shard_00000.idx.npy has empty or decreasing documents" in done.stderr
    assert "rank(s)" not in done.stdout and not changed, (done.stdout, changed)
