"""``distattn data ...``: turn text corpora into the token shards ``distattn train`` reads."""

from __future__ import annotations

import sys
import time

from ._args import command_group, examples, positive_int, tokens


def _cmd_prepare(args) -> int:
    from ..train.data.prepare import prepare

    start = time.monotonic()
    try:
        index = prepare(args.inputs, args.out, tokenizer=args.tokenizer, shard_tokens=args.shard_tokens,
                        workers=args.workers, overwrite=args.overwrite, on_bad_document=args.on_bad_document)
    except KeyboardInterrupt:
        print(f"distattn data prepare: interrupted; rerun the same command to continue where {args.out} stopped",
              file=sys.stderr)
        return 130
    seconds = time.monotonic() - start
    size = sum(i["bytes"] for i in index["settings"]["inputs"])
    left_out = [f"{index.get(key, 0):,} {word}" for key, word in (("empty_documents", "empty"),
                                                                  ("skipped_documents", "skipped")) if index.get(key)]
    print(f"{args.out}: {index['documents']:,} documents{' (' + ', '.join(left_out) + ' left out)' if left_out else ''}, "
          f"{index['tokens']:,} tokens ({index['dtype']}) in "
          f"{len(index['shards'])} shards, vocabulary {index['vocab_size']:,}; {size / 1e6:,.2f} MB of input, "
          f"{seconds:,.1f} s this run")
    print(f"train on it with  data: {{source: tokens, path: {args.out}}}  and  model.vocab_size >= "
          f"{index['vocab_size']}")
    return 0


def _cmd_verify(args) -> int:
    from ..train.data.verify import verify

    problems, notes = verify(args.path, args.vocab_size)
    for line in notes + problems:
        print(line)
    if problems:
        print(f"{args.path}: {len(problems)} problem(s)")
        return 1
    print(f"{args.path}: verified, clean")
    return 0


def add_parsers(sub) -> None:
    data_sub = command_group(
        sub, "data", help="prepare corpora for training (text, JSONL, Parquet -> token shards)",
        description="Tokenize text corpora into the sharded token files `distattn train` reads "
                    "(data: {source: tokens, path: DIR}).",
        epilog=examples(".venv/bin/distattn data prepare corpus.jsonl --out data/corpus",
                        ".venv/bin/distattn data prepare shards/ --tokenizer tokenizer.json --workers 8 "
                        "--out data/corpus"))

    prep = data_sub.add_parser(
        "prepare", help="tokenize .txt/.jsonl/.parquet files into sharded token files",
        description="Tokenize .txt (one document per file), .jsonl (a 'text' field per line) and .parquet (a 'text' "
                    "column) files into DIR: shard_NNNNN.bin (flat tokens) + shard_NNNNN.idx.npy (document offsets) "
                    "and index.json. Streams (memory does not grow with the corpus); an interrupted run continues "
                    "when rerun with the same arguments; the output is the same for any --workers.",
        epilog=examples(".venv/bin/distattn data prepare notes/ --out data/notes",
                        ".venv/bin/distattn data prepare a.jsonl b.parquet --tokenizer meta-llama/Llama-3.1-8B "
                        "--out data/ab",
                        ".venv/bin/distattn data prepare web.jsonl --tokenizer tok/tokenizer.json --workers 16 "
                        "--shard-tokens 64M --out data/web"))
    prep.add_argument("inputs", nargs="+", metavar="INPUT",
                      help="a .txt, .jsonl or .parquet file, or a directory of them (read in sorted order)")
    prep.add_argument("--out", required=True, metavar="DIR", help="folder for the shards and index.json")
    prep.add_argument("--tokenizer", default="bytes", metavar="NAME_OR_PATH",
                      help="'bytes' (UTF-8 bytes, vocab 256, as data.source: stdlib), a tokenizer.json or a folder "
                           "holding one, or a transformers tokenizer folder or name already on this machine")
    prep.add_argument("--workers", type=positive_int, default=1, metavar="N", help="tokenizing processes (they also decode the JSON; a "
                      "tokenizers-library tokenizer already spreads each batch over the cores of one process)")
    prep.add_argument("--shard-tokens", type=tokens, default=2**28, metavar="TOKENS",
                      help="tokens per shard at most (a longer document gets a shard of its own), e.g. 256M")
    prep.add_argument("--overwrite", action="store_true", help="replace what an earlier prepare left in DIR")
    prep.add_argument("--on-bad-document", choices=["fail", "skip"], default="fail",
                      help="a line or row that cannot be read (null, not UTF-8, a lone surrogate, JSON too deep, a "
                           "Parquet page that does not decode): fail names its file and line or row; skip leaves it "
                           "out, counted in index.json (skipped_documents)")
    prep.set_defaults(func=_cmd_prepare)

    ver = data_sub.add_parser(
        "verify", help="check a prepared folder or token file fully before training on it",
        description="Read PATH through once: a folder from `distattn data prepare` (every shard's SHA-256 against "
                    "index.json, offsets integer, rising and within the .bin, every token id below the vocabulary) "
                    "or the PATH.bin + PATH.idx.npy prefix of a token file. One line per problem naming the file "
                    "and offset; exit 0 when clean, 1 otherwise.",
        epilog=examples(".venv/bin/distattn data verify data/corpus",
                        ".venv/bin/distattn data verify data/tok --vocab-size 32000"))
    ver.add_argument("path", metavar="PATH", help="a prepared folder, or a token file's prefix")
    ver.add_argument("--vocab-size", type=positive_int, default=None, metavar="N",
                     help="token ids must be below N (default: a folder's own vocabulary)")
    ver.set_defaults(func=_cmd_verify)
