"""`gptlab generate` for encoder-decoder Transformer checkpoints: decode --prompt as a source.

generate.py owns the parser; it adds these flags with `add_seq2seq_generate_flags`, loads the
checkpoint (gptlab.load) and hands a Transformer to `run_generate_seq2seq` (and a GPT to its
sampling loop, after `refuse_seq2seq_flags`).
"""

from __future__ import annotations

import argparse

import torch

from gptlab.cli.common import check_against_checkpoint
from gptlab.config import SampleConfig
from gptlab.errors import GptlabError
from gptlab.models.transformer import Transformer
from gptlab.tokenizers.base import Tokenizer

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


def refuse_seq2seq_flags(args: argparse.Namespace) -> None:
    """GptlabError when beam-search flags are given for a GPT checkpoint (called once it is loaded)."""
    for flag, default in (("beam_size", 1), ("length_penalty", 1.0)):
        if getattr(args, flag, default) != default:
            raise GptlabError(
                f"--{flag} applies to encoder-decoder Transformer checkpoints, and {args.model_path} holds a GPT; "
                f"drop --{flag} (a GPT samples, see --temperature/--top_k/--top_p)"
            )


def run_generate_seq2seq(
    args: argparse.Namespace, model: Transformer, tokenizer: Tokenizer, dtype: torch.dtype
) -> None:
    """Print the target that `model`, loaded from args.model_path, writes for the source args.prompt."""
    from gptlab.generation import ready_for_generation, translate

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
