"""`gptlab export`: a trained model as a Hugging Face directory, gptlab's safetensors directory or a GGUF file.

cli.py registers it with one line in build_parser: `add_export_parser(subparsers)`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gptlab.config import DatasetConfig, TrainConfig
from gptlab.errors import GptlabError
from gptlab.interop.gguf_export import OUTTYPES, check_gguf_out, export_gguf, require_gguf
from gptlab.interop.hf_export import export_hf
from gptlab.interop.safetensors_io import export_safetensors, is_safetensors_dir, load_safetensors_dir
from gptlab.interop.staging import check_output_dir
from gptlab.models import GPT
from gptlab.tokenizers.base import Tokenizer

FORMATS = ("hf", "safetensors", "gguf")


def add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    """`gptlab export --model_path X --format hf|safetensors|gguf --out PATH [--outtype T] [--force]`."""
    parser = subparsers.add_parser(
        "export",
        help="write a trained GPT as a Hugging Face or safetensors directory, or a GGUF file",
        description=(
            "Export a model and its tokenizer. --format hf writes a directory that transformers' "
            "AutoModelForCausalLM and AutoTokenizer load offline (GPT-2 layout for learned positions + "
            "layernorm + gelu, Llama layout for rope + rmsnorm + swiglu). --format safetensors writes "
            "gptlab's own directory (any model), which `gptlab generate --model_path DIR` reads. --format gguf "
            "writes one file for llama.cpp and Ollama (the same two layouts as hf; tokenizer included)."
        ),
    )
    parser.add_argument("--model_path", required=True, help="a .pth checkpoint, or a gptlab safetensors directory")
    parser.add_argument(
        "--format",
        default="hf",
        choices=FORMATS,
        help="output format: hf and safetensors write a directory, gguf one file (default: %(default)s)",
    )
    parser.add_argument("--outtype", choices=OUTTYPES, help="gguf only: weight type (default: f32)")
    parser.add_argument(
        "--out",
        required=True,
        help="output directory (new or empty unless --force), or the .gguf file (new unless --force)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier export at --out (only once the export succeeded; other files are refused)",
    )
    parser.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> None:
    if args.outtype is not None and args.format != "gguf":
        raise GptlabError(f"--outtype applies to --format gguf only, not --format {args.format}")
    if args.format == "gguf":  # refuse before the slow load
        check_gguf_out(args.out, args.force)
        require_gguf()
    else:
        check_output_dir(args.out, args.force)
    model, tokenizer, data_cfg, train_cfg = load_for_export(args.model_path)
    if args.format == "gguf":
        outtype = args.outtype or "f32"
        architecture = export_gguf(model, tokenizer, args.out, outtype, force=args.force)
        print(
            f"wrote {args.out} (GGUF {architecture}, {outtype}, {model.num_params():,} parameters, {tokenizer.kind} tokenizer)"
        )
    elif args.format == "hf":
        architecture = export_hf(model, tokenizer, args.out, force=args.force)
        print(f"wrote {args.out} ({architecture}, {model.num_params():,} parameters, {tokenizer.kind} tokenizer)")
    else:
        export_safetensors(model, tokenizer, args.out, data_cfg, train_cfg, force=args.force)
        print(f"wrote {args.out} (gptlab safetensors, {model.num_params():,} parameters, {tokenizer.kind} tokenizer)")


def load_for_export(
    model_path: str | Path,
) -> tuple[GPT, Tokenizer, DatasetConfig | None, TrainConfig | None]:
    """Model, tokenizer and (for a checkpoint) its data and train configs, from a .pth
    checkpoint or a gptlab safetensors directory."""
    if is_safetensors_dir(model_path):
        model, tokenizer, _ = load_safetensors_dir(model_path)
        return model, tokenizer, None, None
    from gptlab.interop.base_models import load_adapted

    model, tokenizer, checkpoint = load_adapted(model_path)  # LoRA adapters merged into their base
    return model, tokenizer, checkpoint.data_config, checkpoint.train_config
