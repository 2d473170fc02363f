"""What several subcommands share: loading a trained model for generation, the --dtype flag, and
checking the seed's shape flags against a checkpoint.

It lives apart from cli.py so that the sub-CLIs (seq2seq/cli.py, serve/cli_commands.py,
multiple_choice_cli.py), which cli.py imports, need not import cli.py back.
"""

from __future__ import annotations

import argparse
from typing import Any

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.tokenizers import Tokenizer, load_tokenizer

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
        choices=["fp32", "bf16", "fp16"],
        help="precision of the weights while generating: bf16 reads half the memory per token (faster for larger "
        "models on GPUs; on CPUs usually slower than fp32), with slightly different logits; fp16 on GPUs only "
        "(default: fp32)",
    )


def load_trained_model(path: str, device) -> tuple[Any, Tokenizer]:
    """The model and tokenizer of a .pth checkpoint or of a directory written by `gptlab export --format safetensors`."""
    from gptlab.interop.base_models import load_adapted
    from gptlab.interop.safetensors_io import is_safetensors_dir, load_safetensors_dir

    if is_safetensors_dir(path):
        model, tokenizer, _ = load_safetensors_dir(path, device)
    else:  # a LoRA adapter checkpoint comes back merged with its base
        model, tokenizer, _ = load_adapted(path, device)
    return model, tokenizer


def load_for_generation(path: str, device_name: str, dtype_name: str) -> tuple[Any, Tokenizer]:
    """load_trained_model, then ready_for_generation in the --dtype asked for (checked before the slow load)."""
    from gptlab.device import resolve_device, weights_dtype
    from gptlab.generation import ready_for_generation

    device = resolve_device(device_name)
    dtype = weights_dtype(dtype_name, device)
    model, tokenizer = load_trained_model(path, device)
    return ready_for_generation(model, dtype), tokenizer


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
