"""`gptlab tokenizer train|encode|decode|info`: train, inspect and apply tokenizers."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from gptlab.cli.common import CORPUS_RULES
from gptlab.errors import GptlabError
from gptlab.tokenizers import KINDS, Tokenizer, check_output_dir, load_tokenizer, save_tokenizer, train_tokenizer
from gptlab.tokenizers.corpus import read_corpus

DEFAULT_TOKENIZER = "./toy_data/tiny_sp"


def add_tokenizer_parser(subparsers: argparse._SubParsersAction) -> None:
    """`gptlab tokenizer train|encode|decode|info`."""
    parser = subparsers.add_parser("tokenizer", help="train, inspect and apply tokenizers")
    actions = parser.add_subparsers(dest="action", required=True, metavar="{train,encode,decode,info}")

    train = actions.add_parser(
        "train", help="train a tokenizer on text files", description=f"Train a tokenizer. {CORPUS_RULES}"
    )
    train.add_argument("files", nargs="+", help="text files or directories of .txt files")
    train.add_argument("--vocab_size", type=int, help="ids in total, the 4 special tokens included (not for char)")
    trainable = [kind for kind in KINDS if kind != "tiktoken"]
    train.add_argument("--type", default="default", choices=trainable, help="tokenizer kind")
    train.add_argument("--pattern", default="gpt4", help="split pattern of the default kind: gpt4, gpt2 or a regex")
    train.add_argument("--max_chars", type=int, help="read at most this many characters of the corpus")
    train.add_argument(
        "--out",
        help="output directory (default: the first input without its extension and a trailing _train); "
        "a previous tokenizer there is replaced, any other content is refused",
    )
    train.set_defaults(handler=_tokenizer_train)

    encode = actions.add_parser("encode", help="print the ids of a text as [1, 2, 3]")
    encode.add_argument("text")
    encode.add_argument("--allow_special", action="store_true", help="read <EOS> etc. in the text as special tokens")
    _add_tokenizer_source(encode, handler=_tokenizer_encode)

    decode = actions.add_parser("decode", help='print the text of ids given as "[1, 2, 3]"')
    decode.add_argument("ids", help='a JSON list of ids, e.g. "[1, 2, 3]"')
    _add_tokenizer_source(decode, handler=_tokenizer_decode)

    info = actions.add_parser("info", help="print a tokenizer's kind, size, special ids and fingerprint")
    _add_tokenizer_source(info, handler=_tokenizer_info)


def _add_tokenizer_source(parser: argparse.ArgumentParser, handler) -> None:
    parser.add_argument(
        "--tokenizer",
        default=DEFAULT_TOKENIZER,
        help="tokenizer directory, .model/.tiktoken file or tiktoken encoding name (default: %(default)s)",
    )
    parser.add_argument("--type", choices=KINDS, help="tokenizer kind (default: detected from its files)")
    parser.set_defaults(handler=handler)


def default_output_dir(first_input: str | Path) -> Path:
    """Where `tokenizer train` writes by default: the first input without its extension and
    without a trailing `_train` (`path/corpus.txt` -> `path/corpus`, `data_train.txt` -> `data`);
    a path that would stay the same (a directory) gets `_tokenizer` appended instead."""
    first_input = Path(first_input)
    stem = first_input.stem.removesuffix("_train") or first_input.stem
    out = first_input.with_name(stem)
    return out if out != first_input else first_input.with_name(first_input.name + "_tokenizer")


def _tokenizer_train(args: argparse.Namespace) -> None:
    out = Path(args.out) if args.out else default_output_dir(args.files[0])
    check_output_dir(out)
    texts = read_corpus(args.files, args.max_chars)
    start = time.perf_counter()
    tokenizer = train_tokenizer(args.type, texts, args.vocab_size, args.pattern, progress=True)
    seconds = time.perf_counter() - start
    save_tokenizer(tokenizer, out)
    rate = ""
    if hasattr(tokenizer, "n_merges"):
        rate = f", {tokenizer.n_merges} merges, {tokenizer.n_merges / max(seconds, 1e-9):,.0f} merges/s"
    print(f"trained a {args.type} tokenizer of {tokenizer.vocab_size} tokens in {seconds:.1f} s{rate}")
    print(f"written to {out}")


def _load(args: argparse.Namespace) -> Tokenizer:
    return load_tokenizer(args.type, args.tokenizer)


def _tokenizer_encode(args: argparse.Namespace) -> None:
    tokenizer = _load(args)
    print(tokenizer.encode(args.text, allowed_special="all" if args.allow_special else ()))


def parse_ids(text: str) -> list[int]:
    """`"[1, 2, 3]"` -> [1, 2, 3]; GptlabError for anything else."""
    try:
        ids = json.loads(text)
    except ValueError:
        ids = None
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        raise GptlabError(f'cannot read token ids from {text[:40]!r}; write them as a list like "[1, 2, 3]"')
    return ids


def _tokenizer_decode(args: argparse.Namespace) -> None:
    ids = parse_ids(args.ids)
    print(_load(args).decode(ids))


def _tokenizer_info(args: argparse.Namespace) -> None:
    tokenizer = _load(args)
    print(f"kind: {tokenizer.kind}")
    print(f"vocab_size: {tokenizer.vocab_size}")
    print("special_tokens: " + ", ".join(f"{token}={i}" for token, i in tokenizer.special_tokens.items()))
    print(f"fingerprint: {tokenizer.fingerprint()}")
