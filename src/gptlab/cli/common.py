"""What several subcommands share: flags made from the config models, the tokenizer, --device and
--dtype flags, loading a trained GPT for generation, and checking the seed's shape flags against a
checkpoint. The subcommand modules import it; it imports none of them.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.tokenizers import KINDS, Tokenizer, load_tokenizer

CORPUS_RULES = (
    "Directories are searched recursively for .txt files (sorted). Binary files are refused; "
    "bytes that are not UTF-8 are replaced by U+FFFD with a warning naming the file and offset."
)

# Flags the seed's generate.py required; now optional, and checked against the checkpoint.
SHAPE_FLAGS = {
    "vocab_size": "tgt_vocab_size",
    "embed_dim": "embed_dim",
    "n_heads": "n_heads",
    "num_layers": "num_layers",
    "seq_len": "seq_len",
}


def add_weights_dtype_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16", "fp16", "int8"],
        help="precision of the weights while generating: bf16 reads half the memory per token (faster for larger "
        "models on GPUs; on CPUs usually slower than fp32), with slightly different logits; fp16 on GPUs only; "
        "int8 (CPU, GPT checkpoints) reads a quarter, fastest for larger models on CPUs (default: fp32)",
    )


def load_for_generation(path: str, device_name: str, dtype_name: str) -> tuple[Any, Tokenizer]:
    """The GPT at `path` (gptlab.load), made ready_for_generation in the --dtype asked for
    (checked before the slow load), and its tokenizer."""
    from gptlab.device import resolve_device, weights_dtype
    from gptlab.generation import ready_for_generation
    from gptlab.loading import load

    device = resolve_device(device_name)
    dtype = weights_dtype(dtype_name, device)
    loaded = load(path, device, model_type="gpt")
    return ready_for_generation(loaded.model, dtype), loaded.tokenizer


def check_against_checkpoint(args: argparse.Namespace, model_cfg: ModelConfig, tokenizer: Tokenizer) -> None:
    """The seed's shape flags and --tokenizer_path must agree with what the checkpoint holds."""
    for flag, field in SHAPE_FLAGS.items():
        given, stored = getattr(args, flag), getattr(model_cfg, field)
        if given is not None and given != stored:
            raise GptlabError(f"--{flag} {given} contradicts the checkpoint ({field} = {stored}); drop the flag")
    if args.tokenizer_path:
        given_tokenizer = load_tokenizer(args.tokenizer_type, args.tokenizer_path)
        if given_tokenizer.fingerprint() != tokenizer.fingerprint():
            raise GptlabError(
                f"--tokenizer_path {args.tokenizer_path} is not the tokenizer {args.model_path} was trained with; "
                "drop the flag: the checkpoint carries its own tokenizer"
            )


# ---- configs as flags ------------------------------------------------------------------------
def add_config_flags(
    parser: argparse.ArgumentParser, *config_classes: type[BaseModel], skip: Sequence[str] = ()
) -> None:
    """One --flag per config field, documented from the Pydantic model. Values stay strings
    (pydantic converts and validates them) and default to None, so only the flags a user typed
    override a --config file."""
    for cls in config_classes:
        group = parser.add_argument_group(f"{cls.__name__} options")
        for name, field in cls.model_fields.items():
            if name in skip:
                continue
            default = field.get_default(call_default_factory=True)  # [] rather than "PydanticUndefined"
            help_text = f"{field.description or ''} (default: {default})".strip()
            if field.annotation is bool:
                group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, help=help_text)
            elif typing.get_origin(field.annotation) is list:
                group.add_argument(f"--{name}", action="append", metavar=name.upper(), help=f"{help_text}; repeatable")
            elif typing.get_origin(field.annotation) is typing.Literal:
                group.add_argument(f"--{name}", choices=typing.get_args(field.annotation), help=help_text)
            else:
                group.add_argument(f"--{name}", metavar=name.upper(), help=help_text)


def flag_values(args: argparse.Namespace, *config_classes: type[BaseModel]) -> dict[str, Any]:
    """The config fields the user set on the command line."""
    names = {name for cls in config_classes for name in cls.model_fields}
    return {name: value for name, value in vars(args).items() if name in names and value is not None}


def add_tokenizer_flags(parser: argparse.ArgumentParser, flag: str = "--tokenizer", required: bool = True) -> None:
    parser.add_argument(
        flag, required=required, help="tokenizer directory, .model/.tiktoken file or tiktoken encoding name"
    )
    parser.add_argument("--tokenizer_type", choices=KINDS, help="tokenizer kind (default: detected from its files)")


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
