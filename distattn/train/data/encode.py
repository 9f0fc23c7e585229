"""The tokenizing side of ``distattn data prepare`` (:mod:`.prepare`): batches of raw documents ->
flat tokens and lengths, in this process or in a pool whose results are taken in input order."""

from __future__ import annotations

import multiprocessing
import signal
from collections import deque
from typing import Iterator

import numpy as np

from .bad_rows import BadDocument
from .readers import decode, load_tokenizer
from .sharded import token_dtype


class _Encoder:
    """Texts of a batch -> (flat tokens in the output dtype, document lengths)."""

    def __init__(self, tokenizer, skip: bool = False):
        self.tokenizer, self.skip = tokenizer, skip
        self.dtype = token_dtype(tokenizer.vocab_size)

    def __call__(self, batch: dict) -> tuple[np.ndarray, np.ndarray, dict]:
        """(tokens, lengths, {index in the batch: why} of the documents skipped, whose length is 0)."""
        texts, bad = [], {}
        for i, (raw, rec) in enumerate(zip(batch["raws"], batch["records"])):
            try:
                texts.append(decode(batch["path"], batch["kind"], raw, rec))
            except BadDocument as exc:
                if not self.skip:
                    raise BadDocument(f"{exc}, or pass --on-bad-document skip to leave it out") from None
                bad[i] = str(exc)
        ids = iter(self.tokenizer.encode(texts))
        ids = [np.zeros(0, np.int64) if i in bad else next(ids) for i in range(len(batch["raws"]))]
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        flat = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        if len(flat) and (flat.min() < 0 or flat.max() >= self.tokenizer.vocab_size):
            raise ValueError(f"--tokenizer {self.tokenizer.name} produced id {int(flat.max())} outside its vocabulary "
                             f"of {self.tokenizer.vocab_size}; the tokenizer is inconsistent")
        return flat.astype(self.dtype), lengths, bad


_WORKER: _Encoder | None = None


def _init_worker(spec: str, skip: bool) -> None:
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _WORKER = _Encoder(load_tokenizer(spec), skip)


def _encode_in_worker(batch: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    return _WORKER(batch)


def tokenized(jobs: Iterator[dict], tokenizer, workers: int, skip: bool) -> Iterator[tuple[dict, tuple]]:
    """(batch, (tokens, lengths)) in input order; at most ``2 * workers`` batches in flight (each
    worker loads the tokenizer again from its name: tokenizer objects need not pickle)."""
    if workers == 1:
        encode = _Encoder(tokenizer, skip)
        for batch in jobs:
            yield batch, encode(batch)
        return
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer.name, skip)) as pool:
        pending = deque()
        for batch in jobs:
            job = {key: batch[key] for key in ("path", "kind", "raws", "records")}
            pending.append((batch, pool.apply_async(_encode_in_worker, (job,))))
            if len(pending) >= 2 * workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()
