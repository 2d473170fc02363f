"""`gptlab generate` for encoder-decoder Transformer checkpoints: decode --prompt as a source.

cli.py owns the parser; it adds these flags with `add_seq2seq_generate_flags` and hands a
checkpoint for which `is_seq2seq_checkpoint` holds to `run_generate_seq2seq` (and any other to
its sampling loop, after `refuse_seq2seq_flags`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gptlab.cli_common import check_against_checkpoint
from gptlab.config import SampleConfig
from gptlab.errors import GptlabError

# SampleConfig fields that mean something to greedy / beam decoding; the others shape sampling.
_DECODING_FIELDS = ("max_new_tokens", "greedy")


def add_seq2seq_generate_flags(parser: argparse.ArgumentParser) -> None:
    """--beam_size and --length_penalty, for Transformer checkpoints."""
    group = parser.add_argument_group("encoder-decoder Transformer checkpoints")
    group.add_argument("--beam_size", type=int, default=1, help="beams of the search; 1 = greedy (default: 1)")
    group.add_argument(
        "--length_penalty",
        type=float,
        default=1.0,
        help="beam scores are logprob / length**this; 0 = raw logprob, more = longer targets (default: 1.0)",
    )


def is_seq2seq_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a checkpoint file of an encoder-decoder Transformer."""
    from gptlab.training import load_checkpoint

    return Path(path).is_file() and load_checkpoint(path).model_type == "transformer"


def refuse_seq2seq_flags(args: argparse.Namespace) -> None:
    """GptlabError when beam-search flags are given for a GPT checkpoint (or for no checkpoint:
    the loader then says what is wrong with the path)."""
    if not Path(args.model_path).exists():
        return
    for flag, default in (("beam_size", 1), ("length_penalty", 1.0)):
        if getattr(args, flag, default) != default:
            raise GptlabError(
                f"--{flag} applies to encoder-decoder Transformer checkpoints, and {args.model_path} holds a GPT; "
                f"drop --{flag} (a GPT samples, see --temperature/--top_k/--top_p)"
            )


def run_generate_seq2seq(args: argparse.Namespace) -> None:
    """Print the target the Transformer checkpoint args.model_path writes for the source args.prompt."""
    from gptlab.device import resolve_device, weights_dtype
    from gptlab.generation import ready_for_generation
    from gptlab.interop.base_models import load_adapted
    from gptlab.seq2seq.decoding import translate

    given = [name for name in SampleConfig.model_fields if name not in _DECODING_FIELDS and getattr(args, name, None)]
    given += ["interactive"] if getattr(args, "interactive", False) else []
    if given:
        raise GptlabError(
            f"--{given[0]} applies to GPT checkpoints; a Transformer decodes greedily or with --beam_size N"
        )
    if not args.prompt:
        raise GptlabError('a Transformer translates a source: pass it with --prompt "source text"')
    if args.beam_size < 1:
        raise GptlabError(f"--beam_size must be at least 1, got {args.beam_size}")
    max_len = _positive_int(args.max_new_tokens, "--max_new_tokens") if args.max_new_tokens is not None else None
    device = resolve_device(args.device)
    dtype = weights_dtype(args.dtype, device)
    model, tokenizer, _ = load_adapted(args.model_path, device, "transformer")
    model = ready_for_generation(model, dtype)
    check_against_checkpoint(args, model.config, tokenizer)
    [target] = translate(model, tokenizer, [args.prompt], args.beam_size, args.length_penalty, max_len)
    print(target)


def _positive_int(text: str, flag: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise GptlabError(f"{flag} must be a positive whole number, got {text!r}")
    return value
