"""Document lengths for packed batches: real samples from a JSON file, or a synthetic skew.

Packed sequences are filled greedily with documents drawn from a length
distribution, the last one cut at the sequence end (how long-context training
pipelines pack). Real samples (e.g. ProLong's, median ~1.9K, mean ~3.1K
tokens) are JSON lists of ints; without one, a log-normal with the same
median and a similar tail stands in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..costmodel.jsonfile import read_json


# document-length samples shipped in the package, by name (``--doclens sample``): distattn/profiles/doclens/
PACKAGED_DOCLENS = ("sample",)
# the longest document length a file may give: a trillion tokens, far past any context, whose sums over
# millions of documents still fit int64
MAX_DOC_LEN = 2**40


def synthetic_sample(n: int = 4000, seed: int = 0) -> list[int]:
    """What ``distattn/profiles/doclens/sample.json`` holds (written by this function, checked by the tests):
    ``n`` lengths, 95% log-normal with ProLong's published median (1.9K tokens, sigma 1) and 5% log-uniform
    over 16K-256K, the long documents a 128K-1M context is trained for. A stand-in with a long tail, not
    anyone's measured corpus."""
    rng = np.random.default_rng(seed)
    long = rng.random(n) < 0.05
    body = np.exp(rng.normal(np.log(1900), 1.0, n))
    tail = np.exp(rng.uniform(np.log(16384), np.log(262144), n))
    return [max(16, int(x)) for x in np.where(long, tail, body)]


def doclens_source(name: str) -> str:
    """The file ``--doclens NAME_OR_PATH`` reads: an existing path, else a packaged sample's
    (:data:`PACKAGED_DOCLENS`); ``ValueError`` for neither."""
    if Path(name).exists():
        return name
    if name not in PACKAGED_DOCLENS:
        raise ValueError(f"{name} is neither an existing file nor a packaged sample ({', '.join(PACKAGED_DOCLENS)})"
                         f"; pass a JSON list of document lengths, or a packaged name")
    from importlib.resources import files

    return str(files("distattn") / "profiles" / "doclens" / f"{name}.json")


def load_doc_lens(path: str | Path) -> np.ndarray:
    """A JSON list of positive document lengths: a file, or a packaged sample's name (:func:`doclens_source`)."""
    path = doclens_source(str(path))
    values = read_json(path, "a JSON list of positive document lengths")
    if not isinstance(values, list) or not values:
        raise ValueError(f"{path}: expected a non-empty JSON list of positive ints (document lengths)")
    for i, x in enumerate(values):
        # bool is an int subclass (true would be a 1-token document); past MAX_DOC_LEN, a length's sums
        # over a batch's documents overflow the planners' int64
        if isinstance(x, bool) or not isinstance(x, int) or not 0 < x <= MAX_DOC_LEN:
            text = json.dumps(x)   # as the file writes it (true, not True)
            text = text if len(text) <= 40 else f"{text[:32]}..."
            raise ValueError(f"{path}: entry {i} is {text}; document lengths are ints from 1 "
                             f"to {MAX_DOC_LEN} (2**40)")
    return np.asarray(values, dtype=np.int64)


def upsample_long(pool: np.ndarray, threshold: int = 65536, factor: int = 4) -> np.ndarray:
    """``pool`` with every document longer than ``threshold`` repeated ``factor`` times in all
    (how the DistCA evaluation skews a sample toward long documents)."""
    pool = np.asarray(pool)
    return np.concatenate([pool, np.repeat(pool[pool > threshold], factor - 1)])


def pack(total: int, pool: np.ndarray | None = None, *, median: int = 1900, sigma: float = 1.0,
         seed: int = 0) -> list[int]:
    """Document lengths summing to ``total``: drawn from ``pool`` (uniformly) or, without one,
    log-normal with ``median`` and ``sigma``; the last document is cut at the end."""
    if total < 1 or median < 1:
        raise ValueError(f"total ({total}) and median ({median}) must be >= 1")
    rng = np.random.default_rng(seed)
    lens: list[int] = []
    filled = 0
    while filled < total:
        n = int(pool[rng.integers(len(pool))]) if pool is not None else max(1, int(rng.lognormal(np.log(median),
                                                                                                  sigma)))
        n = min(n, total - filled)
        lens.append(n)
        filled += n
    return lens


# the named workloads of `distattn bench` (and of the simulator's calibration against it); the
# last three are LongCA-bench's slice masks
MASK_CASES = ("causal", "full", "causal-doc", "full-doc", "window", "shared-question", "prefix-lm",
              "causal-blockwise")
SLICE_CASES = ("shared-question", "prefix-lm", "causal-blockwise")


class MaskCase(NamedTuple):
    """A named workload: its documents (RoPE positions, the length) and mask; ``slices`` is the
    :class:`~distattn.planning.masks.SliceMask` of slice-mask workloads (None: the document mask of
    ``causal``/``window``). ``distattn.plan(docs, mesh, causal=..., window=..., mask=slices)``."""

    docs: list[int]
    causal: bool
    window: int | None
    slices: object = None

    def plan_kwargs(self) -> dict:
        return {"mask": self.slices} if self.slices is not None else {"causal": self.causal, "window": self.window}

    def area(self) -> int:
        from .masks import SliceMask

        return (self.slices or SliceMask.documents(self.docs, self.causal, self.window)).area()


def mask_case(mask: str, seq_len: int, pool, seed: int) -> MaskCase:
    """A named workload of ``seq_len`` tokens: ``causal``/``full`` one document, ``causal-doc``/
    ``full-doc`` packed documents (from ``pool`` or the log-normal stand-in), ``window`` one causal
    document with a window of ``seq_len / 8``; and slice masks: ``shared-question`` (a question of
    ``seq_len / 4`` tokens, then packed answers that see it and themselves), ``prefix-lm`` (packed
    documents, each with a bidirectional prefix of 20-80% of it) and ``causal-blockwise`` (packed
    blocks, each seeing itself and every earlier block)."""
    from .masks import causal_blockwise, prefix_lm, shared_question

    if mask not in MASK_CASES:
        raise ValueError(f"mask {mask!r} is unknown; choose from {', '.join(MASK_CASES)}")
    if mask in ("causal", "full", "window"):
        return MaskCase([seq_len], mask != "full", (max(1, seq_len // 8) if mask == "window" else None))
    pool = None if pool is None else np.asarray(pool)
    if mask == "shared-question":
        question = max(1, seq_len // 4)
        if seq_len - question < 1:
            return MaskCase([seq_len], True, None)
        answers = pack(seq_len - question, pool, seed=seed, median=max(1, seq_len // 16))
        return MaskCase([seq_len], True, None, shared_question(question, answers))
    docs = pack(seq_len, pool, seed=seed, median=max(1, seq_len // 16))
    if mask == "prefix-lm":
        frac = np.random.default_rng(seed).uniform(0.2, 0.8, len(docs))
        return MaskCase(docs, True, None, prefix_lm(docs, [int(f * n) for f, n in zip(frac, docs)]))
    if mask == "causal-blockwise":
        return MaskCase([seq_len], True, None, causal_blockwise(docs))
    return MaskCase(docs, mask == "causal-doc", None)
