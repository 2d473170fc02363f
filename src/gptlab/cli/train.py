"""`gptlab train`: a GPT on text, or an encoder-decoder Transformer on pairs, from flags and presets."""

from __future__ import annotations

import argparse

from gptlab.cli.common import add_config_flags, add_tokenizer_flags, flag_values
from gptlab.config import DatasetConfig, ModelConfig, TrainConfig, build_configs
from gptlab.errors import GptlabError
from gptlab.presets import list_presets, load_preset
from gptlab.tokenizers import load_tokenizer


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
        metavar="CHECKPOINT_OR_HF_DIR",
        help="fine-tune a gptlab .pth checkpoint or a local Hugging Face GPT-2 directory (its weights and "
        "tokenizer; only --dropout and a shorter --seq_len may differ from its shapes); with --lora_rank, train "
        "LoRA adapters of it",
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
