"""Packed long sequences of real documents, deterministic and resumable.

Sources:

* ``stdlib`` (the embedded default, offline anywhere): the Python standard
  library's ``.py`` files, one document per file, byte-level (vocab 256) --
  real text with a real length skew.
* ``tokens``: your own pre-tokenised corpus, either

  - a directory written by ``distattn data prepare`` (:class:`ShardedCorpus`):
    ``index.json`` plus shards ``shard_00000.bin`` / ``shard_00000.idx.npy``, ...
    (the format is spelled out in :mod:`.prepare`), or
  - one token file: ``PATH.bin`` (flat uint16 or uint32 tokens, memory-mapped)
    plus ``PATH.idx.npy`` (int64 document offsets, ``n_docs + 1`` entries);
    :func:`write_token_file` writes one. Each shard of a prepared directory is
    such a file.
* ``megatron``: Megatron-core indexed datasets, ``PREFIX.bin`` + ``PREFIX.idx``
  (:mod:`.megatron`).
* ``hf``: a Hugging Face ``save_to_disk`` folder or Parquet files, ``text``
  tokenized as the packer reaches it, or ``input_ids`` as they are
  (:mod:`.hf`).
* ``blend``: several of those mixed by weight (:class:`Blend`).

:class:`Packer` walks the documents in a seeded order per epoch and fills
sequences of ``seq_len`` tokens greedily; a document cut at the end of a
sequence continues at the start of the next one, so nothing is skipped or
repeated (empty documents are passed over). Its whole state is three ints
(:meth:`Packer.state`; a blend's is ``1 + 3 * sources``). Data parallelism
(:mod:`.global_batch`): every rank cuts the same global batch, reads only its own.

A blend draws each next document from the source whose share of the tokens
drawn so far lags its weight the most (ties: the first listed), so every
source's token share stays within about one document of its weight (Megatron's
``BlendedDataset`` does the same per sample). Each source is walked in its own
seeded order, epoch after epoch. The stream is a function of the seed alone,
and the state after any sequence says exactly where it is.

The modules, base first: :mod:`.corpus` (the base and the ``stdlib`` / token-file sources),
:mod:`.readers` (text files and tokenizers), :mod:`.sharded` (a prepared folder), :mod:`.megatron`,
:mod:`.hf`, :mod:`.bad_rows` (the preflight scan of an hf source's rows), :mod:`.packer` (:class:`Packer`,
:class:`Blend`), :mod:`.sources` (:func:`make_corpus`, the factory), :mod:`.global_batch` (a step's batch
over DP ranks), :mod:`.prepare` (``distattn data prepare``, with :mod:`.encode`, its tokenizing, and
:mod:`.progress`, the progress both print), :mod:`.identity` (the data's identity a checkpoint records)
and :mod:`.verify` (``distattn data verify``). The names below are re-exported for code that imports them from ``distattn.train.data``.
"""

from .corpus import BYTE_VOCAB, FlatCorpus, StdlibCorpus, TokenFileCorpus, load_offsets, max_token, write_token_file
from .packer import Blend, Packer
from .sharded import INDEX_NAME, ShardedCorpus, is_prepared, read_index, token_dtype
from .sources import make_corpus

__all__ = ["BYTE_VOCAB", "Blend", "FlatCorpus", "INDEX_NAME", "Packer", "ShardedCorpus", "StdlibCorpus",
           "TokenFileCorpus", "is_prepared", "load_offsets", "make_corpus", "max_token", "read_index",
           "token_dtype", "write_token_file"]
