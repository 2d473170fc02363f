"""`gptlab generate`: sample text from a GPT checkpoint (or with --interactive, in a prompt loop),
or decode a source with an encoder-decoder Transformer checkpoint (seq2seq.py)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

from gptlab.cli.common import (
    SHAPE_FLAGS,
    add_config_flags,
    add_device_flag,
    add_tokenizer_flags,
    add_weights_dtype_flag,
    check_against_checkpoint,
    flag_values,
)
from gptlab.cli.seq2seq import add_seq2seq_generate_flags, refuse_seq2seq_flags, run_generate_seq2seq
from gptlab.config import SampleConfig, validated


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="sample text from a trained GPT",
        description="Sample text from a checkpoint, which carries the model's shape and its tokenizer.",
    )
    parser.add_argument(
        "--model_path",
        required=True,
        help="a .pth checkpoint, or a directory from `gptlab export --format safetensors`",
    )
    parser.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    parser.add_argument("--length", "--max_new_tokens", dest="max_new_tokens", help="tokens to generate (default: 200)")
    add_device_flag(parser)
    add_weights_dtype_flag(parser)
    parser.add_argument(
        "--interactive",
        action="store_true",
        help="read prompts in a loop and stream each answer (an empty line or Ctrl-D quits, Ctrl-C stops an answer)",
    )
    add_config_flags(parser, SampleConfig, skip=("max_new_tokens",))
    add_tokenizer_flags(parser, "--tokenizer_path", required=False)
    add_seq2seq_generate_flags(parser)
    shape = parser.add_argument_group("checks against the checkpoint (optional; a value that differs is an error)")
    for flag in SHAPE_FLAGS:
        shape.add_argument(f"--{flag}", type=int)
    parser.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> None:
    from gptlab.device import resolve_device, weights_dtype
    from gptlab.generation import ready_for_generation, stream_batch, window_keep
    from gptlab.loading import load

    device = resolve_device(args.device)
    dtype = weights_dtype(args.dtype, device)  # before the slow load
    loaded = load(args.model_path, device)  # read once, whatever model it holds
    if loaded.model_type == "transformer":
        return run_generate_seq2seq(args, loaded.model, loaded.tokenizer, dtype)
    refuse_seq2seq_flags(args)
    sample_cfg = validated(SampleConfig, flag_values(args, SampleConfig))
    model, tokenizer = ready_for_generation(loaded.model, dtype), loaded.tokenizer
    check_against_checkpoint(args, model.config, tokenizer)
    window_keep(sample_cfg, model.config.seq_len)  # before the prompt is printed
    if args.interactive:
        from gptlab.cli.interactive import run_interactive

        run_interactive(model, tokenizer, sample_cfg)
        return
    pieces = stream_batch(model, tokenizer, [args.prompt], sample_cfg, notice=_notice)
    print_samples(pieces, args.prompt, sample_cfg.num_samples)


def print_samples(pieces: Iterable[tuple[int, str]], prompt: str, num_samples: int) -> None:
    """Print the first sample as it is produced and the others, from the same batch, after it."""
    later: dict[int, list[str]] = {row: [] for row in range(1, num_samples)}
    print(prompt, end="", flush=True)
    for row, piece in pieces:
        if row == 0:
            print(piece, end="", flush=True)
        else:
            later[row].append(piece)
    print()
    for row in range(1, num_samples):
        print("-" * 40)
        print(prompt + "".join(later[row]))


def _notice(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)
