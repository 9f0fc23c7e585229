"""The corpus a data section names (:func:`make_corpus`): the one factory over every source."""

from __future__ import annotations

from pathlib import Path

from .corpus import StdlibCorpus, TokenFileCorpus
from .hf import HFCorpus
from .megatron import MegatronCorpus
from .packer import Blend
from .sharded import INDEX_NAME, ShardedCorpus, is_prepared


def make_corpus(source, path: str | None = None, tokenizer: str | None = None, on_bad_document: str = "fail"):
    """The corpus of a data section: ``make_corpus(cfg.data)`` (a blend needs the whole section), or
    ``make_corpus(source, path, tokenizer)`` for one source; ``on_bad_document`` is the section's
    ``data.on_bad_document`` (read by ``hf``, the one source whose documents can be bad as they are
    read). ``tokens``: a prepared directory when ``path`` holds ``index.json``, else the ``PATH.bin`` +
    ``PATH.idx.npy`` prefix."""
    if not isinstance(source, str):   # a DataConfig
        data = source
        if data.source == "blend":
            return Blend([make_corpus(e.source, e.path, e.tokenizer, data.on_bad_document) for e in data.blend],
                         [e.weight for e in data.blend])
        return make_corpus(data.source, data.path, data.tokenizer, data.on_bad_document)
    if source == "blend":
        raise ValueError("data.source: blend needs the whole data section: make_corpus(cfg.data)")
    if source == "stdlib":
        return StdlibCorpus()
    if source == "megatron":
        return MegatronCorpus(path)
    if source == "hf":
        return HFCorpus(path, tokenizer, on_bad_document)
    if is_prepared(path):
        return ShardedCorpus(path)
    if path is not None and Path(path).is_dir():
        raise ValueError(f"data.path: {path} is a directory without {INDEX_NAME}; write one with "
                         f"`distattn data prepare INPUT... --out {path}`")
    return TokenFileCorpus(path)
