"""The seed's tokenizer script, kept verbatim; it forwards to `gptlab tokenizer ...`.

python src/tokenization.py --train ./path/to/corpus.txt --vocab_size 20000   # writes ./path/to/corpus/
python src/tokenization.py --tokenizer ./path/to/corpus --encode "text"
python src/tokenization.py --tokenizer ./path/to/corpus --decode "[1, 2, 3]"
"""

import argparse
import sys
from pathlib import Path

try:
    from gptlab.cli import main
except ImportError:  # a plain checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gptlab.cli import main


def gptlab_argv(argv: list[str] | None = None) -> list[str]:
    """The seed's flags as a `gptlab tokenizer` command line."""
    parser = argparse.ArgumentParser(description="Train a tokenizer, or encode/decode with one.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--train", nargs="+", metavar="CORPUS", help="text files to train on")
    action.add_argument("--encode", metavar="TEXT", help="text to turn into ids")
    action.add_argument("--decode", metavar="IDS", help='ids to turn into text, e.g. "[1, 2, 3]"')
    parser.add_argument("--vocab_size", type=int, help="vocabulary size when training")
    parser.add_argument("--tokenizer", default="./toy_data/tiny_sp", help="tokenizer directory")
    parser.add_argument("--out", help="where --train writes (default: the corpus path without its extension)")
    parser.add_argument("--tokenizer_type", "--type", dest="type", help="default, sentencepiece, char or tiktoken")
    args = parser.parse_args(argv)
    kind = ["--type", args.type] if args.type else []
    if args.train:
        size = ["--vocab_size", str(args.vocab_size)] if args.vocab_size is not None else []
        out = ["--out", args.out] if args.out else []
        return ["tokenizer", "train", *size, *kind, *out, "--", *args.train]
    # "--" ends the flags, so a text that starts with "-" stays text.
    if args.encode is not None:
        return ["tokenizer", "encode", "--tokenizer", args.tokenizer, *kind, "--", args.encode]
    return ["tokenizer", "decode", "--tokenizer", args.tokenizer, *kind, "--", args.decode]


if __name__ == "__main__":
    sys.exit(main(gptlab_argv()))
