"""Checks the launching process makes before any rank starts: data, memory, the output folder.

Everything here fails with a one-line ``ValueError`` in seconds, where the same mistake found
by the ranks would cost a start-up, a traceback per rank or an out-of-memory kill.

The output folder belongs to one run. A folder that already holds metrics or checkpoints is
refused unless the run continues it (``resume``) or replaces it (``overwrite``), so two runs
never mix; a lock file keeps a second process from training into it at the same time.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from ..checkpoint import dcp as checkpoint
from ..config import RunConfig
from ..data.bad_rows import SCAN_DIR
from ..safe_io import open_lock, remove

# what a run writes under train.out (overwrite removes these and nothing else)
RUN_FILES = ("metrics.jsonl", "tb", "ckpt")


def check_data(cfg: RunConfig) -> None:
    """Every source of the data section is readable and fits ``model.vocab_size`` (a rank would fail
    on an id out of range with an IndexError naming neither the file nor the id):

    * ``tokens``: a directory from ``distattn data prepare`` whose shards have the sizes its
      index.json says and whose vocabulary fits, or the prefix of ``PATH.bin`` + ``PATH.idx.npy``;
    * ``megatron``: ``PREFIX.idx`` is a Megatron index that describes ``PREFIX.bin``;
    * ``hf``: the files, the column, the tokenizer (loaded), and every row read through once for bad
      documents (nulls, text that is not UTF-8, pages that do not decode: refused naming the file and
      row, or with ``data.on_bad_document: skip`` counted in one log line), each file's result kept
      under ``train.out/.data_scan`` for the next run (:mod:`..data.bad_rows`);

    and no token id is ``model.vocab_size`` or above, or below 0. A blend checks each source;
    its messages name ``data.blend[i]``."""
    d = cfg.data
    if d.verify:
        _verify_fully(d, cfg.model.vocab_size)
    scan = (Path(cfg.train.out) / SCAN_DIR, d.on_bad_document)
    if d.source != "blend":
        _check_source(d.source, d.path, d.tokenizer, cfg.model.vocab_size, scan)
        return
    for i, entry in enumerate(d.blend):
        try:
            _check_source(entry.source, entry.path, entry.tokenizer, cfg.model.vocab_size, scan)
        except ValueError as exc:
            message = str(exc)
            for key in ("data.path", "data.tokenizer"):
                if message.startswith(key):
                    raise ValueError(f"data.blend[{i}].{key[5:]}{message[len(key):]}") from None
            raise ValueError(f"data.blend[{i}] ({entry.source} {entry.path}): {message}") from None


def _verify_fully(d, limit: int) -> None:
    """``data.verify``: every prepared folder or token file read through (:mod:`..data.verify`);
    the first problem refused in its one line."""
    from ..data.verify import verify

    entries = d.blend if d.source == "blend" else [d]
    for i, entry in enumerate(entries):
        if entry.source != "tokens":
            continue   # megatron and hf ids are read through by the checks below in any case
        problems, _ = verify(entry.path, limit)
        if problems:
            where = f"data.blend[{i}]" if d.source == "blend" else "data.verify"
            raise ValueError(f"{where}: {problems[0]} ({len(problems)} problem(s): `distattn data verify "
                             f"{entry.path}` lists them)")


def _check_source(source: str, path: str | None, tokenizer: str | None, limit: int, scan: tuple) -> None:
    if source == "megatron":
        from ..data.megatron import check_ids

        ranges = check_ids(path, limit)
    elif source == "hf":
        from ..data.hf import HFCorpus

        corpus = HFCorpus(path, tokenizer, scan[1])
        _check_documents(corpus, scan[0])
        if corpus.tokenizer is not None and corpus.tokenizer.vocab_size > limit:
            raise ValueError(f"model.vocab_size {limit} is smaller than the vocabulary of data.tokenizer "
                             f"{tokenizer or 'bytes'} ({corpus.tokenizer.vocab_size}) that tokenizes {path}; set "
                             f"model.vocab_size >= {corpus.tokenizer.vocab_size}")
        ranges = corpus.id_ranges()
    elif source == "tokens":
        ranges = [(file, 0, top) for file, top in _token_maxima(Path(path), limit)]
    else:
        return
    for file, low, top in ranges:
        if top >= limit:
            raise ValueError(f"data.path: {file} holds token id {top}, but model.vocab_size is {limit} (ids must be "
                             f"below it); set model.vocab_size >= {top + 1}, or train on data tokenized for this "
                             f"model")
        if low < 0:
            raise ValueError(f"data.path: {file} holds token id {low}, below 0; train on data tokenized for this "
                             f"model")


def _check_documents(corpus, cache: Path) -> None:
    """``data.source: hf``: no bad document, or with ``data.on_bad_document: skip`` one line counting them."""
    scans = corpus.scan(cache)
    bad = [s for s in scans if s.bad]
    if not bad:
        return
    total, rows = sum(s.bad for s in bad), sum(s.rows for s in scans)
    count = f"{total:,} bad row{'s' * (total > 1)} in {len(bad)} file{'s' * (len(bad) > 1)}"
    if corpus.on_bad_document != "skip":
        raise ValueError(f"data.path: {bad[0].line()} ({count}); fix or drop {'them' if total > 1 else 'it'}, or set "
                         f"data.on_bad_document: skip to train without {'them' if total > 1 else 'it'}")
    logging.getLogger(__name__).warning(
        f"data.on_bad_document: skip: {total:,} of {rows:,} documents of {corpus.path} cannot be read and are "
        f"passed over ({count}; first: {bad[0].line()})")


def _token_maxima(path: Path, limit: int) -> list[tuple[Path, int]]:
    """``source: tokens``: (file, largest id) of each shard, and the index's vocabulary checked."""
    from ..data.sharded import INDEX_NAME, index_vocab, is_prepared, read_index, shard_maxima
    from ..data.corpus import TokenFileCorpus

    if is_prepared(path):
        index = read_index(path)
        vocab = index_vocab(path, index)
        if vocab > limit:
            raise ValueError(f"model.vocab_size {limit} is smaller than the tokenizer's vocabulary "
                             f"{vocab} from {path / INDEX_NAME}; set model.vocab_size >= {vocab}")
        return shard_maxima(path, index)
    if path.is_dir():
        raise ValueError(f"data.path: {path} is a directory without {INDEX_NAME}; write one with "
                         f"`distattn data prepare INPUT... --out {path}`")
    for p in (path.with_name(path.name + ".bin"), path.with_name(path.name + ".idx.npy")):
        if not p.exists():
            raise ValueError(f"data.path: {p} does not exist (data.path is a directory from `distattn data "
                             f"prepare`, or the prefix of PATH.bin and PATH.idx.npy written by "
                             f"distattn.train.data.write_token_file)")
    corpus = TokenFileCorpus(path)
    return [(corpus.bin_path, int(corpus.tokens.max()))]


def rank_memory_bytes(cfg: RunConfig) -> int:
    """One CPU rank's peak memory training ``cfg`` (:func:`distattn.train.preflight.memory.estimate`)."""
    from .memory import estimate

    return estimate(cfg, device="cpu").total


def check_memory(cfg: RunConfig, ranks_here: int) -> None:
    """Refuse a run whose ``ranks_here`` CPU ranks cannot fit in this machine's memory."""
    from .memory import CPU_RUNTIME_BYTES, _states, physical_memory_bytes

    total = physical_memory_bytes()
    if total is None:
        return
    # the model states and the runtime alone first: thousands of ranks are refused before a dry plan of them
    need = (CPU_RUNTIME_BYTES + sum(_states(cfg))) * ranks_here
    if need <= total:
        need = rank_memory_bytes(cfg) * ranks_here
    if need > total:
        at = f" (balanced packing: a rank's sequence up to data.token_cap {cfg.data.cap:,})" \
            if cfg.packing == "balanced" else ""
        raise ValueError(f"data.seq_len {cfg.data.seq_len:,}{at} with this model needs about {need / 2**30:,.1f} GiB "
                         f"for {ranks_here} rank(s) but this machine has {total / 2**30:,.1f} GiB; lower "
                         f"data.seq_len or the model size, set train.activation_checkpointing: full, or raise "
                         f"parallel.cp on more machines (`distattn train CONFIG --dry-run` shows the estimate)")


def prepare_out(cfg: RunConfig, resume: bool, overwrite: bool, say=None, checksums: bool = True) -> Path | None:
    """Make ``train.out`` ready for this run; returns the checkpoint a resume loads (None: start fresh).

    ``ValueError`` when the folder holds another run and neither ``resume`` nor ``overwrite`` is set,
    when a resume finds nothing to load, or when no checkpoint verifies (``checksums``: hash every file
    too, else only the structure: the ranks hash their shares). A resume moves each newer checkpoint it
    skips to ``step_N.rejected`` and its line says where.
    """
    say = say or logging.getLogger(__name__).info
    if resume and overwrite:
        raise ValueError("--resume continues the run in train.out and --overwrite deletes it: pass one of them")
    out = Path(cfg.train.out)
    used = [name for name in RUN_FILES if os.path.lexists(out / name)]   # a dangling link is not nothing
    if overwrite:
        for name in used:
            remove(out / name)   # a link goes alone: what it points to is not this run's
        if used:
            say(f"--overwrite: removed {', '.join(used)} from {out}")
        return None
    if not resume:
        if used:
            ckpts = sorted(p.name for p in (out / "ckpt").glob("step_*")) if (out / "ckpt").is_dir() else []
            held = ", ".join(used) + (f" (checkpoints {', '.join(ckpts)})" if ckpts else "")
            raise ValueError(f"train.out {out} already holds a run ({held}); pass --resume to continue it, "
                             f"--overwrite to replace it (a Trainer: resume=True, overwrite=True), or --out "
                             f"NEW_FOLDER")
        return None
    # rank 0, where the resume decides: what it skips goes to step_N.rejected, so that a later save of
    # that step cannot delete what no run of ours may have written
    last = checkpoint.newest_usable(out / "ckpt", say=say, checksums=checksums, aside=True)
    if last is None:
        raise ValueError(f"--resume: no checkpoint under {out / 'ckpt'}; drop --resume to start a new run")
    return last


def lock_out(out: Path):
    """Hold an exclusive lock on ``out/.lock`` for this process's lifetime (the returned file);
    ``ValueError`` if another live process holds it, or if ``out`` is not (and cannot be made) a folder."""
    if out.is_symlink() and not out.exists():
        raise ValueError(f"train.out {out} is a link to {os.readlink(out)}, which does not exist; pass --out to a "
                         f"folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"train.out {out} is a file, not a folder; pass --out to a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:   # a file on the way, no permission, read-only file system
        raise ValueError(f"train.out {out} cannot be made a folder ({exc.strerror}); pass --out to another "
                         f"folder") from None
    handle = open_lock(out / ".lock")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise ValueError(f"train.out {out} is in use by {owner}; wait for it, stop it, or pass --out NEW_FOLDER") \
            from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle
