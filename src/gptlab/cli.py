"""The `gptlab` command line: each subcommand is an `add_<name>_parser` plus its handlers.

Only wiring lives here: parse flags, call the library, print the result. A GptlabError is
printed as one `error: ...` line (exit status 1), a warning as one `warning: ...` line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import typing
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from gptlab.cli_common import (  # re-exported: other code imported them from here
    SHAPE_FLAGS,
    add_weights_dtype_flag,
    check_against_checkpoint,
    load_for_generation,
    load_trained_model,
)
from gptlab.config import DatasetConfig, ModelConfig, SampleConfig, TrainConfig, build_configs, validated
from gptlab.errors import GptlabError
from gptlab.interop.cli_commands import add_export_parser
from gptlab.multiple_choice_cli import add_multiple_choice_flags, run_multiple_choice
from gptlab.plot import add_plot_parser
from gptlab.presets import list_presets, load_preset
from gptlab.seq2seq.cli import (
    add_seq2seq_generate_flags,
    is_seq2seq_checkpoint,
    refuse_seq2seq_flags,
    run_generate_seq2seq,
)
from gptlab.serve.cli_commands import add_serve_parser
from gptlab.tokenizers import KINDS, Tokenizer, check_output_dir, load_tokenizer, save_tokenizer, train_tokenizer
from gptlab.tokenizers.corpus import read_corpus

DEFAULT_TOKENIZER = "./toy_data/tiny_sp"
CORPUS_RULES = (
    "Directories are searched recursively for .txt files (sorted). Binary files are refused; "
    "bytes that are not UTF-8 are replaced by U+FFFD with a warning naming the file and offset."
)


# ---- gptlab tokenizer ... --------------------------------------------------------------------
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


# ---- gptlab train ----------------------------------------------------------------------------
def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a GPT on text files (or, with --model transformer, an encoder-decoder on pairs)",
        description="Train a GPT on text (raw .txt is tokenized on the fly and cached next to it), or with "
        "--model transformer an encoder-decoder Transformer on TSV (source<TAB>target) or JSONL pairs.",
    )
    add_tokenizer_flags(parser, required=False)
    parser.add_argument("--train_data", required=True, help="a .txt file, a directory of them, or a prepared directory")
    parser.add_argument("--eval_data", help="held-out data, in the same forms (default: no evaluation)")
    parser.add_argument(
        "--config",
        help="a preset name (see configs/: " + ", ".join(list_presets()) + ") or a YAML/JSON file "
        "of options; flags typed here override it",
    )
    parser.add_argument(
        "--resume",
        help="continue from this checkpoint, or 'auto' for <checkpoint_dir>/<experiment_name>_latest.json "
        "(a fresh start if there is none): weights, optimizer, schedule, data position and random state",
    )
    parser.add_argument(
        "--init_from",
        metavar="HF_DIR_OR_CHECKPOINT",
        help="fine-tune a local Hugging Face GPT-2 directory (its weights and "
        "tokenizer; only --dropout and a shorter --seq_len may differ from its shapes) or a gptlab checkpoint "
        "(only --dropout may differ); with --lora_rank, train LoRA adapters of it",
    )
    parser.add_argument("--no_progress", action="store_true", help="no progress bar (log lines only)")
    add_config_flags(parser, ModelConfig, DatasetConfig, TrainConfig)
    parser.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from gptlab.training import train
    from gptlab.training.distributed import is_main_process

    preset = load_preset(args.config) if args.config else None
    values = dict(preset.values) if preset else {}
    values.update(flag_values(args, ModelConfig, DatasetConfig, TrainConfig))
    model_cfg, data_cfg, train_cfg = build_configs(values)
    init_weights = None
    if args.init_from:  # fine-tuning: the pretrained model's shapes, weights and tokenizer
        from gptlab.interop.base_models import fine_tuning_base

        if args.tokenizer:
            raise GptlabError("--init_from brings the pretrained model's own tokenizer; drop --tokenizer")
        chosen = {name: getattr(model_cfg, name) for name in values if name in ModelConfig.model_fields}
        model_cfg, tokenizer, init_weights = fine_tuning_base(args.init_from, chosen)
    elif args.tokenizer is None:
        recipe = preset.tokenizer if preset else None
        if recipe is None:
            raise GptlabError("--tokenizer is required (train one with `gptlab tokenizer train`)")
        out = f"tokenizer-{preset.name}"
        raise GptlabError(
            f"--tokenizer is required; preset {preset.name} was designed for this one: "
            f"`{recipe.train_command(str(args.train_data), out)}`, then pass --tokenizer {out}"
        )
    else:
        tokenizer = load_tokenizer(args.tokenizer_type, args.tokenizer)
    result = train(
        model_cfg,
        data_cfg,
        train_cfg,
        tokenizer,
        args.train_data,
        args.eval_data,
        progress=not args.no_progress,
        resume=args.resume,
        init_weights=init_weights,
        init_from=args.init_from,
    )
    if is_main_process():  # under torchrun every rank returns here
        print_train_result(result)
    return 130 if result.stopped_reason == "interrupted" else 0  # what a script expects of Ctrl-C


def print_train_result(result) -> None:
    """How the run ended, its last losses, and where the final checkpoint is."""
    summary = f"{result.stopped_reason}: {result.steps} steps, train loss {result.train_loss:.4f}"
    if result.eval is not None:
        summary += f", val loss {result.eval.loss:.4f}, val bits/byte {result.eval.bits_per_byte:.4f}"
        if result.eval.exact_match is not None:
            summary += f", exact match {result.eval.exact_match:.1%}"
    if result.task is not None:
        summary += f", task acc {result.task.acc:.4f}, acc_norm {result.task.acc_norm:.4f}"
    print(summary)
    print(f"checkpoint: {result.final_checkpoint}")


# ---- gptlab prepare --------------------------------------------------------------------------
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


# ---- gptlab generate -------------------------------------------------------------------------
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
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
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
    from gptlab.generation import stream_batch, window_keep

    if is_seq2seq_checkpoint(args.model_path):
        return run_generate_seq2seq(args)
    refuse_seq2seq_flags(args)
    sample_cfg = validated(SampleConfig, flag_values(args, SampleConfig))
    model, tokenizer = load_for_generation(args.model_path, args.device, args.dtype)
    check_against_checkpoint(args, model.config, tokenizer)
    window_keep(sample_cfg, model.config.seq_len)  # before the prompt is printed
    if args.interactive:
        from gptlab.serve import run_interactive

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


# ---- gptlab eval -----------------------------------------------------------------------------
def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="loss, perplexity and bits per byte of a GPT on some text, or its multiple-choice accuracy",
        description="Evaluate a GPT on text: mean loss, perplexity and bits per byte (comparable across tokenizers); "
        "or with --task multiple_choice, accuracy and length-normalised accuracy on a JSONL file of questions "
        "(HellaSwag's format or {context, choices, answer}), scored as lm-evaluation-harness scores them.",
    )
    parser.add_argument(
        "--model_path",
        required=True,
        help="a .pth checkpoint written by gptlab train, or a directory written by gptlab export --format safetensors "
        "(--task multiple_choice also takes a Hugging Face GPT-2 directory)",
    )
    parser.add_argument("--task", default="lm", choices=["lm", "multiple_choice"], help="what to measure (default: lm)")
    parser.add_argument(
        "--data",
        required=True,
        help="lm: a .txt file, a directory of them, or a prepared directory; multiple_choice: a .jsonl file",
    )
    parser.add_argument(
        "--batch_size",
        type=int,
        default=32,
        help="windows (lm) or choices (multiple_choice) per batch (default: %(default)s)",
    )
    parser.add_argument("--max_batches", type=int, help="lm: evaluate on at most this many batches (default: all)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    add_multiple_choice_flags(parser)
    parser.set_defaults(handler=_eval)


def _eval(args: argparse.Namespace) -> None:
    if args.task == "multiple_choice":
        return run_multiple_choice(args)
    if args.output:
        raise GptlabError("--output is for --task multiple_choice; drop it")
    from gptlab.data import TokenDataset, resolve_data
    from gptlab.device import resolve_device
    from gptlab.training import evaluate

    device = resolve_device(args.device)
    model, tokenizer = load_trained_model(args.model_path, device)
    dataset = TokenDataset(resolve_data(args.data, tokenizer), model.config.seq_len)
    result = evaluate(model, dataset, args.batch_size, args.max_batches, device)
    print(
        f"loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  "
        f"bits/byte {result.bits_per_byte:.4f}  ({result.tokens:,} tokens)"
    )


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
