"""`gptlab prepare`: tokenize text files into token shards for training."""

from __future__ import annotations

import argparse

from gptlab.cli.common import CORPUS_RULES, add_tokenizer_flags
from gptlab.tokenizers import load_tokenizer


def add_prepare_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="tokenize text files into a token directory for training",
        description=f"Tokenize text into token shards plus meta.json, with <EOS> after each file. {CORPUS_RULES}",
    )
    parser.add_argument(
        "files",
        nargs="+",
        help="text files or directories of .txt files (with --jsonl_field: JSONL files or directories of .jsonl files)",
    )
    add_tokenizer_flags(parser)
    parser.add_argument("--out", required=True, help="output directory (replaced only if it holds prepared data)")
    parser.add_argument(
        "--workers",
        type=int,
        help="tokenizer processes (default: min(4, CPU count)); the output is the same for any count",
    )
    parser.add_argument(
        "--shard_tokens", type=int, default=100_000_000, help="token ids per shard file (default: %(default)s)"
    )
    parser.add_argument("--jsonl_field", help="read JSONL: one document a line, its text in this field (e.g. text)")
    parser.set_defaults(handler=_prepare)


def _prepare(args: argparse.Namespace) -> None:
    from gptlab.data import TokenDataset, prepare

    tokenizer = load_tokenizer(args.tokenizer_type, args.tokenizer)
    out = prepare(
        args.files,
        tokenizer,
        args.out,
        shard_tokens=args.shard_tokens,
        workers=args.workers,
        jsonl_field=args.jsonl_field,
    )
    meta = TokenDataset(out, seq_len=1).meta
    print(f"{meta['num_tokens']:,} tokens ({meta['dtype']}) from {meta['num_bytes']:,} bytes, written to {out}")
