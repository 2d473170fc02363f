"""The `gptlab` command line: one module per subcommand (tokenizer, prepare, train, generate,
eval, export, serve, chat, plot), each with its `add_<name>_parser` and handlers; common.py holds the
flags and helpers several share. Subcommand modules import common.py and the library, never this
package's __init__.

Only wiring lives here: parse flags, call the library, print the result. A GptlabError is
printed as one `error: ...` line (exit status 1), a warning as one `warning: ...` line.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from gptlab.cli.chat import add_chat_parser
from gptlab.cli.eval import add_eval_parser
from gptlab.cli.export import add_export_parser
from gptlab.cli.generate import add_generate_parser
from gptlab.cli.plot import add_plot_parser
from gptlab.cli.prepare import add_prepare_parser
from gptlab.cli.serve import add_serve_parser
from gptlab.cli.tokenizer import add_tokenizer_parser
from gptlab.cli.train import add_train_parser
from gptlab.errors import GptlabError


# ---- the entry point -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptlab", description="Train GPT language models from scratch.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_tokenizer_parser(subparsers)
    add_prepare_parser(subparsers)
    add_train_parser(subparsers)
    add_generate_parser(subparsers)
    add_eval_parser(subparsers)
    add_export_parser(subparsers)
    add_serve_parser(subparsers)
    add_chat_parser(subparsers)
    add_plot_parser(subparsers)
    return parser


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one gptlab command; returns the exit status (0 ok, 1 user error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _print_warning
        try:
            status = args.handler(args)
        except GptlabError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        except OSError as error:  # a file problem no check above foresaw: still one line
            print(f"error: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    return status or 0
